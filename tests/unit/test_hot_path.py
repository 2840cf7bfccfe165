"""No serial work per request on the server's main thread (issue 19, item 7): each answer is
encoded once, on the pool, to the bytes that go out; request bodies are decoded on the pool;
the tokenizer releases the GIL while it tokenises. Speed itself is measured in bench/hotpath.py."""

import json
import threading
from pathlib import Path

import pytest

from handlers import TextHandler
from handlers.core import responses as _responses
from handlers.core.responses import BINARY, JSON, TEXT, encoded
from handlers.servers.torchserve import BATCH_SIZE_HEADER
from handlers.testing import FakeContext, start_handler
from scripts.torchserve_instance import read_properties
from tests.unit.models import AffineHandler

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def affine():
    handler = start_handler(AffineHandler, handler_config={"micro_batch_size": 2})
    yield handler
    handler.close()


def test_each_answer_is_encoded_once_to_the_bytes_that_go_out(monkeypatch):
    calls = []
    real_dumps = json.dumps
    monkeypatch.setattr(_responses.json, "dumps", lambda *a, **k: calls.append(a) or real_dumps(*a, **k))
    answer = encoded({"y": [1.5, 2.0], "label": "cat"})
    assert answer.payload == b'{"y": [1.5, 2.0], "label": "cat"}' and answer.content_type == JSON
    assert len(calls) == 1  # not once as a check and again to send
    assert encoded("héllo").payload == "héllo".encode() and encoded("x").content_type == TEXT
    assert encoded(b"\x00\x01").payload == b"\x00\x01" and encoded(bytearray(b"a")).content_type == BINARY


def test_answers_json_cannot_carry_are_made_strict_before_the_one_encoding():
    answer = encoded({"score": float("nan"), "ids": (1, 2)})
    assert answer.payload == b'{"score": null, "ids": [1, 2]}'
    assert answer.value == {"score": None, "ids": [1, 2]}
    with pytest.raises(TypeError, match="no JSON form"):
        encoded({"when": object()})


def test_the_torchserve_adapter_returns_the_encoded_bytes_which_torchserve_sends_as_they_are(affine):
    """TorchServe's worker encodes anything but bytes itself, on its main thread, with
    json.dumps(indent=2): the adapter hands it the bytes made on the pool."""
    otf = pytest.importorskip("ts.protocol.otf_message_handler")
    context = FakeContext.for_batch(3)
    sent = affine.handle([{"body": [0, 0, 0, 0]}, {"body": b"oops"}, {"body": [1, 1, 1, 1]}], context)
    assert sent[0] == b"[1.0, 1.0, 1.0, 1.0]" and sent[2] == b"[3.0, 3.0, 3.0, 3.0]"
    assert json.loads(sent[1])["code"] == 400 and context.statuses() == [200, 400, 200]
    assert [context.get_response_content_type(i) for i in range(3)] == [JSON] * 3
    context.stopping_criteria = None  # what TorchServe's own context holds for a non-streaming model
    message = otf.create_predict_response(sent, {0: "a", 1: "b", 2: "c"}, "Prediction success", 200, context)
    assert all(body in message for body in sent)
    assert b'[\n  1.0' not in message  # TorchServe's own indent=2 encoding never ran
    assert context.get_response_headers(0)[BATCH_SIZE_HEADER] == "3"


@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-8"])
def test_json_bodies_left_in_bytes_by_the_server_are_decoded_on_the_pool(affine, content_type):
    """With decode_input_request=false (config.properties) TorchServe passes JSON bodies as
    bytes: the handler answers them as it answers bodies TorchServe decoded, malformed ones
    with their own 400, and no hook sees the difference."""
    context = FakeContext(request_headers=[{"Content-Type": content_type}] * 3)
    sent = affine.handle([{"body": b"[0, 0, 0, 0]"}, {"body": b"[0, 0,"}, {"body": [1, 1, 1, 1]}], context)
    assert context.statuses() == [200, 400, 200]
    assert json.loads(sent[0]) == [1.0] * 4 and json.loads(sent[2]) == [3.0] * 4
    assert "not valid JSON" in json.loads(sent[1])["message"]


def test_hooks_see_the_body_decoded_on_a_pool_thread_not_the_calling_one():
    seen = []

    class Recording(AffineHandler):
        def preprocess_one(self, request):
            seen.append((type(request.body), threading.current_thread() is threading.main_thread()))
            return super().preprocess_one(request)

    handler = start_handler(Recording)
    try:
        context = FakeContext(request_headers=[{"Content-Type": "application/json"}, {"Content-Type": "text/plain"}])
        handler.handle([{"body": b"[0, 0, 0, 0]"}, {"body": b"[1, 1, 1, 1]"}], context)
    finally:
        handler.close()
    assert sorted(seen, key=str) == sorted([(list, False), (str, False)], key=str)


def test_the_config_lets_the_handler_decode_bodies():
    assert read_properties(ROOT / "config.properties")["decode_input_request"] == "false"
    from handlers.torchserve_config import torchserve_properties

    assert torchserve_properties()["decode_input_request"] == "false"


def test_the_text_handler_tokenises_with_the_call_that_releases_the_gil():
    """tokenizers' encode holds the GIL while it works; encode_batch releases it (the pool and
    the model thread run meanwhile). Each request is still tokenised alone: its own error."""
    calls = []

    class Tokenizer:
        def encode(self, text):
            raise AssertionError("encode holds the GIL")

        def encode_batch(self, texts):
            calls.append(list(texts))
            if texts == ["boom"]:
                raise ValueError("cannot tokenise")
            return [type("Encoding", (), {"ids": [1, len(t), 2]})() for t in texts]

    class Echo(TextHandler):
        def setup(self, model_dir):
            self.tokenizer, self.pad_id = Tokenizer(), 0

        def load_model(self, model_dir, device):
            import torch

            return torch.nn.Identity()

        def infer(self, batch):
            return batch["input_ids"]

    handler = start_handler(Echo, handler_config={"micro_batch_size": 2})
    try:
        context = FakeContext(request_headers=[{"Content-Type": "text/plain"}] * 3)
        sent = handler.handle([{"body": "abc"}, {"body": "boom"}, {"body": "hello"}], context)
    finally:
        handler.close()
    assert context.statuses() == [200, 400, 200]
    assert json.loads(sent[0]) == [1, 3, 2] and json.loads(sent[2]) == [1, 5, 2]
    assert sorted(calls) == [["abc"], ["boom"], ["hello"]]
