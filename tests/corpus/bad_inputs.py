"""The bad-input corpus: every kind of malformed, hostile or odd request a user would try, made
by code (deterministic), each with the model it is sent to and the answer it must get.

    python -m tests.corpus.bad_inputs OUT_DIR    # write it out as files, with an index.json
"""

from __future__ import annotations

import base64
import io
import json
import struct
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

# TorchServe's max_request_size in config.properties (16 MiB): a body over it is refused by
# TorchServe's frontend itself, before any handler sees it.
REQUEST_SIZE_LIMIT = 16 * 1024 * 1024


@dataclass(frozen=True)
class BadInput:
    kind: str
    model: str
    body: bytes
    content_type: str
    status: int
    words: str  # a piece of the error message (empty for 200)
    frontend_only: bool = False  # refused by TorchServe before the handler: not for unit tests


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _picture(size=(96, 64)) -> Image.Image:
    gradient = np.linspace(0, 255, size[0] * size[1] * 3).reshape(size[1], size[0], 3).astype(np.uint8)
    return Image.fromarray(gradient)


def _bomb_png(width: int, height: int) -> bytes:
    real = _encode(Image.new("L", (1, 1)), "PNG")
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    ihdr = b"IHDR" + header
    chunk = struct.pack(">I", len(header)) + ihdr + struct.pack(">I", zlib.crc32(ihdr) & 0xFFFFFFFF)
    return real[:8] + chunk + real[8 + 25:]


def _npy(array, allow_pickle=False) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


def _npy_header_only(shape) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return buffer.getvalue() + b"\x00" * 64


def _npy_with_header(header: str) -> bytes:
    text = header.ljust(118) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text.encode("latin-1") + bytes(64)


def _with_bad_segment_length(jpeg: bytes) -> bytes:
    """The JPEG with its first quantisation table's (DQT) length field set past the file's end."""
    at = jpeg.index(b"\xff\xdb")
    return jpeg[: at + 2] + b"\xff\xf0" + jpeg[at + 4:]


def corpus() -> list:
    from ..unit.images import exif_with_mistyped_tag

    rng = np.random.default_rng(1234)
    jpeg = _encode(_picture(), "JPEG", quality=90)
    png = _encode(_picture(), "PNG")
    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 255, 255), (0, 0, 0))]
    gif = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    sixteen_bit = _encode(Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)), "PNG")
    cmyk = _encode(_picture().convert("CMYK"), "JPEG")
    over_pixels = _encode(Image.new("L", (8000, 6000)), "PNG")  # 48 MP of one colour: a tiny file
    # Orientation 6 and a SHORT tag stored as text: Pillow raises struct.error writing it back.
    corrupt_exif = _encode(_picture(), "JPEG", quality=90, exif=exif_with_mistyped_tag(6))
    image = "digits"
    items = [
        BadInput("empty body", image, b"", "application/octet-stream", 400, "empty"),
        BadInput("zero bytes", image, bytes(4096), "application/octet-stream", 415, "not an image"),
        BadInput("truncated JPEG", image, jpeg[: len(jpeg) // 2], "image/jpeg", 400, "corrupt or truncated"),
        BadInput("truncated PNG", image, png[: len(png) // 2], "image/png", 400, "corrupt or truncated"),
        BadInput("random bytes", image, rng.bytes(20_000), "application/octet-stream", 415, "not an image"),
        BadInput("a text file posted as an image", image, b"Dear diary,\ntoday I posted a text file.\n" * 40,
                 "image/jpeg", 415, "not an image"),
        BadInput("decompression bomb", image, _bomb_png(100_000, 100_000), "image/png", 413, "pixels"),
        BadInput("image over the pixel limit", image, over_pixels, "image/png", 413, "pixels; the limit is"),
        BadInput("base64 that is not base64", image, json.dumps({"image": "@@@not*base64@@@"}).encode(),
                 "application/json", 400, "not valid base64"),
        BadInput("JSON without an image", image, json.dumps({"picture": "AAAA"}).encode(), "application/json",
                 400, 'base64 "image" field'),
        BadInput("a bad top_k", image, json.dumps({"image": base64.b64encode(png).decode(), "top_k": -3}).encode(),
                 "application/json", 400, "top_k must be a whole number"),
        BadInput("animated GIF (valid: first frame)", image, gif, "image/gif", 200, ""),
        BadInput("16-bit greyscale PNG (valid)", image, sixteen_bit, "image/png", 200, ""),
        BadInput("CMYK JPEG (valid)", image, cmyk, "image/jpeg", 200, ""),
        BadInput("a rotated JPEG with a corrupt EXIF block", image, corrupt_exif, "image/jpeg", 400,
                 "EXIF metadata is corrupt"),
        BadInput("a JPEG whose segment length runs past the end", image, _with_bad_segment_length(jpeg), "image/jpeg",
                 400, "corrupt"),
        BadInput("body over TorchServe's request-size limit", image, b"\xff" * (REQUEST_SIZE_LIMIT + 1024),
                 "application/octet-stream", 413, "", frontend_only=True),
        BadInput("JSON that does not parse", "tabular", b"[1.0, 2.0,", "application/json", 400, "neither a JSON array"),
        BadInput("JSON of the wrong shape", "tabular", b"[[1, 2], [3, 4]]", "application/json", 400,
                 "expected shape [4] of float32, got shape [2, 2]"),
        BadInput("JSON of the wrong dtype", "tabular", b'["a", "b", "c", "d"]', "application/json", 400,
                 "expected numbers"),
        BadInput("NaN values", "tabular", b"[1.0, NaN, 3.0, 4.0]", "application/json", 400, "has no NaN or Infinity"),
        BadInput("infinite values", "tabular", b"[1.0, Infinity, 3.0, -Infinity]", "application/json", 400,
                 "has no NaN or Infinity"),
        BadInput("a ragged array", "tabular", b"[[1, 2, 3], [4]]", "application/json", 400, "ragged"),
        BadInput("booleans", "tabular", b"[true, false, true, false]", "application/json", 400, "booleans"),
        BadInput("a pickled .npy (object array)", "tabular", _npy(np.array([1, "x", None, 4], dtype=object), True),
                 "application/octet-stream", 400, "object arrays are refused"),
        BadInput(".npy header declaring 10^10 values", "tabular", _npy_header_only((10**10,)),
                 "application/octet-stream", 413, "elements; the limit is"),
        BadInput("deeply nested JSON", "tabular", b"[" * 100_000 + b"]" * 100_000, "application/json", 400, ""),
        BadInput("an empty JSON body", "tabular", b"", "application/json", 400, "empty"),
        BadInput(".npy header declaring 36 items of 1 GB each", "tabular",
                 _npy_with_header("{'descr': '<V1000000000', 'fortran_order': False, 'shape': (3, 3, 4), }"),
                 "application/octet-stream", 400, "expected numbers"),
        BadInput("a .npy header Python cannot tokenize", "tabular",
                 _npy_with_header("{{'descr': '<f4', 'shape': (4,)}"), "application/octet-stream", 400,
                 "the .npy header is corrupt"),
        BadInput("over-long text", "text_embedding", ("word " * 5_000).encode(), "text/plain", 413,
                 "characters; the limit is"),
        BadInput("text that is not UTF-8", "text_embedding", "café".encode("latin-1") * 10, "text/plain", 400,
                 "not valid UTF-8"),
        BadInput("empty text", "text_embedding", b"   \n", "text/plain", 400, "empty"),
        BadInput("a lone surrogate in JSON text", "text_embedding", b'{"text": "abc \\ud800 def"}', "application/json",
                 400, "the text holds an unpaired surrogate at position 4"),
        BadInput("a lone surrogate in a JSON string", "text_embedding", b'"\\udfff"', "application/json", 400,
                 "unpaired surrogate at position 0"),
        BadInput("malformed JSON sent as JSON to a text handler", "text_embedding", b'{"text": "abc', "application/json",
                 400, "not valid JSON"),
        BadInput("control characters and NULs in text (valid)", "text_embedding", b"a\x00b\x07c \x1b[0m \xe2\x80\x8b",
                 "text/plain", 200, ""),
        BadInput("JSON without text", "text_embedding", b'{"txt": "hello"}', "application/json", 400,
                 '{"text": "..."}'),
        BadInput("JSON of the wrong type", "quickstart", b'"just a string"', "application/json", 400,
                 "expected a JSON object"),
        BadInput("wrong field types", "quickstart", b'{"id": "a", "x": [1, 2, "three", 4]}', "application/json",
                 400, "must be a list of 4 numbers"),
    ]
    return items


def main(out_dir: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    index = []
    for number, item in enumerate(corpus()):
        name = f"{number:02d}-{item.model}.bin"
        (out / name).write_bytes(item.body)
        index.append({"file": name, "kind": item.kind, "model": item.model, "content_type": item.content_type,
                      "status": item.status, "words": item.words})
    (out / "index.json").write_text(json.dumps(index, indent=1))
    print(f"wrote {len(index)} inputs to {out}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bad_inputs")
