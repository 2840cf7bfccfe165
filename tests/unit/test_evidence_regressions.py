"""Issue 17's findings, one regression test (or a few) each, named after the bug: every answer is
its request's own because the batch layout is known by evidence, not guessed from one call's
shapes, and the model-call side owns its failures (retries, memory, a broken accelerator).

Each test fails on the code before the issue's work and passes after, except the detector guard
(finding 1), which pins what the fix must not break. Findings 6 (KServe envelope) and 7 (a
handler's ValueError is its own 500) are pinned in test_metrics_and_envelopes.py and
test_handler_bugs_are_500.py.
"""

import gc
import logging
import sys
import weakref

import pytest
import torch

from handlers import EngineSettings, Request, TensorHandler
from handlers.engine.batch_engine import BatchEngine
from handlers.testing import assert_matches_alone, run_batch, start_handler

from .images import encode, photo
from .models import AffineHandler, affine_model

# -- helpers ---------------------------------------------------------------------------------------


# The engine's stages for engine-level tests: a model you can compute by hand, y = 2x + 1.
def parse(request):
    return float(request)


def affine(items):
    return [2 * x + 1 for x in items]


def as_dict(output, item):
    return {"input": item, "output": output}


def values(report):
    return [outcome.value if outcome.ok else outcome.error.status for outcome in report.outcomes]


def bodies(count):
    """Distinct 4-feature requests whose affine answers are exact in any float precision."""
    return [[float(i), i + 0.5, -float(i), 2.0] for i in range(count)]


def affine_row(body):
    """The affine model's answer for one request, by hand: y = 2x + 1."""
    return [2 * v + 1 for v in body]


def model_calls(context):
    """The ModelCalls metric the handler reported for the batch of ``context``."""
    return sum(record.value for record in context.metrics.named("ModelCalls"))


# -- 1. wrong 200s when a leading size equals the micro-batch size ---------------------------------


def heads_handler(heads):
    class BatchedHeads(AffineHandler):
        """``heads`` batched outputs in a list (per-head outputs, timm's ``features_only``)."""

        def infer(self, batch):
            y = super().infer(batch)
            return [y * (k + 2) for k in range(heads)]

    return BatchedHeads


def heads_answer(body, heads):
    return [[(k + 2) * v for v in affine_row(body)] for k in range(heads)]


@pytest.mark.parametrize("heads", [2, 4])
def test_a_list_of_batched_heads_as_long_as_the_micro_batch_is_not_cut_as_one_entry_per_request(heads):
    """Regression: a list of 2 heads with micro-batches of 2 (4 with 4) was read as one entry per
    request: request 0 got a 200 holding head 0 of both requests, request 1 head 1 of both."""
    handler = start_handler(heads_handler(heads), handler_config={"micro_batch_size": heads, "pool_size": 2})
    try:
        batch = bodies(heads + 1)
        responses, context = run_batch(handler, batch)
        answered = [(response, body) for response, body, status in zip(responses, batch, context.statuses())
                    if status == 200]
        assert [response for response, _ in answered] == [heads_answer(body, heads) for _, body in answered]
        assert context.statuses() == [200] * len(batch)
        assert_matches_alone(handler, batch)
    finally:
        handler.close()


@pytest.mark.parametrize("heads", [2, 4])
def test_a_request_alone_to_a_model_with_batched_heads_is_answered_not_a_500(heads):
    """Regression: alone, the same list of heads was 'a list of 2 entries, not one per item (1)':
    a 500 SplitFailed for an output any request can be given its part of."""
    handler = start_handler(heads_handler(heads), handler_config={"micro_batch_size": heads, "pool_size": 2})
    try:
        body = bodies(3)[2]
        responses, context = run_batch(handler, [body])
    finally:
        handler.close()
    assert context.statuses() == [200]
    assert responses == [heads_answer(body, heads)]


STEPS = 4  # time steps of the sequence-first outputs: equal to their micro-batch size


class SequenceFirst(AffineHandler):
    """A ``(T, B, D)`` output, as an RNN or a transformer with ``batch_first=False`` returns:
    step t of a request is ``(t + 1) * y``."""

    def infer(self, batch):
        y = super().infer(batch)
        return torch.stack([y * (t + 1) for t in range(STEPS)])


def sequence_answer(body):
    return [[(t + 1) * v for v in affine_row(body)] for t in range(STEPS)]


def test_a_sequence_first_output_with_as_many_steps_as_the_micro_batch_never_hands_out_other_requests_steps():
    """Regression: (T, B, D) with T == B was cut along T: request i got step i of every request,
    a 200 of the right shape holding the other requests' data."""
    handler = start_handler(SequenceFirst, handler_config={"micro_batch_size": STEPS, "pool_size": 2})
    try:
        batch = bodies(STEPS)
        responses, context = run_batch(handler, batch)
    finally:
        handler.close()
    for body, response, status in zip(batch, responses, context.statuses()):
        if status == 200:
            assert response == sequence_answer(body)
        else:  # refusing an output it cannot attribute is allowed; handing out others' rows is not
            assert (status, response["type"]) == (500, "SplitFailed")


def test_a_sequence_first_output_declared_in_batch_dims_answers_each_request_its_own_steps():
    handler = start_handler(SequenceFirst, handler_config={
        "micro_batch_size": STEPS, "pool_size": 2, "batch_dims": {"output": 1}})
    try:
        batch = bodies(STEPS + 1)
        responses = assert_matches_alone(handler, batch)
    finally:
        handler.close()
    assert responses == [sequence_answer(body) for body in batch]


class Recurrent(AffineHandler):
    """A real ``torch.nn.GRU`` (``batch_first=False``) over STEPS steps of each request:
    its output is ``(T, B, hidden)``."""

    def load_model(self, model_dir, device):
        torch.manual_seed(17)
        return torch.nn.GRU(4, 3)

    def infer(self, batch):
        output, _ = self.model(steps_of(batch))
        return output


def steps_of(batch):
    return torch.stack([batch * (t + 1) for t in range(STEPS)])  # (T, B, 4)


def test_a_real_gru_run_sequence_first_gives_each_request_its_own_time_steps():
    """Regression: the GRU's (4, 4, 3) output for 4 requests was cut along time; each request got
    a (4, 3) answer of the right shape made of one time step of each request."""
    handler = start_handler(Recurrent, handler_config={"micro_batch_size": STEPS, "pool_size": 2})
    try:
        batch = bodies(STEPS)
        responses, context = run_batch(handler, batch)
        with torch.inference_mode():
            alone = [handler.model(steps_of(torch.tensor([body])))[0][:, 0] for body in batch]
    finally:
        handler.close()
    assert context.statuses() == [200] * STEPS
    for response, expected in zip(responses, alone):
        assert torch.allclose(torch.tensor(response), expected, atol=1e-5)


class Detector(AffineHandler):
    """One tensor of boxes per image, as torchvision's detectors return: an image whose first
    feature is k has k boxes, box j being ``(j + 1) * y``."""

    def infer(self, batch):
        y = super().infer(batch)
        return [row.expand(int(x[0]), -1) * torch.arange(1, int(x[0]) + 1).unsqueeze(1) for x, row in zip(batch, y)]


def boxes_answer(body):
    return [[(j + 1) * v for v in affine_row(body)] for j in range(int(body[0]))]


def test_a_detector_whose_box_count_equals_the_micro_batch_size_is_still_answered_per_image():
    """Guard for the fix (this passed before it): a list with one entry per image, each holding as
    many boxes as the micro-batch has images, is one entry per request, not a list of heads."""
    handler = start_handler(Detector, handler_config={"micro_batch_size": 2, "pool_size": 2})
    try:
        batch = [[2.0, 1.0, 0.0, -1.0], [2.0, 0.5, 3.0, 1.0], [1.0, 2.0, 2.0, 2.0], [3.0, 0.0, 1.0, 0.0],
                 [2.0, -2.0, 1.5, 4.0]]
        responses = assert_matches_alone(handler, batch)
    finally:
        handler.close()
    assert responses == [boxes_answer(body) for body in batch]


def test_samples_teach_the_layout_of_a_sequence_first_output_before_anything_is_served():
    """The start-up self-test on the user's samples learns that dimension 1 is the batch, so the
    first live micro-batch is cut right without a probe."""
    from handlers.core.self_test import Sample

    handler = SequenceFirst()
    samples = [Sample(f"s{i}.json", Request(body, {"Content-Type": "application/json"}))
               for i, body in enumerate(bodies(3))]
    handler.start(section={"micro_batch_size": STEPS, "pool_size": 2}, samples=samples)
    try:
        assert handler.self_test is not None and handler.self_test.layout_learned
        batch = bodies(STEPS)
        responses, context = run_batch(handler, batch)
    finally:
        handler.close()
    assert model_calls(context) == 1  # the layout was known: no probe on live traffic
    assert responses == [sequence_answer(body) for body in batch]


# -- 2. the out-of-memory retry keeps the failed attempt's memory ----------------------------------


OUT_OF_MEMORY = "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.15 GiB total capacity)"


def test_the_out_of_memory_retry_frees_the_failed_attempt_before_its_halves_run():
    """Regression: the first attempt's exception was kept (as ``__cause__``, with its frames and
    their activations) while both halves retried, and after the batch until a collection."""
    failed_attempt = []  # a weak reference to the activations of the attempt that ran out of memory
    alive_in_retry = []

    def infer(items):
        activations = torch.empty(1 << 16)  # what a forward pass holds in its frames
        if len(items) == 4:
            failed_attempt.append(weakref.ref(activations))
            raise MemoryError(OUT_OF_MEMORY)
        alive_in_retry.append(failed_attempt[0]() is not None)
        return affine(items)

    requests = [1.0, 2.0, 3.0, 4.0]
    gc.disable()  # freed by reference counting, before the halves run: not by a lucky collection
    try:
        with BatchEngine(parse, infer, as_dict, EngineSettings(micro_batch_size=4, pool_size=2, deadline_s=10)) as e:
            report = e.run(requests)
        alive_after = failed_attempt[0]() is not None
    finally:
        gc.enable()
    assert values(report) == [{"input": r, "output": 2 * r + 1} for r in requests]
    assert alive_in_retry == [False, False]
    assert not alive_after


def test_a_handler_retrying_after_out_of_memory_has_freed_the_failed_forward_pass():
    """The same through a handler: the failed attempt's frames (collate, infer, the stream
    context) and their activations are gone before the halves run."""
    failed_attempt = []
    alive_in_retry = []

    class RunsOutOfMemoryOnFour(AffineHandler):
        def infer(self, batch):
            hidden = self.model(batch).repeat(1, 1024)  # activations of the attempt
            if batch.shape[0] == 4:
                failed_attempt.append(weakref.ref(hidden))
                raise MemoryError(OUT_OF_MEMORY)
            alive_in_retry.append(failed_attempt[0]() is not None)
            return hidden[:, :4]

    handler = start_handler(RunsOutOfMemoryOnFour, handler_config={"micro_batch_size": 4, "pool_size": 2})
    gc.disable()
    try:
        batch = bodies(4)
        responses, context = run_batch(handler, batch)
    finally:
        gc.enable()
        handler.close()
    assert context.statuses() == [200] * 4
    assert responses == [affine_row(body) for body in batch]
    assert alive_in_retry and not any(alive_in_retry)  # the halves (and the layout probe) ran after it was freed


# -- 3. a sticky accelerator error ---------------------------------------------------------------


DEVICE_ASSERT = ("CUDA error: device-side assert triggered\nCUDA kernel errors might be asynchronously reported at "
                 "some other API call, so the stacktrace below might be incorrect.\nCompile with "
                 "`TORCH_USE_CUDA_DSA` to enable device-side assertions.")


def sticky_accelerator_handler(calls):
    broken = []

    class StickyAccelerator(AffineHandler):
        """An embedding lookup on a GPU: a negative index trips a device-side assert, and the CUDA
        context stays broken: every later call fails the same way."""

        def infer(self, batch):
            calls.append(batch.shape[0])
            if broken or bool((batch[:, 0] < 0).any()):
                broken.append(True)
                raise RuntimeError(DEVICE_ASSERT)
            return super().infer(batch)

    return StickyAccelerator


def test_a_device_side_assert_makes_the_worker_unhealthy_at_once_without_splitting_the_micro_batch():
    """Regression: the poisoned micro-batch was split down to singles (and every later clean
    batch of 8 too: 15 model calls, all 500s) while the worker reported itself healthy, so that
    neither TorchServe nor Ray replaced it."""
    calls = []
    handler = start_handler(sticky_accelerator_handler(calls), handler_config={"micro_batch_size": 4, "pool_size": 2})
    try:
        assert handler.unhealthy_reason is None
        poisoned = bodies(4)
        poisoned[2] = [-5.0, 1.0, 1.0, 1.0]
        _, context = run_batch(handler, poisoned)
        assert calls == [4]  # not split: no retry can cure a broken device
        assert model_calls(context) == 1
        assert all(status >= 500 for status in context.statuses())
        assert handler.unhealthy_reason is not None and "accelerator" in handler.unhealthy_reason

        later, later_context = run_batch(handler, bodies(8))
    finally:
        handler.close()
    assert calls == [4]  # the model is not called again
    assert model_calls(later_context) == 0
    assert later_context.statuses() == [503] * 8
    assert all(r["type"] == "ServiceUnavailable" for r in later)


# -- 4. splitting multiplies deterministic failures ------------------------------------------------


class WholeBatchScalar(AffineHandler):
    """An output for the whole micro-batch (a sum over it): no request's part can be cut out."""

    def infer(self, batch):
        return super().infer(batch).sum()


def test_an_output_that_can_never_be_split_is_answered_alone_with_one_log_line_not_31_calls_and_60(caplog):
    """Regression: a micro-batch of 16 whose output is a scalar was retried down to singles:
    31 model calls, ~60 log lines, and a message about 'a micro-batch of 1'. Then it was
    refused (16 x 500). Issue 29: each request is answered by a call of its own: the micro-batch's
    call, then 16 lone calls, and one warning naming why."""
    handler = start_handler(WholeBatchScalar, handler_config={"micro_batch_size": 16, "pool_size": 2})
    try:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="handlers"):
            responses, context = run_batch(handler, bodies(16))
        answered_alone = handler._engine._model_call.answered_alone
    finally:
        handler.close()
    assert model_calls(context) == 1 + 16
    assert context.statuses() == [200] * 16
    assert responses == [sum(affine_row(body)) for body in bodies(16)]
    assert answered_alone == 16
    logged = [record for record in caplog.records if record.name.startswith("handlers")]
    assert len(logged) <= 2, [record.getMessage()[:120] for record in logged]
    assert any("answered one per model call" in record.getMessage() for record in logged)


# -- 5. half precision: inputs in the model's precision --------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_model_in_half_precision_gets_its_inputs_in_that_precision_not_float32(dtype):
    """Regression: precision float16/bfloat16 cast the weights only; the base collate passed
    float32 inputs, and every request failed with a dtype mismatch."""

    class HalfPrecisionAffine(AffineHandler):
        def load_model(self, model_dir, device):
            return affine_model().to(dtype)

    handler = start_handler(HalfPrecisionAffine, handler_config={"micro_batch_size": 2, "pool_size": 2})
    try:
        batch = bodies(3)
        responses, context = run_batch(handler, batch)
    finally:
        handler.close()
    assert context.statuses() == [200] * 3
    assert responses == [affine_row(body) for body in batch]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_tensor_handler_casts_float32_requests_to_a_half_precision_model(dtype):
    class HalfPrecisionTensors(TensorHandler):
        def load_model(self, model_dir, device):
            return affine_model().to(dtype)

    handler = start_handler(HalfPrecisionTensors, handler_config={"shape": [4], "micro_batch_size": 2, "pool_size": 2})
    try:
        batch = bodies(3)
        responses, context = run_batch(handler, batch)
    finally:
        handler.close()
    assert context.statuses() == [200] * 3
    assert responses == [affine_row(body) for body in batch]


def test_collate_casts_floating_inputs_to_the_models_precision_and_keeps_integer_ones():
    handler = start_handler(AffineHandler, handler_config={"pool_size": 2})
    try:
        handler.input_dtype = torch.bfloat16  # as start() sets it for a bfloat16 model on a GPU
        batch = handler.collate([torch.ones(4), torch.zeros(4)])
        ids = handler.to_model(torch.arange(3))
    finally:
        handler.close()
    assert batch.dtype == torch.bfloat16 and batch.shape == (2, 4)
    assert ids.dtype == torch.int64


# -- 8. SystemExit from a hook ---------------------------------------------------------------------


def exits_on(poison):
    def check(value):
        if value == poison:
            sys.exit(3)  # a library calling exit()

    return check


@pytest.mark.timeout(60)
@pytest.mark.parametrize("stage", ["preprocess", "infer", "postprocess"])
def test_system_exit_from_a_stage_fails_its_request_alone_and_run_does_not_raise(stage):
    """Regression: SystemExit escaped BatchEngine.run(), which promises never to raise: the
    batch-mates got nothing, and a TorchServe worker died."""
    check = exits_on(13.0)

    def preprocess(request):
        if stage == "preprocess":
            check(request)
        return parse(request)

    def infer(items):
        if stage == "infer":
            for item in items:
                check(item)
        return affine(items)

    def postprocess(output, item):
        if stage == "postprocess":
            check(item)
        return as_dict(output, item)

    requests = [1.0, 13.0, 2.0, 3.0]
    settings = EngineSettings(micro_batch_size=4, pool_size=2, deadline_s=5)
    with BatchEngine(preprocess, infer, postprocess, settings) as e:
        report = e.run(requests)
        after = e.run([4.0])
    assert values(report) == [{"input": 1.0, "output": 3.0}, 500, {"input": 2.0, "output": 5.0},
                              {"input": 3.0, "output": 7.0}]
    assert values(after) == [{"input": 4.0, "output": 9.0}]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("hook", ["preprocess_one", "infer", "postprocess_one"])
def test_a_handler_hook_calling_exit_is_a_500_for_its_request_and_the_others_are_answered(hook):
    class CallsExit(AffineHandler):
        def preprocess_one(self, request):
            item = super().preprocess_one(request)
            if hook == "preprocess_one" and item[0] == 13:
                sys.exit(3)
            return item

        def infer(self, batch):
            if hook == "infer" and bool((batch[:, 0] == 13).any()):
                sys.exit(3)
            return super().infer(batch)

        def postprocess_one(self, output, item):
            if hook == "postprocess_one" and item[0] == 13:
                sys.exit(3)
            return super().postprocess_one(output, item)

    handler = start_handler(CallsExit, handler_config={"micro_batch_size": 4, "pool_size": 2, "deadline_s": 5})
    try:
        batch = bodies(4)
        batch[1] = [13.0, 1.0, 1.0, 1.0]
        responses, context = run_batch(handler, batch)
    finally:
        handler.close()
    assert context.statuses() == [200, 500, 200, 200]
    assert [responses[i] for i in (0, 2, 3)] == [affine_row(batch[i]) for i in (0, 2, 3)]


# -- 9. in-place ops in postprocess_one ---------------------------------------------------------------


def test_an_in_place_op_in_postprocess_one_is_answered_not_an_inference_tensor_500():
    """Regression: postprocess_one got inference tensors outside inference mode: clamp_ was a 500
    'Inplace update to inference tensor outside InferenceMode'."""

    class ClampsInPlace(AffineHandler):
        def postprocess_one(self, output, item):
            return output.clamp_(0.0, 5.0).tolist()

    handler = start_handler(ClampsInPlace, handler_config={"micro_batch_size": 2, "pool_size": 2})
    try:
        batch = bodies(3)
        responses, context = run_batch(handler, batch)
    finally:
        handler.close()
    assert context.statuses() == [200] * 3
    assert responses == [[min(max(v, 0.0), 5.0) for v in affine_row(body)] for body in batch]


# -- 10. what the GPU paths rely on, as far as a CPU shows it -------------------------------------------


def test_on_device_runs_once_at_start_after_load_model_before_any_request():
    """Constants the model threads share are made once at start-up, before the device is
    synchronised, not lazily on whichever model thread's stream comes first."""
    events = []

    class Recording(AffineHandler):
        def load_model(self, model_dir, device):
            events.append("load_model")
            return affine_model()

        def on_device(self):
            events.append("on_device")

    handler = start_handler(Recording, handler_config={"micro_batch_size": 2, "pool_size": 2})
    try:
        assert events == ["load_model", "on_device"]
        _, context = run_batch(handler, bodies(3))
    finally:
        handler.close()
    assert context.statuses() == [200] * 3
    assert events == ["load_model", "on_device"]


def image_handler_class():
    from handlers import ImageClassifierHandler

    class TinyImages(ImageClassifierHandler):
        """An image classifier small enough for a unit test: mean colour → 5 classes."""

        def load_model(self, model_dir, device):
            torch.manual_seed(17)
            return torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 5))

    return TinyImages


def test_the_image_handler_makes_its_normalisation_on_the_device_at_start_not_in_collate(tmp_path):
    """Regression: mean/std were copied to the device lazily by the first collate, on the first
    model thread's stream, and read by the other model threads' streams with no ordering. Made at
    start-up, collate has no need of the host constants any more."""
    config = {"resize": 32, "crop": 32, "top_k": 3, "micro_batch_size": 2, "pool_size": 2}
    images = [encode(photo(0, (48, 40)), "PNG"), encode(photo(1, (40, 48)), "PNG")]
    reference = start_handler(image_handler_class(), model_dir=tmp_path, handler_config=config)
    handler = start_handler(image_handler_class(), model_dir=tmp_path, handler_config=config)
    try:
        expected, _ = run_batch(reference, images)
        handler._mean = handler._std = None  # host copies no model thread may read once serving
        responses, context = run_batch(handler, images)
    finally:
        reference.close()
        handler.close()
    assert context.statuses() == [200, 200]
    assert responses == expected


def spy_on_to_model(handler):
    """Record each batch that goes through ``handler.to_model``."""
    seen = []
    original = handler.to_model

    def to_model(batch):
        seen.append(batch)
        return original(batch)

    handler.to_model = to_model
    return seen


class AffineTensors(TensorHandler):
    def load_model(self, model_dir, device):
        return affine_model()


@pytest.mark.parametrize("handler_class, options", [(AffineHandler, {}), (AffineTensors, {"shape": [4]})],
                         ids=["base handler", "tensor handler"])
def test_each_micro_batch_goes_through_to_model(handler_class, options):
    handler = start_handler(handler_class, handler_config={**options, "micro_batch_size": 2, "pool_size": 2})
    try:
        seen = spy_on_to_model(handler)
        _, context = run_batch(handler, bodies(3))
    finally:
        handler.close()
    assert context.statuses() == [200] * 3
    # both micro-batches (2 and 1; a probe of the layout may add one more of 1)
    assert {tuple(batch.shape) for batch in seen} == {(1, 4), (2, 4)}


@pytest.fixture
def word_tokenizer_dir(tmp_path):
    """A model folder holding a tiny word-level tokenizer: [PAD]=0, [UNK]=1, then four words."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    vocab = {"[PAD]": 0, "[UNK]": 1, "hello": 2, "world": 3, "good": 4, "morning": 5}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = Whitespace()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    return tmp_path


def test_the_text_handler_moves_ids_and_mask_through_to_model_keeping_them_integers(word_tokenizer_dir):
    from handlers import TextHandler

    class TinyText(TextHandler):
        def load_model(self, model_dir, device):
            torch.manual_seed(17)
            return torch.nn.Embedding(6, 3)

        def infer(self, batch):
            return self.model(batch["input_ids"]).sum(dim=1)

    handler = start_handler(TinyText, model_dir=word_tokenizer_dir,
                            handler_config={"micro_batch_size": 2, "pool_size": 2})
    try:
        seen = spy_on_to_model(handler)
        _, context = run_batch(handler, ["hello world", "good morning hello", "world"])
    finally:
        handler.close()
    assert context.statuses() == [200] * 3
    # ids and mask of each micro-batch (of 2 and of 1; a probe of the layout may add one more of 1)
    assert {batch.shape[0] for batch in seen} == {1, 2} and len(seen) % 2 == 0
    assert all(batch.dtype == torch.int64 for batch in seen)  # token ids stay integers


# -- found by the first review of the fixes ---------------------------------------------------------


def test_system_exit_from_a_size_hint_or_a_sizing_strategy_does_not_escape_run():
    """Regression: size_hint and a sizing strategy run on the calling thread, outside any stage;
    their SystemExit escaped run()."""

    def hint(request):
        if request == 13.0:
            sys.exit(3)
        return request

    settings = EngineSettings(micro_batch_size=2, pool_size=2, deadline_s=5)
    with BatchEngine(parse, affine, as_dict, settings, size_hint=hint) as engine:
        assert values(engine.run([1.0, 13.0, 2.0])) == [as_dict(3.0, 1.0), as_dict(27.0, 13.0), as_dict(5.0, 2.0)]

        class ExitingSizing:
            def size_for(self, batch_size):
                sys.exit(4)

            def observe(self, *args):
                sys.exit(5)

        engine._sizing = ExitingSizing()
        report = engine.run([1.0, 2.0])
    assert values(report) == [500, 500]
    assert "sizing strategy failed: SystemExit: 4" in report.outcomes[0].error.message


def test_a_value_declared_shared_is_each_requests_own_copy():
    """Regression: every request got the same object for a 'shared' part; an in-place op in
    postprocess_one changed it for its batch-mates too."""

    class SharedScale(AffineHandler):
        def infer(self, batch):
            return {"y": super().infer(batch), "scale": torch.tensor(10.0)}

        def postprocess_one(self, output, item):
            return {"scale": output["scale"].mul_(2).item()}

    config = {"micro_batch_size": 4, "pool_size": 2,
              "batch_dims": {"output['y']": 0, "output['scale']": "shared"}}
    handler = start_handler(SharedScale, handler_config=config)
    try:
        responses, context = run_batch(handler, bodies(4))
    finally:
        handler.close()
    assert context.statuses() == [200] * 4
    assert responses == [{"scale": 20.0}] * 4


def test_a_lone_request_gets_the_same_answer_shape_as_beside_others():
    """Regression: on a fresh worker a one-entry list of heads, [{"logits": y}], sent alone was
    cut by a guess (the list as one entry per request) and answered {"logits": [[...]]}; beside
    others, [{"logits": [...]}]. A lone request is probed too (itself twice over)."""

    class OneHead(AffineHandler):
        def infer(self, batch):
            return [{"logits": super().infer(batch)}]

        def postprocess_one(self, output, item):
            return output

    handler = start_handler(OneHead, handler_config={"micro_batch_size": 4, "pool_size": 2})
    try:
        alone, _ = run_batch(handler, bodies(1))
        together, _ = run_batch(handler, bodies(3))
    finally:
        handler.close()
    assert alone[0] == together[0] == [{"logits": affine_row(bodies(1)[0])}]


def test_a_padded_per_token_output_whose_length_equals_the_batch_at_two_sizes_is_learned_at_a_third():
    """Regression: (B, T, C) padded to the micro-batch's longest text, with T == B at the batch
    and at its half, was refused as ambiguous for the whole micro-batch; one more size tells."""

    class PerToken(AffineHandler):
        def infer(self, batch):
            y = super().infer(batch)  # (B, 4)
            # The longest text happens to be as long as the batch at 4 and at 2, not alone.
            steps = batch.shape[0] if batch.shape[0] > 1 else 3
            return y.unsqueeze(1).expand(-1, steps, -1) + torch.arange(steps).view(1, -1, 1)

        def postprocess_one(self, output, item):
            return output[0].tolist()  # the first token's vector

    handler = start_handler(PerToken, handler_config={"micro_batch_size": 4, "pool_size": 2})
    try:
        responses, context = run_batch(handler, bodies(4))
    finally:
        handler.close()
    assert context.statuses() == [200] * 4
    assert responses == [affine_row(body) for body in bodies(4)]
    # the micro-batch, blank and noise of it (derived inputs), its half, then one request
    assert model_calls(context) == 5
