"""upgrade(MyTorchServeHandler): a real ts BaseHandler subclass, its hooks unchanged, run by the
engine: per-request preprocess and postprocess, micro-batched inference, errors per request,
TorchServe's context kept, and a whole-batch preprocess detected and called on whole micro-batches."""

from __future__ import annotations

import json

import pytest
import torch

from ts.torch_handler.base_handler import BaseHandler
from ts.utils.util import PredictionException

from handlers import Microbatched, upgrade
from handlers.testing import FakeContext, run_batch

from ..legacy_mar import Doubler  # y = 2x + 1, by hand: 4.0 -> 9.0


def write_model(model_dir):
    torch.jit.save(torch.jit.script(Doubler()), str(model_dir / "model.pt"))


class RowHandler(BaseHandler):
    """A typical TorchServe handler: preprocess loops over the rows and stacks."""

    def preprocess(self, data):
        rows = []
        for row in data:
            body = row.get("data") or row.get("body")
            if isinstance(body, (bytes, bytearray)):
                body = json.loads(body)
            if "x" not in body:
                raise PredictionException("the request has no field 'x'", 422)
            rows.append(torch.tensor(body["x"], dtype=torch.float32))
        return torch.stack(rows)

    def postprocess(self, data):
        return [{"y": row.tolist()} for row in data]


class BatchMeanHandler(RowHandler):
    """Not row by row: each row is centred on the batch's mean."""

    def preprocess(self, data):
        batch = super().preprocess(data)
        return batch - batch.mean(dim=0, keepdim=True)


def context_for(model_dir, handler_config=None):
    return FakeContext(
        model_yaml_config={"handler": dict(handler_config or {"micro_batch_size": 2})},
        system_properties={"model_dir": str(model_dir)},
        manifest={"model": {"modelName": "doubler", "serializedFile": "model.pt"}},
    )


def started(handler_class, model_dir, handler_config=None):
    write_model(model_dir)
    handler = handler_class()
    handler.initialize(context_for(model_dir, handler_config))
    return handler


def stock_answer(model_dir, bodies):
    """What stock TorchServe's handle gives this batch."""
    write_model(model_dir)
    stock = RowHandler()
    context = context_for(model_dir)
    stock.initialize(context)
    return stock.handle([{"body": body} for body in bodies], FakeContext.for_batch(len(bodies)))


BODIES = [{"x": [1.0, 2.0]}, {"x": [4.0, 0.0]}, {"x": [-1.0, 3.0]}, {"x": [0.5, 0.5]}]


def test_upgrade_keeps_the_class_and_its_hooks():
    Upgraded = upgrade(RowHandler)
    assert issubclass(Upgraded, RowHandler) and issubclass(Upgraded, BaseHandler)
    assert issubclass(Upgraded, Microbatched)
    assert Upgraded.__name__ == "RowHandler"
    assert Upgraded.preprocess is RowHandler.preprocess
    assert upgrade(Upgraded) is Upgraded


def test_upgrade_refuses_what_is_not_a_torchserve_handler():
    with pytest.raises(TypeError, match="has no initialize, preprocess, inference, postprocess"):
        upgrade(dict)


def test_each_request_gets_the_stock_handlers_answer_alone(tmp_path):
    handler = started(upgrade(RowHandler), tmp_path)
    try:
        responses, context = run_batch(handler, BODIES)
        assert context.statuses() == [200] * 4
        assert responses == [{"y": [3.0, 5.0]}, {"y": [9.0, 1.0]}, {"y": [-1.0, 7.0]}, {"y": [2.0, 2.0]}]
        assert responses == [stock_answer(tmp_path, [body])[0] for body in BODIES]
        assert responses == stock_answer(tmp_path, BODIES)  # row by row: the batch changes nothing
    finally:
        handler.close()


def test_a_request_missing_a_field_gets_its_own_error_and_its_batch_mates_their_answers(tmp_path):
    handler = started(upgrade(RowHandler), tmp_path)
    try:
        bad = {"z": [1.0, 2.0]}
        responses, context = run_batch(handler, BODIES[:2] + [bad] + BODIES[2:])
        assert context.statuses() == [200, 200, 422, 200, 200]
        assert responses[2]["code"] == 422 and "no field 'x'" in responses[2]["message"]
        good = responses[:2] + responses[3:]
        assert good == [stock_answer(tmp_path, [body])[0] for body in BODIES]
        # Stock TorchServe: the one bad request fails the whole batch.
        with pytest.raises(PredictionException):
            stock_answer(tmp_path, BODIES[:2] + [bad])
    finally:
        handler.close()


def test_a_plain_exception_in_preprocess_is_that_requests_500(tmp_path):
    handler = started(upgrade(RowHandler), tmp_path)
    try:
        responses, context = run_batch(handler, [BODIES[0], {"x": "not numbers"}, BODIES[1]])
        assert context.statuses() == [200, 500, 200]
        assert responses[0] == {"y": [3.0, 5.0]} and responses[2] == {"y": [9.0, 1.0]}
    finally:
        handler.close()


def test_torchserve_context_attributes_are_kept(tmp_path):
    handler = started(upgrade(RowHandler), tmp_path)
    try:
        assert handler.context is not None and handler.context.system_properties["model_dir"] == str(tmp_path)
        assert handler.manifest["model"]["serializedFile"] == "model.pt"
        assert handler.model_pt_path == str(tmp_path / "model.pt")
        assert handler.device == torch.device("cpu")
        assert handler.model is not None and handler.initialized
        assert handler.mapping is None  # BaseHandler's labels (no index_to_name.json)
        _, context = run_batch(handler, BODIES[:2])
        assert handler.context is context  # TorchServe's habit: the batch's context
        assert context.metrics.named("HandlerTime")
    finally:
        handler.close()


def test_a_whole_batch_preprocess_is_detected_and_called_on_whole_micro_batches(tmp_path):
    handler = started(upgrade(BatchMeanHandler), tmp_path, {"micro_batch_size": 2, "pool_size": 1})
    try:
        run_batch(handler, BODIES[:2])  # the evidence: two unlike rows
        assert handler._row_by_row.proven_not
        responses, context = run_batch(handler, BODIES)
        assert context.statuses() == [200] * 4
        write_model(tmp_path)
        stock = BatchMeanHandler()
        stock.initialize(context_for(tmp_path))
        expected = []
        for pair in (BODIES[:2], BODIES[2:]):  # micro-batches of 2, as stock TorchServe with batchSize 2
            expected += stock.handle([{"body": body} for body in pair], FakeContext.for_batch(2))
        assert responses == expected
    finally:
        handler.close()


def test_a_failing_request_is_isolated_when_preprocess_takes_the_whole_micro_batch(tmp_path):
    handler = started(upgrade(BatchMeanHandler), tmp_path, {"micro_batch_size": 4})
    try:
        run_batch(handler, BODIES[:2])
        assert handler._row_by_row.proven_not
        responses, context = run_batch(handler, [BODIES[0], {"z": 1}, BODIES[1]])
        assert context.statuses() == [200, 422, 200]
        assert responses[1]["code"] == 422
    finally:
        handler.close()


def test_a_preprocess_that_does_not_give_one_row_is_not_taken_row_by_row(tmp_path):
    class Flat(RowHandler):
        def preprocess(self, data):
            return super().preprocess(data).reshape(-1, 2)[0] if len(data) == 1 else super().preprocess(data)

    handler = started(upgrade(Flat), tmp_path)
    try:
        responses, context = run_batch(handler, BODIES[:2])
        assert handler._row_by_row.proven_not
        assert context.statuses() == [200, 200]
        assert responses == [{"y": [3.0, 5.0]}, {"y": [9.0, 1.0]}]
    finally:
        handler.close()


def test_the_mixin_is_the_same_thing(tmp_path):
    class Mine(Microbatched, RowHandler):
        pass

    handler = started(Mine, tmp_path)
    try:
        responses, context = run_batch(handler, BODIES[:2])
        assert responses == [{"y": [3.0, 5.0]}, {"y": [9.0, 1.0]}]
    finally:
        handler.close()


def test_describe_goes_to_the_handlers_own_handle(tmp_path):
    class Described(RowHandler):
        def describe_handle(self):
            return {"about": "doubler"}

    handler = started(upgrade(Described), tmp_path)
    try:
        context = FakeContext.for_batch(1, {"describe": "True"})
        assert handler.handle([{"body": BODIES[0]}], context) == [{"about": "doubler"}]
    finally:
        handler.close()


def ship_samples(model_dir, bodies):
    from handlers.core.self_test import SAMPLES_DIR, SAMPLES_INDEX

    folder = model_dir / SAMPLES_DIR
    folder.mkdir()
    for idx, body in enumerate(bodies):
        (folder / f"{idx}.json").write_text(json.dumps(body))
    (folder / SAMPLES_INDEX).write_text(json.dumps([{"file": f"{idx}.json"} for idx in range(len(bodies))]))


def test_the_start_up_self_test_runs_on_shipped_samples(tmp_path):
    ship_samples(tmp_path, BODIES)
    handler = started(upgrade(RowHandler), tmp_path)
    try:
        assert handler.self_test is not None and handler.self_test.distinct >= 2
        assert not handler._row_by_row.proven_not
    finally:
        handler.close()


def test_shipped_samples_show_a_whole_batch_preprocess_before_any_request(tmp_path):
    from handlers.engine.settings import ConfigError

    ship_samples(tmp_path, BODIES)
    # Its answers depend on the batch-mates: the self-test's batch-invariance check refuses it,
    # naming the difference, unless its tolerance is raised.
    with pytest.raises(ConfigError, match="sample"):
        started(upgrade(BatchMeanHandler), tmp_path)


@pytest.mark.parametrize("handler_file", [
    "from old_handler import OldHandler\nfrom handlers import upgrade\n\nOldHandler = upgrade(OldHandler)\n",
    "from old_handler import OldHandler\nfrom handlers import upgrade\n\nNewHandler = upgrade(OldHandler)\n",
    "from old_handler import OldHandler\nfrom handlers import Microbatched\n\n\n"
    "class NewHandler(Microbatched, OldHandler):\n    pass\n",
])
def test_a_handler_file_that_upgrades_an_imported_handler_defines_one_class(tmp_path, monkeypatch, handler_file):
    """TorchServe's rule: the handler file defines exactly one class; the upgraded one is it."""
    from handlers.core.handler_file import load_handler_class

    (tmp_path / "old_handler.py").write_text(
        "from ts.torch_handler.base_handler import BaseHandler\n\n\nclass OldHandler(BaseHandler):\n    pass\n")
    (tmp_path / "new_handler.py").write_text(handler_file)
    monkeypatch.syspath_prepend(str(tmp_path))
    handler_class = load_handler_class(str(tmp_path / "new_handler.py"))
    assert issubclass(handler_class, Microbatched) and handler_class.__name__ in ("OldHandler", "NewHandler")


class PillowHandler(RowHandler):
    """Reads each row as an image with Pillow, as TorchServe's VisionHandler does (without torchvision)."""

    def preprocess(self, data):
        import io

        import numpy as np
        from PIL import Image

        rows = []
        for row in data:
            image = Image.open(io.BytesIO(row.get("data") or row.get("body")))
            pixels = np.asarray(image.convert("RGB").resize((2, 1)), dtype=np.float32)  # loads the whole file
            rows.append(torch.from_numpy(pixels[0, :, 0].copy()))
        return torch.stack(rows)


def jpeg(colour) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_data_a_parser_refuses_is_that_requests_400_not_a_500(tmp_path):
    """What TorchServe's own parsers raise on a client's bytes (Pillow on a non-image or a
    truncated file, json on broken JSON) is the client's 400; stock TorchServe fails the batch."""
    handler = started(upgrade(PillowHandler), tmp_path, {"micro_batch_size": 4})
    try:
        good = jpeg((200, 10, 10))
        headers = [{"Content-Type": "application/octet-stream"}] * 3
        responses, context = run_batch(handler, [good, b"not an image", good[: len(good) // 2]], headers)
        assert context.statuses() == [200, 400, 400]
        assert "UnidentifiedImageError" in responses[1]["message"]
        assert "truncated" in responses[2]["message"].lower()
        assert responses[0] == stock_answer_of(PillowHandler, tmp_path, [good])[0]
        with pytest.raises(OSError):
            stock_answer_of(PillowHandler, tmp_path, [good, b"not an image"])
    finally:
        handler.close()
    handler = started(upgrade(RowHandler), tmp_path)
    try:
        headers = [{"Content-Type": "application/octet-stream"}] * 2
        responses, context = run_batch(handler, [b'{"x": [1.0, 2.0]}', b'{"x": [1.0,'], headers)
        assert context.statuses() == [200, 400]
        assert "JSONDecodeError" in responses[1]["message"]
    finally:
        handler.close()


def stock_answer_of(handler_class, model_dir, bodies):
    write_model(model_dir)
    stock = handler_class()
    stock.initialize(context_for(model_dir))
    return stock.handle([{"body": body} for body in bodies], FakeContext.for_batch(len(bodies)))


class ListOutputHandler(RowHandler):
    """Like torchvision's detection models under TorchServe's ObjectDetector: inference returns a
    list with one dict of tensors per row, and postprocess iterates over that list."""

    def inference(self, data, *args, **kwargs):
        output = super().inference(data)
        return [{"y": row, "top": row.argmax(dim=0, keepdim=True)} for row in output]

    def postprocess(self, data):
        return [{"y": row["y"].tolist(), "top": int(row["top"][0])} for row in data]


def test_a_list_output_reaches_postprocess_as_a_list_of_the_requests_entry(tmp_path):
    handler = started(upgrade(ListOutputHandler), tmp_path)
    try:
        responses, context = run_batch(handler, BODIES)
        assert context.statuses() == [200] * 4
        assert responses == stock_answer_of(ListOutputHandler, tmp_path, BODIES)
        assert responses[0] == {"y": [3.0, 5.0], "top": 1}
    finally:
        handler.close()
