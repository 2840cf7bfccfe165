"""Image decoding for one request: pure functions on bytes, safe on a thread pool.

Pixels stay uint8 (H, W, 3) here; conversion to float and normalisation happen once per
micro-batch, on the device (see ``ImageClassifierHandler.collate``).
"""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass
from typing import Optional

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from handlers.core.client_data import parsing_client_data
from handlers.core.request import parse_json
from handlers.engine.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType

HIGH_BIT_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
TRANSPARENT_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
DECOMPRESSION_BOMB = (Image.DecompressionBombError,)
SIGNATURES = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
              (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"))


@dataclass(frozen=True)
class ImageLimits:
    """Guards applied before any pixel is decoded."""

    max_bytes: int = 16 * 1024 * 1024
    max_pixels: int = 40_000_000


@dataclass(frozen=True)
class ImageGeometry:
    """Resize the shorter side to ``resize``, then take the centre ``crop`` × ``crop``.

    ``crop=None`` keeps the whole resized frame (its aspect ratio too); ``resize=None`` keeps the
    decoded size. Both None, :meth:`full_frame`: the whole image as sent, only made upright and RGB.
    """

    resize: Optional[int] = 256
    crop: Optional[int] = 224
    draft: bool = True  # decode JPEGs at a reduced scale when the target is smaller

    def __post_init__(self):
        for name in ("resize", "crop"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"ImageGeometry.{name} must be a whole number of pixels >= 1 or None, got {value!r}")

    @classmethod
    def full_frame(cls) -> "ImageGeometry":
        """The whole image, neither resized nor cropped (upright, RGB)."""
        return cls(resize=None, crop=None)


SEND_AN_IMAGE = 'send the image bytes (e.g. Content-Type: image/jpeg) or JSON {"image": "<base64>"}'


def image_bytes(body, content_type: Optional[str] = None) -> bytes:
    """The image bytes of a request body: raw bytes, or a base64 string (as text or in JSON
    under "image", "data" or "b64"). ``content_type`` (the request's) makes the messages exact:
    a body sent as JSON that does not parse is a 400 that says so, not "not an image"."""
    if isinstance(body, (bytes, bytearray)):
        if (content_type or "").lower().startswith("application/json"):
            with parsing_client_data("the body is sent as application/json but is not valid JSON"):
                parse_json(bytes(body))
        return bytes(body)
    if isinstance(body, dict):
        for key in ("image", "data", "b64"):
            if key in body:
                return image_bytes_from_base64(body[key])
        raise BadRequest('expected image bytes, or JSON with a base64 "image" field')
    if isinstance(body, str):
        if (content_type or "").lower().startswith("text"):
            return image_bytes_from_base64(body, f"a {content_type.split(';')[0]} body is read as a base64 image, and "
                                                 f"this one is not base64: {SEND_AN_IMAGE}")
        return image_bytes_from_base64(body)
    raise BadRequest(f"expected image bytes or base64 text, got {json_type(body)}: {SEND_AN_IMAGE}")


def image_bytes_from_base64(text, not_base64: str = "the image is not valid base64") -> bytes:
    if not isinstance(text, str):
        raise BadRequest(f"the base64 image must be a string, got {json_type(text)}")
    if text.startswith("data:") and "," in text:  # a data URL: data:image/png;base64,....
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRequest(f"{not_base64} ({exc})") from None


def json_type(value) -> str:
    """A decoded JSON value's type in JSON's words (an object, not a dict)."""
    names = {dict: "a JSON object", list: "a JSON array", bool: "true/false", int: "a number", float: "a number",
             type(None): "null"}
    return names.get(type(value), type(value).__name__)


def open_image(data: bytes, limits: ImageLimits) -> Image.Image:
    """Open (not decode) an image, refusing what is too large before allocating its pixels."""
    if not data:
        raise BadRequest("the body is empty: expected an image")
    if len(data) > limits.max_bytes:
        raise PayloadTooLarge(f"the image is {len(data):,} bytes; the limit is {limits.max_bytes:,}")
    with parsing_client_data("the image header is corrupt"):
        try:
            image = Image.open(io.BytesIO(data))  # reads the header only
        except Image.DecompressionBombError as exc:
            raise PayloadTooLarge(f"the image declares too many pixels: {exc}") from None
        except UnidentifiedImageError:
            claimed = signature_format(data)
            if claimed:  # a corrupt file of a format we read, not a format we do not read
                raise BadRequest(
                    f"the body starts as a {claimed} file but its header is corrupt or truncated"
                ) from None
            raise UnsupportedMediaType(
                "the body is not an image format this handler reads (JPEG, PNG, WebP, GIF, BMP, TIFF, ...)"
            ) from None
    width, height = image.size
    if width * height > limits.max_pixels:
        raise PayloadTooLarge(
            f"the image is {width}x{height} = {width * height:,} pixels; the limit is {limits.max_pixels:,}"
        )
    if width < 1 or height < 1:
        raise BadRequest(f"the image has no pixels ({width}x{height})")
    return image


def signature_format(data: bytes) -> str | None:
    """The format whose signature ``data`` starts with (JPEG, PNG, GIF, TIFF, WebP), or None."""
    for signature, name in SIGNATURES:
        if data.startswith(signature):
            return name
    return "WebP" if data[:4] == b"RIFF" and data[8:12] == b"WEBP" else None


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode → 8-bit RGB: 16-bit and float greyscale rescaled, transparency flattened
    onto white, palette and CMYK converted."""
    if image.mode == "RGB":
        return image
    if image.mode in HIGH_BIT_DEPTH_MODES:
        # A float TIFF's NaN is black rather than an invalid cast to uint8 (infinities clip).
        values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=np.inf, neginf=-np.inf)
        top = 65535.0 if values.max(initial=0) > 255 or image.mode.startswith("I;16") else 255.0
        grey = np.clip(values * (255.0 / top), 0, 255).round().astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")  # uint8 → "L"
    if image.mode in TRANSPARENT_MODES or (image.mode == "P" and "transparency" in image.info):
        # Pillow converts premultiplied grey ("La", a TIFF with associated alpha) only to "LA".
        rgba = (image.convert("LA") if image.mode == "La" else image).convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def decode_image(data: bytes, geometry: ImageGeometry = ImageGeometry(),
                 limits: ImageLimits = ImageLimits()) -> np.ndarray:
    """Bytes → a writable uint8 (height, width, 3) RGB array: upright (EXIF), resized and
    centre-cropped as ``geometry`` says ((crop, crop, 3) by default; the whole frame with
    ``ImageGeometry.full_frame()``). ``torch.from_numpy`` takes it as it is.

    Raises BadRequest (400), PayloadTooLarge (413) or UnsupportedMediaType (415).

    Example::

        pixels = decode_image(request.body, ImageGeometry.full_frame())  # (H, W, 3) as sent
    """
    image = open_image(data, limits)
    # Pillow reports corrupt data with whatever the failing step raises (OSError, SyntaxError,
    # struct.error, TypeError, ...): the client's 400, whether in the pixels or the metadata.
    # Only the steps that read the client's bytes are wrapped; the rest works on decoded pixels.
    with parsing_client_data("the image data is corrupt or truncated", too_large=DECOMPRESSION_BOMB):
        if geometry.draft and geometry.resize is not None and image.format == "JPEG":
            # The decoder scales by 1/2, 1/4 or 1/8 while keeping both sides >= resize.
            image.draft("RGB", (geometry.resize, geometry.resize))
        image.load()
    # A 400 rather than the image as stored: the client asked for a rotation, and a picture
    # served sideways gets a confident wrong answer.
    with parsing_client_data("the image's EXIF metadata is corrupt"):
        ImageOps.exif_transpose(image, in_place=True)  # in place: no copy of an upright image
    image = to_rgb(image)
    image = resize_and_center_crop(image, geometry.resize, geometry.crop)
    # np.array, not asarray: Pillow's array is read-only, and torch.from_numpy warns on those.
    return np.array(image, dtype=np.uint8)


def resize_and_center_crop(image: Image.Image, resize: Optional[int], crop: Optional[int]) -> Image.Image:
    """Resize the shorter side to ``resize``, then take the centre ``crop`` × ``crop``: in one
    resample of only the cropped region (the same sampling grid as resizing the whole image and
    cropping it, at a fraction of the work). None: no resize, no crop."""
    width, height = image.size
    if crop is None:
        crop = max(width, height) if resize is None else max(width, height) * resize // min(width, height) + 1
    scale = 1.0 if resize is None else resize / min(width, height)
    resized = (max(1, round(width * scale)), max(1, round(height * scale)))
    out = (min(crop, resized[0]), min(crop, resized[1]))
    left, top = (resized[0] - out[0]) // 2, (resized[1] - out[1]) // 2
    if resized == image.size:
        return image.crop((left, top, left + out[0], top + out[1]))
    x_scale, y_scale = width / resized[0], height / resized[1]
    box = (left * x_scale, top * y_scale, (left + out[0]) * x_scale, (top + out[1]) * y_scale)
    # reducing_gap: reduce by an integer factor first (fast), then resample the rest.
    return image.resize(out, Image.Resampling.BILINEAR, box=box, reducing_gap=3.0)
