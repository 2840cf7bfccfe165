"""Issue 29's contract through the session's real TorchServe: the flat detector
(examples/flat_detector, one (K, 7) tensor of boxes per micro-batch, K set by the images) answers
varied images sent concurrently, each request with its own boxes, never a batch-mate's: without a
declaration one request per model call, with ``batch_dims: {output: {index_column: 0}}``
micro-batches called together. The same checks on Ray Serve are in test_ray_serve.py, on that
module's cluster (with the helpers here). The long version: ``python -m bench.detector_contract``.

Both fail on the code before the fix (0442939): without the declaration the one-box samples
make the self-test take dimension 0 as the batch (500 SplitFailed, and a batch-mate's boxes in a
200 when a micro-batch holds as many boxes as images); the declaration is refused at archive time.
"""

import pytest

from bench.detector_contract import check, expected_answers, images, send_all, settled, torchserve_calls

pytestmark = pytest.mark.integration
REQUESTS = 120
CONCURRENCY = 32


def contract_run(url: str, headers: dict, model_calls, settle_s: float, seed: int = 11) -> tuple:
    """:data:`REQUESTS` varied images (0 to 5 boxes) from :data:`CONCURRENCY` clients, each answer
    checked against the model's on that image alone: ``(tally, model calls made or None)``."""
    pngs = images(REQUESTS, seed=seed)
    expected = expected_answers(pngs)
    before = model_calls()
    answers, _ = send_all(url, pngs, {"Content-Type": "image/png", **headers}, CONCURRENCY)
    after = settled(model_calls, before, settle_s, timeout_s=60.0)
    return check(answers, expected), None if after is None else after - before


def assert_each_request_got_its_own_boxes(tally) -> None:
    assert tally.wrong == 0 and tally.correct == REQUESTS, (
        f"{tally.correct} of {REQUESTS} requests got their own boxes; {tally.wrong} got a 200 with other boxes "
        f"(e.g. {tally.wrong_examples[:1]}); other answers: {dict(tally.others)}")


def assert_one_call_per_request(calls, requests: int = REQUESTS) -> None:
    assert calls is not None and calls >= requests, f"{calls} model calls for {requests} requests: expected one each"


def assert_called_together(calls, requests: int = REQUESTS) -> None:
    assert calls is not None and calls <= requests // 2, (
        f"{calls} model calls for {requests} requests: micro-batches were not called together")


def test_without_a_declaration_each_request_gets_its_own_boxes_on_torchserve(torchserve):
    """Regression (issue 29): request 159's three boxes went to requests 149, 159 and 160."""
    tally, calls = contract_run(f"{torchserve.inference_url}/predictions/flat_detector", torchserve.auth(),
                                torchserve_calls(torchserve, "flat_detector"), settle_s=1.0)
    assert_each_request_got_its_own_boxes(tally)
    assert_one_call_per_request(calls)


def test_with_the_declaration_micro_batches_are_called_together_on_torchserve(torchserve, flat_detector_declared):
    if flat_detector_declared.refused:
        pytest.fail(f"the declared config was refused: {flat_detector_declared.refused}")
    name = flat_detector_declared.name
    tally, calls = contract_run(f"{torchserve.inference_url}/predictions/{name}", torchserve.auth(),
                                torchserve_calls(torchserve, name), settle_s=1.0)
    assert_each_request_got_its_own_boxes(tally)
    assert_called_together(calls)
