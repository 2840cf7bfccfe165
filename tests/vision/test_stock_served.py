"""TorchServe's real stock ``image_classifier`` on a real TorchServe, beside the same handler
upgraded in one line (``upgraded_image_classifier.py``), both archived by the real
torch-model-archiver with the same model file, weights and labels: the upgraded one answers each
photo as stock does, and a batch with an upload that is not an image gets a 400 for it and 200s
for its batch-mates, where stock fails the whole batch. TorchServe runs from this venv (its
workers too): the one with torchvision; one per session (``served``, tests/vision/stock_torchserve.py)."""

from __future__ import annotations

import pytest

from tests.vision.conftest import REASON

pytest.importorskip("torchvision", reason=REASON)
pytest.importorskip("captum", reason=REASON)

from tests.vision.stock_models import NOT_AN_IMAGE, PHOTOS, assert_same_answers  # noqa: E402
from tests.vision.stock_torchserve import post_together  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def test_the_upgraded_stock_handler_answers_each_photo_as_stock_does(served):
    stock = [post_together(served, "stock", [p])[0] for p in PHOTOS]
    assert [status for status, _ in stock] == [200] * len(PHOTOS)
    assert len({tuple(answer) for _, answer in stock}) > 1  # the photos are told apart
    ours = post_together(served, "upgraded", PHOTOS)
    assert [status for status, _ in ours] == [200] * len(PHOTOS)
    assert_same_answers([answer for _, answer in ours], [answer for _, answer in stock])


def test_an_upload_that_is_not_an_image_fails_alone_upgraded_and_the_whole_batch_on_stock(served):
    bodies = PHOTOS[:2] + [NOT_AN_IMAGE] + PHOTOS[2:]
    ours = post_together(served, "upgraded", bodies)
    assert [status for status, _ in ours] == [200, 200, 400, 200, 200, 200], ours
    assert ours[2][1]["code"] == 400 and "UnidentifiedImageError" in ours[2][1]["message"]
    stock_alone = [post_together(served, "stock", [p])[0][1] for p in PHOTOS]
    assert_same_answers([answer for _, answer in ours[:2] + ours[3:]], stock_alone)
    # Stock TorchServe: the handler raises for the whole batch, and every request of it fails.
    stock = post_together(served, "stock", bodies)
    assert all(status >= 500 for status, _ in stock), stock
