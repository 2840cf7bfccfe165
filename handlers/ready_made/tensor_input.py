"""Numeric input for one request: a JSON array or ``.npy`` bytes, checked against a declared
shape and dtype. Pure functions, safe on a thread pool."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from handlers.core.client_data import parsing_client_data
from handlers.core.request import parse_json
from handlers.engine.errors import BadRequest, PayloadTooLarge

NPY_MAGIC = b"\x93NUMPY"
DTYPES = ("float32", "float64", "float16", "int64", "int32", "int16", "int8", "uint8", "bool")


@dataclass(frozen=True)
class TensorSpec:
    """What one request must hold: ``shape`` (``-1`` for any length on that axis; empty for any
    shape), ``dtype``, whether NaN/Inf may appear, and a bound on the element count."""

    shape: Sequence[int] = ()
    dtype: str = "float32"
    allow_non_finite: bool = False
    max_elements: int = 1_000_000

    def describe(self) -> str:
        shape = "any shape" if not self.shape else "shape [" + ", ".join("*" if d == -1 else str(d) for d in self.shape) + "]"
        return f"{shape} of {self.dtype}"


def parse_array(body: Any, spec: TensorSpec) -> np.ndarray:
    """A request body → an array of ``spec``'s dtype and shape; 400/413 naming what was expected."""
    if isinstance(body, (bytes, bytearray)) and bytes(body[:6]) == NPY_MAGIC:
        array = _load_npy(bytes(body), spec)
    else:
        array = _from_json(_json_payload(body), spec)
    _check_shape(array, spec)
    if array.dtype.kind == "f" and not spec.allow_non_finite:
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        if bad:
            raise BadRequest(f"the input has {bad} NaN or infinite value(s); expected finite numbers ({spec.describe()})")
    return array


def _json_payload(body: Any) -> Any:
    if isinstance(body, (bytes, bytearray, str)):
        if isinstance(body, (bytes, bytearray)) and not body:
            raise BadRequest("the body is empty: expected a JSON array or .npy bytes")
        try:
            body = parse_json(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise BadRequest(f"the body is neither a JSON array nor .npy bytes: {exc}") from None
        except RecursionError:
            raise BadRequest("the body is neither a JSON array nor .npy bytes: JSON nested too deeply") from None
    if isinstance(body, dict):
        if "inputs" not in body:
            raise BadRequest('expected a JSON array, or an object with the array under "inputs"')
        body = body["inputs"]
    return body


def _from_json(payload: Any, spec: TensorSpec) -> np.ndarray:
    if not isinstance(payload, (list, int, float)) or isinstance(payload, bool) and spec.dtype != "bool":
        raise BadRequest(f"expected a JSON array of numbers ({spec.describe()}), got {type(payload).__name__}")
    with parsing_client_data(f"the array could not be read; expected {spec.describe()}"):
        try:
            array = np.asarray(payload)
        except ValueError as exc:  # ragged nesting
            raise BadRequest(f"the array is ragged (rows of different lengths); expected {spec.describe()}: {exc}") from None
    if array.size > spec.max_elements:
        raise PayloadTooLarge(f"the input has {array.size:,} elements; the limit is {spec.max_elements:,}")
    return _cast(array, spec)


def _load_npy(data: bytes, spec: TensorSpec) -> np.ndarray:
    stream = io.BytesIO(data)
    # numpy parses the header with Python's tokenizer: a corrupt one raises ValueError, but also
    # tokenize.TokenError, SyntaxError, ...: all of them the client's 400.
    with parsing_client_data("the .npy header is corrupt"):
        version = np.lib.format.read_magic(stream)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(stream)
    if dtype.hasobject:
        raise BadRequest("the .npy data holds Python objects; object arrays are refused (they need pickle)")
    if dtype.kind not in "biuf":  # before np.load: a void or string dtype may declare a gigabyte per item
        raise BadRequest(f"expected numbers ({spec.describe()}), got {_kind_of(dtype)}")
    # Python ints, not int64: a product of sizes past 2**63 must not wrap around under the limit.
    elements = math.prod(shape)
    if elements > spec.max_elements:  # checked from the header, before any allocation
        raise PayloadTooLarge(f"the input has {elements:,} elements; the limit is {spec.max_elements:,}")
    declared, present = elements * dtype.itemsize, len(data) - stream.tell()
    if declared > present:  # np.load would allocate the declared size before finding out
        raise BadRequest(
            f"the .npy data is corrupt or truncated: its header declares {declared:,} bytes, the body holds {present:,}"
        )
    with parsing_client_data("the .npy data is corrupt or truncated"):
        array = np.load(io.BytesIO(data), allow_pickle=False)  # never unpickle client data
    return _cast(array, spec)


def _kind_of(dtype: np.dtype) -> str:
    """What a client sent, in its words rather than numpy's (``<U21``)."""
    words = {"U": "strings", "S": "bytes", "O": "mixed values", "c": "complex numbers", "M": "dates", "m": "durations"}
    return f"{words.get(dtype.kind, 'values')} (numpy type {dtype})"


def _cast(array: np.ndarray, spec: TensorSpec) -> np.ndarray:
    target = np.dtype(spec.dtype)
    if array.dtype.kind not in "biuf":
        raise BadRequest(f"expected numbers ({spec.describe()}), got {_kind_of(array.dtype)}")
    if array.dtype.kind == "b" and target.kind != "b":
        raise BadRequest(f"expected {spec.dtype} numbers, got booleans")
    if not np.can_cast(array.dtype, target, casting="same_kind"):
        raise BadRequest(f"expected {spec.dtype} values, got {array.dtype} (would lose precision or sign)")
    if target.kind in "iu" and array.size:
        info = np.iinfo(target)
        if array.min() < info.min or array.max() > info.max:
            raise BadRequest(f"values out of range for {spec.dtype} [{info.min}, {info.max}]")
    return array.astype(target, copy=False)


def _check_shape(array: np.ndarray, spec: TensorSpec) -> None:
    if not spec.shape:
        return
    expected = tuple(spec.shape)
    matches = len(array.shape) == len(expected) and all(e in (-1, a) for a, e in zip(array.shape, expected))
    if not matches:
        raise BadRequest(f"expected {spec.describe()}, got shape {list(array.shape)}")


def check_spec(shape: Any, dtype: Any) -> Optional[str]:
    """A reason the declared shape/dtype settings are wrong, or None."""
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and (d >= 1 or d == -1) for d in shape):
        return f"handler.shape must be a list of sizes >= 1 (or -1 for any), got {shape!r}"
    if dtype not in DTYPES:
        return f"handler.dtype must be one of {', '.join(DTYPES)}, got {dtype!r}"
    return None
