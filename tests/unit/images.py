"""Images made on the fly for tests: real photos (scikit-learn's samples), every format and mode,
EXIF-rotated copies, decompression bombs."""

import io
import struct
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image


@lru_cache(maxsize=None)
def photo_paths():
    import sklearn.datasets

    return tuple(sorted((Path(sklearn.datasets.__file__).parent / "images").glob("*.jpg")))


def photo(index=0, size=(320, 240)) -> Image.Image:
    """A real photo (china.jpg / flower.jpg, 640×427), resized."""
    with Image.open(photo_paths()[index]) as image:
        return image.convert("RGB").resize(size, Image.Resampling.BILINEAR)


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def in_mode(image: Image.Image, mode: str) -> Image.Image:
    """``image`` converted to ``mode``, including the ones Pillow does not convert RGB to directly."""
    if mode == "I;16":
        grey = np.asarray(image.convert("L"), dtype=np.uint16) * 257
        return Image.fromarray(grey)  # uint16 → "I;16"
    if mode == "LA":
        return image.convert("L").convert("LA")
    if mode == "P":
        return image.convert("P", palette=Image.Palette.ADAPTIVE)
    return image.convert(mode)


def with_exif_orientation(image: Image.Image, orientation: int) -> bytes:
    """A JPEG whose pixels are stored rotated, with the EXIF tag that tells viewers how to show
    it upright (6: rotate 90° clockwise to view; 8: 90° counter-clockwise; 3: 180°)."""
    stored = {6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270, 3: Image.Transpose.ROTATE_180}[orientation]
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(image.transpose(stored), "JPEG", quality=95, exif=exif.tobytes())


def bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares ``width``×``height`` pixels (a decompression bomb)."""
    real = encode(Image.new("L", (1, 1)), "PNG")
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    ihdr = b"IHDR" + header
    chunk = struct.pack(">I", len(header)) + ihdr + struct.pack(">I", zlib.crc32(ihdr) & 0xFFFFFFFF)
    start = 8  # after the signature
    end = start + 8 + 13 + 4
    return real[:start] + chunk + real[end:]


def animated_gif(colours) -> bytes:
    frames = [Image.new("RGB", (64, 64), colour) for colour in colours]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def exif_with_mistyped_tag(orientation: int, tag: int = 0x0115) -> bytes:
    """An EXIF block (APP1 payload) with an orientation and a numeric tag whose value is stored as
    ASCII text: Pillow reads it, and raises when it writes the block back after rotating
    (``struct.error`` for SamplesPerPixel 0x0115, a SHORT; ``TypeError`` for
    PrimaryChromaticities 0x013F, a RATIONAL), as a buggy camera or a mutated file can have it."""
    entries = [(0x0112, 3, 1, struct.pack(">HH", orientation, 0)), (tag, 2, 6, struct.pack(">I", 38))]
    ifd = struct.pack(">H", len(entries)) + b"".join(struct.pack(">HHI", *entry[:3]) + entry[3] for entry in entries)
    tiff = b"MM\x00\x2a" + struct.pack(">I", 8) + ifd + struct.pack(">I", 0) + b"Canon\x00"
    assert tiff.index(b"Canon") == 38
    return b"Exif\x00\x00" + tiff


def with_corrupt_exif(image: Image.Image, orientation: int = 6, tag: int = 0x0115) -> bytes:
    """A JPEG with an orientation tag in a corrupt EXIF block (see ``exif_with_mistyped_tag``)."""
    return encode(image, "JPEG", quality=95, exif=exif_with_mistyped_tag(orientation, tag))
