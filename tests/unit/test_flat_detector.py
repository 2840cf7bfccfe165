"""The flat detector example (examples/flat_detector) without a server: the model's answers by
hand, its samples, and issue 29's contract through the handler core (``LocalServer``).

The model returns ONE (K, 7) tensor per micro-batch, ``[batch_index, x0, y0, x1, y1, score,
label]`` per box, K set by the images. Its samples hold one box each, so at start-up K equals the
micro-batch size at every size tried. The contract: without a declaration each request is
answered by a model call of its own, ``postprocess_one`` getting that call's whole (k, 7) output;
with ``batch_dims: {output: {index_column: 0}}`` micro-batches are called together and each
request gets its own rows, column 0 set to 0. The two contract tests fail on the code before the
fix (0442939): 500 SplitFailed or a batch-mate's boxes without the declaration, the declaration
refused at start-up.
"""

from pathlib import Path

import numpy as np
import pytest
import torch

from bench.detector_contract import DECLARATION, example, expected_answers, images, same_answer
from handlers import ModelFiles, Request
from handlers.packaging.archive import build_artefacts, load_spec
from handlers.testing import LocalServer

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "flat_detector"
SPEC = load_spec(ROOT / "archiver_configs" / "flat_detector.yaml")
REQUESTS = 120
BATCH = 16  # as the config's batchSize; micro_batch_size 8


@pytest.fixture(scope="module")
def model():
    build_artefacts(SPEC)
    detector = example("model").FlatDetector()
    detector.load_state_dict(torch.load(SPEC.serialized_file, weights_only=True))
    return detector.eval()


def picture(*cells):
    """A (1, 1, 32, 32) image: black, each (row, column, brightness 0-255) a bright 4×4 cell."""
    pixels = torch.zeros(32, 32)
    for row, column, brightness in cells:
        pixels[row * 4:(row + 1) * 4, column * 4:(column + 1) * 4] = brightness / 255.0
    return pixels[None, None]


def test_the_detector_marks_each_bright_cell_as_one_row_of_the_flat_output(model):
    with torch.no_grad():
        output = model(torch.cat([picture((1, 2, 255), (5, 5, 150)), picture(), picture((7, 0, 204))]))
    assert output.shape == (3, 7)
    expected = torch.tensor([[0, 8, 4, 12, 8, 1.0, 1], [0, 20, 20, 24, 24, 150 / 255, 0],
                             [2, 0, 28, 4, 32, 204 / 255, 1]])
    torch.testing.assert_close(output, expected)
    with torch.no_grad():
        assert model(picture()).shape == (0, 7)


def test_every_sample_holds_exactly_one_box(model):
    """Issue 29's set-up: one box per sample, so K == micro-batch size in every self-test call."""
    from PIL import Image

    samples = sorted(EXAMPLE.glob("samples/*.png"))
    assert len(samples) >= 3
    for path in samples:
        pixels = torch.from_numpy(np.array(Image.open(path).convert("L"))).float() / 255.0
        with torch.no_grad():
            assert model(pixels[None, None]).shape == (1, 7), path.name


def test_the_varied_images_hold_zero_to_five_boxes():
    counts = [len(answer["boxes"]) for answer in expected_answers(images(REQUESTS, seed=1))]
    assert set(counts) == {0, 1, 2, 3, 4, 5}


class CheckedDetectorHandler(example("handler").FlatDetectorHandler):
    """The example's handler, refusing (a 500 for that request) any part that is not a (k, 7)
    tensor whose column 0 is all 0: the form the contract promises ``postprocess_one``."""

    def postprocess_one(self, output, item):
        if not (isinstance(output, torch.Tensor) and output.dim() == 2 and output.shape[1] == 7
                and bool((output[:, 0] == 0).all())):
            got = f"{list(output.shape)} {output.tolist()}" if isinstance(output, torch.Tensor) else repr(output)
            raise RuntimeError(f"postprocess_one got {got:.200}: expected this request's (k, 7) rows, column 0 all 0")
        return super().postprocess_one(output, item)


def served(handler_config: dict, handler_class: type = example("handler").FlatDetectorHandler) -> LocalServer:
    """The example as archived (its config's handler section, its one-box samples), plus
    ``handler_config``."""
    files = ModelFiles(model_file=str(SPEC.model_file), serialized_file=str(SPEC.serialized_file))
    samples = [path.read_bytes() for path in sorted(EXAMPLE.glob("samples/*.png"))]
    build_artefacts(SPEC)
    return LocalServer.start(handler_class, model_dir=str(ROOT), model_files=files, samples=samples,
                             handler_config={**SPEC.model_config["handler"], **handler_config})


def answered_in_batches(server: LocalServer, pngs: list) -> tuple:
    """Every image sent in batches of :data:`BATCH`, as TorchServe hands them over: the responses
    in order and the model calls made."""
    responses, calls = [], 0
    for start in range(0, len(pngs), BATCH):
        batch = [Request(png, {"Content-Type": "image/png"}) for png in pngs[start:start + BATCH]]
        answered, report = server.handler.respond(batch)
        responses += answered
        calls += report.model_calls
    return responses, calls


def contract_breaches(responses: list, expected: list) -> list:
    """Each request that did not get a 200 with its own boxes: (index, status, what it got)."""
    return [(i, r.status, r.body if r.status != 200 else r.body["boxes"])
            for i, (r, want) in enumerate(zip(responses, expected)) if r.status != 200 or not same_answer(r.body, want)]


def test_without_a_declaration_each_request_gets_its_own_boxes_from_a_model_call_of_its_own():
    """Regression (issue 29): with one-box samples the self-test learned dimension 0 as the
    batch; a micro-batch holding as many boxes as images was then cut row by row (a batch-mate's
    boxes in a 200), any other got 500 SplitFailed."""
    pngs = images(REQUESTS, seed=1)
    expected = expected_answers(pngs)
    with served({}) as server:
        responses, calls = answered_in_batches(server, pngs)
    breaches = contract_breaches(responses, expected)
    assert not breaches, f"{len(breaches)} of {REQUESTS} requests without their own boxes, e.g. {breaches[:3]}"
    assert calls >= REQUESTS, f"{calls} model calls for {REQUESTS} requests: expected one call per request"


def test_a_micro_batch_holding_as_many_boxes_as_images_is_not_cut_row_by_row():
    """Regression (issue 29), the wrong 200s: 8 images holding 8 boxes in all (3, 0, 1, 0, 2, 0, 1,
    1) looked like one box each, and each request got the row at its own position."""
    place = example("images").detector_png
    rng = np.random.default_rng(5)
    counts = [3, 0, 1, 0, 2, 0, 1, 1]
    pngs = [place([(i, column, 200) for column in range(count)], rng) for i, count in enumerate(counts)]
    expected = expected_answers(pngs)
    assert [len(answer["boxes"]) for answer in expected] == counts
    with served({}) as server:
        responses, _ = server.handler.respond([Request(png, {"Content-Type": "image/png"}) for png in pngs])
    breaches = contract_breaches(responses, expected)
    assert not breaches, f"{len(breaches)} of 8 requests without their own boxes: {breaches}"


def test_with_the_declaration_micro_batches_are_called_together_and_each_request_gets_its_own_rows():
    pngs = images(REQUESTS, seed=2)
    expected = expected_answers(pngs)
    with served({"batch_dims": DECLARATION}) as server:
        responses, calls = answered_in_batches(server, pngs)
    breaches = contract_breaches(responses, expected)
    assert not breaches, f"{len(breaches)} of {REQUESTS} requests without their own boxes, e.g. {breaches[:3]}"
    assert calls <= REQUESTS // 2, (f"{calls} model calls for {REQUESTS} requests: micro-batches were not "
                                     f"called together")


@pytest.mark.parametrize("declared", [False, True], ids=["no declaration", "declared"])
def test_postprocess_one_gets_this_requests_k_by_7_rows_with_column_0_all_0(declared):
    """What the hook sees, not only what the client gets: a lone call's whole output, or this
    request's rows of a shared call, always (k, 7) with the batch index zeroed (as if alone)."""
    pngs = images(2 * BATCH, seed=3)
    expected = expected_answers(pngs)
    with served({"batch_dims": DECLARATION} if declared else {}, CheckedDetectorHandler) as server:
        responses, _ = answered_in_batches(server, pngs)
    breaches = contract_breaches(responses, expected)
    assert not breaches, f"{len(breaches)} of {len(pngs)} requests without their own boxes, e.g. {breaches[:3]}"
