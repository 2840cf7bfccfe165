"""Text input for one request, and padding per micro-batch. Pure functions, pool-safe."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from handlers.core.request import Request
from handlers.engine.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType


def request_text(body: Any, max_chars: int, content_type: Optional[str] = None) -> str:
    """The text of a request: a plain/UTF-8 body, a JSON string, or JSON ``{"text": "..."}``.
    A body sent as ``application/json`` that is still undecoded did not parse: a 400, not text."""
    if content_type and content_type.split("/")[0] in ("image", "audio", "video"):
        raise UnsupportedMediaType(f"expected text (text/plain or application/json), got {content_type}")
    if content_type and content_type.startswith("application/json") and isinstance(body, (bytes, bytearray)):
        body = Request(body).json()
    if isinstance(body, (bytes, bytearray)):
        try:
            body = bytes(body).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadRequest(f"the text is not valid UTF-8: {exc}") from None
    if isinstance(body, dict):
        if "text" not in body:
            raise BadRequest('expected text, a JSON string, or JSON {"text": "..."}')
        body = body["text"]
    if not isinstance(body, str):
        raise BadRequest(f"expected text, got {type(body).__name__}")
    if len(body) > max_chars:
        raise PayloadTooLarge(f"the text is {len(body):,} characters; the limit is {max_chars:,}")
    check_unicode(body)
    if not body.strip():
        raise BadRequest("the text is empty")
    return body


def check_unicode(text: str) -> None:
    """400 for a text a tokenizer cannot take: one holding a surrogate code point (U+D800 to
    U+DFFF), which JSON's ``\\ud800`` escapes can put into a Python str. Control characters,
    NULs and combining marks are text: the tokenizer normalises them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # only surrogates fail to encode
        raise BadRequest(
            f"the text holds an unpaired surrogate at position {exc.start} (U+{ord(text[exc.start]):04X}): "
            "send valid Unicode (in JSON, a \\uD800-\\uDFFF escape must be half of a pair)"
        ) from None


def pad_to_longest(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of one micro-batch → ``(ids, attention_mask)``, both (N, longest) int64: padded
    to the longest sequence of this micro-batch, not to a global maximum."""
    longest = max(len(s) for s in sequences)
    ids = np.full((len(sequences), longest), pad_id, dtype=np.int64)
    mask = np.zeros((len(sequences), longest), dtype=np.int64)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = sequence
        mask[row, : len(sequence)] = 1
    return ids, mask
