"""What a parser of client data raises is the client's 4xx; the server's own troubles are not."""

import struct

import pytest

from handlers import BadRequest, PayloadTooLarge, UnsupportedMediaType
from handlers.core.client_data import parsing_client_data


class PanicException(BaseException):
    """Stands in for pyo3's PanicException (a Rust panic in tokenizers), a BaseException."""


@pytest.mark.parametrize("raised, words", [
    (struct.error("unpack requires a buffer of 4 bytes"), "struct.error: unpack requires"),
    (TypeError("bad operand type for abs(): 'str'"), "TypeError: bad operand"),
    (KeyError("orientation"), "KeyError: 'orientation'"),
    (PanicException("index out of bounds"), "PanicException: index out of bounds"),
])
def test_what_a_parser_raises_is_a_400_naming_it(raised, words):
    with pytest.raises(BadRequest) as caught:
        with parsing_client_data("the image data is corrupt"):
            raise raised
    assert caught.value.message.startswith("the image data is corrupt: ") and words in caught.value.message
    assert caught.value.__cause__ is raised  # kept for the logs


@pytest.mark.parametrize("raised", [
    MemoryError(), KeyboardInterrupt(), SystemExit(1),
    UnsupportedMediaType("not an image"), PayloadTooLarge("too many pixels"),
])
def test_memory_errors_interrupts_and_request_errors_pass_through_unchanged(raised):
    with pytest.raises(type(raised)) as caught:
        with parsing_client_data("the image data is corrupt"):
            raise raised
    assert caught.value is raised


def test_a_declared_too_large_error_is_a_413_and_a_long_message_is_cut():
    class Bomb(Exception):
        pass

    with pytest.raises(PayloadTooLarge, match="too big: Bomb"):
        with parsing_client_data("too big", too_large=(Bomb,)):
            raise Bomb("x")
    with pytest.raises(BadRequest) as caught:
        with parsing_client_data("corrupt"):
            raise ValueError("y" * 10_000)
    assert len(caught.value.message) < 400 and caught.value.message.endswith("...")
