"""Issue 17, finding 7: a bug in a handler's own preprocessing is a 500 in the log, not the
client's 400. Only what parses the client's data (inside ``parsing_client_data``, or a
``RequestError`` raised on purpose) answers 4xx; a ``ValueError`` from the handler's own code
(a wrong reshape, ``int()`` of a setting) no longer passes for a malformed request."""

import json
import logging

import numpy as np
import pytest

from handlers import BadRequest, PayloadTooLarge, Request, UnsupportedMediaType
from handlers.core.client_data import parsing_client_data
from handlers.engine.errors import InternalError, preprocess_error
from handlers.testing import LocalServer

from .models import AffineHandler

GOOD = {"x": [1, 2, 3, 4]}


class ReshapeBugHandler(AffineHandler):
    """Reads {"x": [4 numbers], "layout": ...}; its "grid" branch has a bug: a wrong reshape."""

    def preprocess_one(self, request):
        with parsing_client_data('expected JSON {"x": [4 numbers]}'):
            payload = json.loads(request.bytes())
            x = np.asarray(payload["x"], dtype=np.float32)
        if payload.get("layout") == "grid":
            x = x.reshape(3, 3).ravel()[:4]  # the bug: 4 values never make a 3x3 grid (ValueError)
        return super().preprocess_one(Request(x.tolist()))


class SettingBugHandler(AffineHandler):
    """Its own setting, read with ``int()`` on every request: a ValueError on every request."""

    options = {"offset": "two"}

    def preprocess_one(self, request):
        offset = int(self.config["offset"])  # the bug: "two" is no int
        return super().preprocess_one(request) + offset


class JsonParsingHandler(AffineHandler):
    """Parses the body itself, inside ``parsing_client_data``: bad JSON is the client's 400."""

    def preprocess_one(self, request):
        with parsing_client_data("the body is not JSON"):
            payload = json.loads(request.bytes())
        return super().preprocess_one(Request(payload))


def server_errors(caplog):
    return [r for r in caplog.records if r.levelno >= logging.ERROR and r.name == "handlers.engine.batch_engine"]


def test_a_valueerror_from_the_handlers_own_reshape_is_a_logged_500_and_its_batch_mates_200(caplog):
    bodies = [GOOD, {"x": [1, 1, 1, 1], "layout": "grid"}, {"x": [0, 0, 0, 0]}]
    with caplog.at_level(logging.ERROR, logger="handlers.engine.batch_engine"):
        with LocalServer.start(ReshapeBugHandler, handler_config={"micro_batch_size": 3, "pool_size": 2}) as server:
            responses = server.send(bodies)
    assert [r.status for r in responses] == [200, 500, 200], responses[1].body
    assert responses[0].body == [3.0, 5.0, 7.0, 9.0] and responses[2].body == [1.0] * 4
    assert responses[1].body["type"] == "InternalServerError"
    assert responses[1].body["message"].startswith("preprocessing failed: ValueError: cannot reshape")
    [record] = server_errors(caplog)
    assert "request #1 " in record.getMessage() and "500 InternalServerError" in record.getMessage()
    # The traceback reaches the log, down to the handler's own line.
    assert "Traceback (most recent call last)" in caplog.text and "x.reshape(3, 3)" in caplog.text


def test_int_of_a_bad_setting_in_preprocess_one_is_a_500_for_every_request_not_a_400(caplog):
    with caplog.at_level(logging.ERROR, logger="handlers.engine.batch_engine"):
        with LocalServer.start(SettingBugHandler, handler_config={"micro_batch_size": 2}) as server:
            responses = server.send([[1, 2, 3, 4], [5, 6, 7, 8]])
    assert [r.status for r in responses] == [500, 500]
    assert all("invalid literal for int()" in r.body["message"] for r in responses)
    records = server_errors(caplog)  # one per request: each raised its own ValueError
    assert sorted(r.getMessage().split(" (of a batch")[0] for r in records) == ["request #0", "request #1"]
    assert "int(self.config[\"offset\"])" in caplog.text


def test_bad_json_parsed_inside_parsing_client_data_is_still_a_400_and_not_logged(caplog):
    bodies = [[1, 2, 3, 4], b'{"x": [1, 2', [0, 0, 0, 0]]
    with caplog.at_level(logging.ERROR, logger="handlers.engine.batch_engine"):
        with LocalServer.start(JsonParsingHandler, handler_config={"micro_batch_size": 3}) as server:
            responses = server.send(bodies)
    assert [r.status for r in responses] == [200, 400, 200]
    assert responses[1].body["type"] == "BadRequest"
    assert responses[1].body["message"].startswith("the body is not JSON: JSONDecodeError: ")
    assert server_errors(caplog) == []


@pytest.mark.parametrize("raised", [
    ValueError("cannot reshape array of size 4 into shape (3,3)"),
    json.JSONDecodeError("Expecting value", "{", 1),
    UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"),
    RuntimeError("shape '[2, 2]' is invalid for input of size 3"),
    KeyError("offset"),
])
def test_preprocess_error_makes_anything_but_a_request_error_a_500(raised):
    error = preprocess_error(raised)
    assert isinstance(error, InternalError) and error.status == 500
    assert error.message.startswith(f"preprocessing failed: {type(raised).__name__}")


@pytest.mark.parametrize("raised", [BadRequest("no"), PayloadTooLarge("big"), UnsupportedMediaType("gif")])
def test_preprocess_error_passes_a_request_error_through_unchanged(raised):
    assert preprocess_error(raised) is raised


@pytest.mark.parametrize("header", ["²", "٣", "9" * 5000, " 3x", "+3"])
def test_an_x_top_k_header_that_int_would_choke_on_is_a_400_naming_the_header(header):
    from handlers.ready_made.image_classifier import requested_top_k

    with pytest.raises(BadRequest, match="top_k"):
        requested_top_k(Request(b"", {"X-Top-K": header}), 5)


def test_an_x_top_k_header_of_plain_digits_is_read():
    from handlers.ready_made.image_classifier import requested_top_k

    assert requested_top_k(Request(b"", {"x-top-k": " 3 "}), 5) == 3


def test_a_tiff_with_premultiplied_grey_alpha_decodes_rather_than_failing_in_the_conversion():
    """Pillow opens a grey TIFF with associated alpha as mode "La", which it cannot convert to
    RGBA directly: that ValueError was a 400 for a valid image; now the image is read."""
    from handlers import ImageGeometry, ImageLimits, decode_image

    pixels = decode_image(grey_alpha_tiff_premultiplied(), ImageGeometry(resize=8, crop=8), ImageLimits())
    assert pixels.shape == (8, 8, 3) and pixels.dtype == np.uint8


def test_quickstart_x_past_float_range_is_a_400_not_a_500():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "examples" / "quickstart" / "handler.py"
    spec = importlib.util.spec_from_file_location("quickstart_handler", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(BadRequest, match='"x"'):
        module.QuickstartHandler().preprocess_one(Request({"id": 1, "x": [10**400, 1, 2, 3]}))


def grey_alpha_tiff_premultiplied() -> bytes:
    """An 8x8 grey + alpha TIFF whose ExtraSamples tag says the alpha is associated
    (premultiplied), which Pillow opens as mode "La" (it cannot write one itself)."""
    import io
    import struct

    from PIL import Image

    stream = io.BytesIO()
    Image.new("LA", (8, 8), (100, 128)).save(stream, "TIFF")
    data = bytearray(stream.getvalue())
    ifd = struct.unpack("<I", data[4:8])[0]
    for entry in range(ifd + 2, ifd + 2 + 12 * struct.unpack("<H", data[ifd:ifd + 2])[0], 12):
        if struct.unpack("<H", data[entry:entry + 2])[0] == 338:  # ExtraSamples: 2 → 1
            data[entry + 8:entry + 10] = struct.pack("<H", 1)
    assert Image.open(io.BytesIO(bytes(data))).mode == "La"
    return bytes(data)
