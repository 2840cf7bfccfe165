"""upgrade() on TorchServe's real stock vision handlers, in-process: ``ImageClassifier`` from
``ts.torch_handler.image_classifier`` in one line, and users' subclasses of ``VisionHandler``
and ``ImageClassifier``. Each request gets the stock handler's answer for it; an upload that is
not an image is that request's 400 while its batch-mates get their answers (on stock
TorchServe it fails the whole batch)."""

from __future__ import annotations

import pytest

from tests.vision.conftest import REASON

pytest.importorskip("torchvision", reason=REASON)
pytest.importorskip("captum", reason=REASON)

import torch  # noqa: E402
from torchvision import transforms  # noqa: E402
from ts.torch_handler.image_classifier import ImageClassifier  # noqa: E402
from ts.torch_handler.image_segmenter import ImageSegmenter  # noqa: E402
from ts.torch_handler.object_detector import ObjectDetector  # noqa: E402
from ts.torch_handler.vision_handler import VisionHandler  # noqa: E402

from handlers import upgrade  # noqa: E402
from handlers.testing import FakeContext, run_batch  # noqa: E402
from tests.vision.stock_models import (  # noqa: E402
    DETECTOR_MODULE, MODEL_MODULE, NOT_AN_IMAGE, PHOTOS, SEGMENTER_MODULE, assert_same_answers, photo, write_detector_dir,
    write_model_dir, write_segmenter_dir,
)


class GreyThumbnails(VisionHandler):
    """A user's VisionHandler: its own transforms and postprocess (the top class's index)."""

    image_processing = transforms.Compose([
        transforms.Grayscale(num_output_channels=3), transforms.Resize(160), transforms.CenterCrop(224),
        transforms.ToTensor(),
    ])

    def postprocess(self, data):
        return [{"class": int(row.argmax())} for row in data]


class TopThree(ImageClassifier):
    """A user's ImageClassifier: three classes instead of five."""

    topk = 3


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_model_dir(tmp_path_factory.mktemp("stock_vision"))


@pytest.fixture(autouse=True)
def _model_file_importable(model_dir, monkeypatch):
    # TorchServe's worker runs with the model folder on sys.path; BaseHandler imports the model file by name.
    monkeypatch.syspath_prepend(str(model_dir))


def context_for(model_dir, handler_config=None):
    return FakeContext(
        model_yaml_config={"handler": dict(handler_config or {"micro_batch_size": 2})},
        system_properties={"model_dir": str(model_dir), "limit_max_image_pixels": True},
        manifest={"model": {"modelName": "tiny", "modelFile": f"{MODEL_MODULE}.py", "serializedFile": "weights.pt"}},
    )


def stock_handle(handler_class, model_dir, bodies):
    """What stock TorchServe's worker answers to ``bodies`` as one batch."""
    stock = handler_class()
    stock.initialize(context_for(model_dir))
    return stock.handle([{"body": body} for body in bodies], FakeContext.for_batch(len(bodies)))


def test_one_line_upgrades_the_stock_image_classifier(model_dir):
    handler = upgrade(ImageClassifier)()
    handler.initialize(context_for(model_dir))
    try:
        assert isinstance(handler, ImageClassifier) and handler.mapping is not None  # its own initialize ran
        responses, context = run_batch(handler, PHOTOS, [{"Content-Type": "image/jpeg"}] * len(PHOTOS))
        assert context.statuses() == [200] * len(PHOTOS)
        stock = stock_handle(ImageClassifier, model_dir, PHOTOS)
        assert len({tuple(answer) for answer in stock}) > 1  # the photos are told apart: the check means something
        assert_same_answers(responses, stock)
        assert_same_answers(responses, [stock_handle(ImageClassifier, model_dir, [p])[0] for p in PHOTOS])
    finally:
        handler.close()


def test_an_upload_that_is_not_an_image_is_its_own_400_and_its_batch_mates_get_their_answers(model_dir):
    handler = upgrade(ImageClassifier)()
    handler.initialize(context_for(model_dir))
    try:
        bodies = PHOTOS[:2] + [NOT_AN_IMAGE] + PHOTOS[2:]
        responses, context = run_batch(handler, bodies, [{"Content-Type": "image/jpeg"}] * len(bodies))
        assert context.statuses() == [200, 200, 400, 200, 200, 200]
        assert responses[2]["code"] == 400 and "UnidentifiedImageError" in responses[2]["message"], responses[2]
        assert_same_answers(responses[:2] + responses[3:], stock_handle(ImageClassifier, model_dir, PHOTOS))
        # Stock TorchServe: the one upload fails the whole batch (the worker answers all of it with 503).
        with pytest.raises(Exception, match="cannot identify image file"):
            stock_handle(ImageClassifier, model_dir, bodies)
    finally:
        handler.close()


@pytest.mark.parametrize("handler_class", [GreyThumbnails, TopThree], ids=lambda c: c.__name__)
def test_a_users_subclass_of_a_stock_vision_handler_upgrades_the_same_way(model_dir, handler_class):
    handler = upgrade(handler_class)()
    handler.initialize(context_for(model_dir, {"micro_batch_size": 3}))
    try:
        bodies = [NOT_AN_IMAGE] + PHOTOS
        responses, context = run_batch(handler, bodies, [{"Content-Type": "image/jpeg"}] * len(bodies))
        assert context.statuses() == [400] + [200] * len(PHOTOS)
        assert_same_answers(responses[1:], stock_handle(handler_class, model_dir, PHOTOS))
        if handler_class is TopThree:
            assert all(len(answer) == 3 for answer in responses[1:])
    finally:
        handler.close()


def test_explain_goes_to_the_stock_handlers_captum_path(model_dir):
    """``explain: True`` on the batch: VisionHandler's Integrated Gradients (captum), whole batch, as before."""
    handler = upgrade(ImageClassifier)()
    handler.initialize(context_for(model_dir))
    try:
        context = FakeContext.for_batch(1, {"explain": "True"})
        [attributions] = handler.handle([{"body": PHOTOS[0]}], context)
        assert torch.tensor(attributions).shape == (3, 224, 224)
    finally:
        handler.close()


def test_the_stock_object_detector_gets_its_lists_of_boxes_per_request(tmp_path, monkeypatch):
    """ObjectDetector's model returns a list (a dict of boxes per image) and its postprocess
    iterates over that list: each request's postprocess gets a list of its own entry."""
    model_dir = write_detector_dir(tmp_path)
    monkeypatch.syspath_prepend(str(model_dir))
    context = FakeContext(
        model_yaml_config={"handler": {"micro_batch_size": 2}}, system_properties={"model_dir": str(model_dir)},
        manifest={"model": {"modelName": "detector", "modelFile": f"{DETECTOR_MODULE}.py", "serializedFile": "weights.pt"}},
    )
    photos = [photo(10 + i, (96, 64)) for i in range(3)]  # one size: stock stacks the batch's images
    stock = ObjectDetector()
    stock.initialize(context)
    expected = stock.handle([{"body": p} for p in photos], FakeContext.for_batch(len(photos)))
    handler = upgrade(ObjectDetector)()
    handler.initialize(context)
    try:
        bodies = photos[:1] + [NOT_AN_IMAGE] + photos[1:]
        responses, served = run_batch(handler, bodies, [{"Content-Type": "image/jpeg"}] * len(bodies))
        assert served.statuses() == [200, 400, 200, 200]
        assert responses[:1] + responses[2:] == expected  # per image: no float noise from the batch
        assert {box["score"] for answer in expected for box in answer} != {0.9}  # the photos' own boxes count
    finally:
        handler.close()


def test_the_stock_image_segmenter_gets_its_dict_output_per_request(tmp_path, monkeypatch):
    """ImageSegmenter's model returns ``{"out": N×K×H×W}`` and its postprocess reads ``data["out"]``:
    each request's postprocess gets ``{"out": 1×K×H×W}``, its own map."""
    import numpy as np

    model_dir = write_segmenter_dir(tmp_path)
    monkeypatch.syspath_prepend(str(model_dir))
    context = FakeContext(
        model_yaml_config={"handler": {"micro_batch_size": 2}}, system_properties={"model_dir": str(model_dir)},
        manifest={"model": {"modelName": "segmenter", "modelFile": f"{SEGMENTER_MODULE}.py",
                            "serializedFile": "weights.pt"}},
    )
    stock = ImageSegmenter()
    stock.initialize(context)
    expected = stock.handle([{"body": p} for p in PHOTOS], FakeContext.for_batch(len(PHOTOS)))
    handler = upgrade(ImageSegmenter)()
    handler.initialize(context)
    try:
        bodies = PHOTOS[:3] + [NOT_AN_IMAGE] + PHOTOS[3:]
        responses, served = run_batch(handler, bodies, [{"Content-Type": "image/jpeg"}] * len(bodies))
        assert served.statuses() == [200, 200, 200, 400, 200, 200]
        ours = np.array(responses[:3] + responses[4:])
        assert ours.shape == (len(PHOTOS), 28, 28, 2)  # per pixel: [class, probability]
        assert np.allclose(ours, np.array(expected), rtol=1e-4, atol=1e-6)
        assert len(np.unique(ours[..., 0])) > 1  # the classes vary: the check means something
    finally:
        handler.close()
