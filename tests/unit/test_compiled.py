"""Compiled micro-batches (handler.compile): buckets, padding only where batch invariance is
proven, the start-up check against eager and its fallback, sizing brought down to the buckets.

Most tests compile with the ``eager`` or ``aot_eager`` backend (dynamo traces, nothing is
generated: fast); one compiles with inductor for real."""

import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from handlers import ConfigError
from handlers.core.compiled import CompileSettings, read_compile
from handlers.engine.buckets import Buckets
from handlers.engine.clocks import Deadline, StageTimes
from handlers.engine.model_call import ModelCall
from handlers.testing import LocalServer

from .models import AffineHandler

ROWS = [[1.0, 2.0, 3.0, 4.0], [-1.0, 0.5, 0.0, 8.0], [3.0, 3.0, -2.0, 1.0]]


def affine(row):
    return [2 * v + 1 for v in row]


class Recording(AffineHandler):
    """Records each micro-batch it collates (the rows the model sees)."""

    def setup(self, model_dir):
        self.collated = []

    def collate(self, items):
        batch = super().collate(items)
        self.collated.append(batch.clone())
        return batch


def compiled_server(tmp_path, samples=ROWS, handler=Recording, **compile_settings):
    config = {"micro_batch_size": 4, "audit_share": 0.0,
              "compile": {"backend": "eager", "buckets": [2, 4], **compile_settings}}
    return LocalServer.start(handler, model_dir=str(tmp_path), handler_config=config, samples=samples)


def close_to(answers, rows):
    return len(answers) == len(rows) and all(a == pytest.approx(affine(r)) for a, r in zip(answers, rows))


def served_sizes(handler, before):
    return [len(batch) for batch in handler.collated[before:]]


# -- buckets --------------------------------------------------------------------------------------


def test_buckets_bring_a_size_down_to_the_largest_bucket_not_above_it():
    buckets = Buckets([4, 8, 16])
    assert [buckets.micro_batch_size(n) for n in (1, 3, 4, 7, 8, 15, 16, 40)] == [1, 3, 4, 4, 8, 8, 16, 16]
    assert buckets.micro_batch_size(None) == 16  # the whole batch: in micro-batches of the largest
    assert Buckets().micro_batch_size(7) == 7 and Buckets().micro_batch_size(None) is None


def test_buckets_pad_only_when_allowed_filled_enough_and_under_the_cap():
    proven = Buckets([4, 8], may_pad=lambda: True, min_fill=0.5)
    assert [proven.padded(n) for n in (1, 2, 3, 4, 5, 7, 8, 9)] == [1, 4, 4, 4, 8, 8, 8, 9]
    assert proven.padded(5, limit=6) == 5  # padding never goes above the out-of-memory cap
    assert Buckets([4, 8], may_pad=lambda: False).padded(3) == 3


# -- the model call pads and drops ------------------------------------------------------------------


def test_model_call_pads_with_copies_of_the_last_request_and_drops_their_outputs():
    seen = []

    def forward(items):
        seen.append(list(items))
        return [10 * x for x in items]

    call = ModelCall(forward, lambda output, count: output[:count] if len(output) == count else None,
                     buckets=Buckets([4], may_pad=lambda: True))
    outcomes = call.run([(0, 1), (1, 2), (2, 3)], Deadline(5), StageTimes())
    assert seen == [[1, 2, 3, 3]]
    assert [(p, o.value) for p, o in outcomes] == [(0, 10), (1, 20), (2, 30)]


def test_a_padded_micro_batch_that_runs_out_of_memory_is_retried_unpadded_and_the_cap_is_a_bucket():
    seen = []

    def forward(items):
        seen.append(len(items))
        if len(items) > 2:
            raise MemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return list(items)

    call = ModelCall(forward, lambda output, count: output, buckets=Buckets([2, 4], may_pad=lambda: True))
    outcomes = call.run([(0, "a"), (1, "b"), (2, "c")], Deadline(5), StageTimes())
    assert [o.value for _, o in outcomes] == ["a", "b", "c"]
    assert seen[0] == 4 and seen[1:] == [1, 2]  # padded to 4 once; its halves as they are
    assert call.safe_size == 2 and call.cap(4) == 2 and call.cap(None) == 2


# -- the handler ----------------------------------------------------------------------------------


def test_short_micro_batches_are_padded_to_a_bucket_and_answer_as_eager(tmp_path):
    with compiled_server(tmp_path) as server:
        handler = server.handler
        assert handler.compiled is not None and handler.compiled.sizes == (2, 4)
        before = len(handler.collated)
        responses = server.send(ROWS + ROWS[:2])  # 5: micro-batches of 4 and 1
    assert [r.body for r in responses] == [affine(row) for row in ROWS + ROWS[:2]]
    # 1 fills half of bucket 2: padded, with a copy of the real row (not zeros).
    assert served_sizes(handler, before) == [4, 2]
    assert torch.equal(handler.collated[-1][1], handler.collated[-1][0])


def test_without_proven_batch_invariance_nothing_is_padded(tmp_path, caplog):
    """Copies of one sample cannot show a model that mixes its batch: compiled at the buckets
    only, every other size eager and unpadded."""
    with caplog.at_level(logging.INFO, logger="handlers.core.handler"):
        with compiled_server(tmp_path, samples=[ROWS[0], ROWS[0]]) as server:
            handler = server.handler
            assert handler.compiled is not None
            before = len(handler.collated)
            responses = server.send(ROWS + ROWS[:2])
    assert [r.body for r in responses] == [affine(row) for row in ROWS + ROWS[:2]]
    assert served_sizes(handler, before) == [4, 1]
    assert "batch invariance is not proven" in caplog.text


class OffByOneWhenCompiled(Recording):
    pass


def _off_by_one(graph_module, example_inputs):
    def run(*args):
        return [output + 1 for output in graph_module(*args)]

    return run


def _refuses(graph_module, example_inputs):
    raise RuntimeError("this backend cannot compile anything")


torch._dynamo.register_backend(_off_by_one, name="test_off_by_one")
torch._dynamo.register_backend(_refuses, name="test_refuses")


@pytest.mark.parametrize("backend, said", [("test_off_by_one", "differs from eager's"),
                                           ("test_refuses", "this backend cannot compile anything")])
def test_a_compiled_model_that_differs_from_eager_or_fails_to_compile_runs_eager_said_in_one_line(
        tmp_path, caplog, backend, said):
    # Dynamo keeps compiled code on infer's code object: one compiled earlier in this process at
    # these shapes (another backend, another test) would answer for this backend.
    torch._dynamo.reset()
    with caplog.at_level(logging.WARNING, logger="handlers.core.compiled"):
        with compiled_server(tmp_path, backend=backend) as server:
            assert server.handler.compiled is None
            responses = server.send(ROWS)
    assert [r.body for r in responses] == [affine(row) for row in ROWS]  # eager's answers
    lines = [r.getMessage() for r in caplog.records if r.name == "handlers.core.compiled"]
    assert len(lines) == 1 and said in lines[0] and "runs eager" in lines[0]


def test_without_samples_the_worker_runs_eager_and_says_so(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="handlers.core.compiled"):
        with compiled_server(tmp_path, samples=[]) as server:
            assert server.handler.compiled is None
    assert "no samples" in caplog.text


def test_sizing_picks_among_the_buckets(tmp_path):
    """The sizing strategy's 3 becomes bucket 2; the last micro-batch pads to 2."""
    config = {"micro_batch_size": 3, "audit_share": 0.0, "compile": {"backend": "eager", "buckets": [2, 4]}}
    with LocalServer.start(Recording, model_dir=str(tmp_path), handler_config=config, samples=ROWS) as server:
        before = len(server.handler.collated)
        responses = server.send(ROWS + ROWS[:2])
        sizes = served_sizes(server.handler, before)
    assert [r.body for r in responses] == [affine(row) for row in ROWS + ROWS[:2]]
    assert sizes == [2, 2, 2]


@pytest.mark.parametrize("section, message", [
    ({"mode": "fastest"}, "handler.compile.mode must be one of"),
    ({"buckets": [0, 4]}, "handler.compile.buckets must be 'auto' or a list"),
    ({"bucket": [4]}, "handler.compile.bucket is not a known setting"),
    ({"min_fill": 2}, "handler.compile.min_fill must be a number in (0, 1]"),
])
def test_compile_settings_are_checked_with_the_key_the_rule_and_the_value(section, message):
    with pytest.raises(ConfigError) as raised:
        LocalServer.start(AffineHandler, handler_config={"compile": section}, samples=ROWS)
    assert message in str(raised.value)


def test_compile_is_off_by_default_and_auto_buckets_skip_size_one():
    assert read_compile({}) is None and read_compile({"enabled": False}) is None
    assert CompileSettings().sizes(None) == (4, 8, 16)
    assert CompileSettings().sizes(8) == (4, 8) and CompileSettings().sizes(6) == (4, 6)


@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture], deadline=None,
          max_examples=25)
@given(rows=st.lists(st.lists(st.floats(-1e3, 1e3, allow_nan=False, width=32), min_size=4, max_size=4),
                     min_size=1, max_size=11))
def test_compiled_and_padded_answers_equal_each_request_answered_alone(compiled_affine, rows):
    server, eager = compiled_affine
    batched = [r.body for r in server.send(rows)]
    alone = [eager.send([row])[0].body for row in rows]
    for got, expected in zip(batched, alone):
        assert got == pytest.approx(expected, rel=1e-6, abs=1e-5)


@pytest.fixture(scope="module")
def compiled_affine(tmp_path_factory):
    folder = tmp_path_factory.mktemp("compiled")
    config = {"micro_batch_size": 4, "audit_share": 0.0, "compile": {"backend": "aot_eager", "buckets": [2, 4]}}
    with LocalServer.start(AffineHandler, model_dir=str(folder), handler_config=config, samples=ROWS) as server, \
            LocalServer.start(AffineHandler, handler_config={"audit_share": 0.0}, samples=ROWS) as eager:
        assert server.handler.compiled is not None
        yield server, eager


FRESH_PROCESS = "MBH_TEST_IN_A_FRESH_PROCESS"


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None, reason="inductor needs a C++ compiler")
def test_inductor_compiles_the_buckets_into_a_cache_kept_in_the_model_folder(tmp_path, request):
    if os.environ.get(FRESH_PROCESS) != "1":
        # Inductor settles its cache folder in a process once it has compiled (here: after the
        # corpus's compiled runs, the folder stayed empty); a worker compiles first in its own.
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", request.node.nodeid],
                                cwd=request.config.rootpath, env={**os.environ, FRESH_PROCESS: "1"},
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
        return
    with compiled_server(tmp_path, backend="inductor", buckets=[4]) as server:
        assert server.handler.compiled is not None
        responses = server.send(ROWS + ROWS[:1])
    assert close_to([r.body for r in responses], ROWS + ROWS[:1])
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "compile_cache")
    assert any((tmp_path / "compile_cache").iterdir())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_reduce_overhead_on_a_gpu_replays_a_cuda_graph_per_bucket_and_answers_as_eager(tmp_path):
    config = {"micro_batch_size": 4, "audit_share": 0.0, "inference_workers": 2,
              "compile": {"mode": "reduce-overhead", "buckets": [2, 4]}}
    with LocalServer.start(AffineHandler, model_dir=str(tmp_path), handler_config=config, samples=ROWS,
                           device="cuda") as server:
        assert server.handler.compiled is not None and server.handler.compiled.cudagraphs
        for _ in range(3):  # replays overwrite the graphs' outputs: each batch still gets its own
            rows = [[float(i + j) for j in range(4)] for i in range(7)]
            assert close_to([r.body for r in server.send(rows)], rows)


def test_torchserve_pt2_section_is_read_as_handler_compile_unless_the_handler_has_its_own():
    from handlers.core.compiled import with_pt2

    pt2 = {"compile": {"enable": True, "backend": "inductor", "mode": "reduce-overhead"}}
    assert with_pt2({"micro_batch_size": 8}, pt2) == {
        "micro_batch_size": 8, "compile": {"enabled": True, "backend": "inductor", "mode": "reduce-overhead"}}
    assert with_pt2(None, {"backend": "inductor"}) == {"compile": {"enabled": True, "backend": "inductor"}}
    assert with_pt2({"compile": {"buckets": [8]}}, pt2) == {"compile": {"buckets": [8]}}
    assert with_pt2({}, {"compile": {"enable": False}}) == {}
    assert with_pt2({"a": 1}, None) == {"a": 1}
    assert read_compile(with_pt2(None, pt2)["compile"]).mode == "reduce-overhead"


def test_through_torchserves_adapter_pt2_compiles_and_a_bad_request_fails_alone_in_every_position(tmp_path):
    """The batch contract on the compiled, padded path, with TorchServe's own pt2: section."""
    import json

    from handlers.core.self_test import SAMPLES_DIR, SAMPLES_INDEX
    from handlers.testing import assert_isolates_bad_request, start_handler

    folder = tmp_path / SAMPLES_DIR
    folder.mkdir()
    for i, row in enumerate(ROWS):
        (folder / f"{i}.json").write_text(json.dumps(row))
    (folder / SAMPLES_INDEX).write_text(json.dumps([{"file": f"{i}.json"} for i in range(len(ROWS))]))
    handler = start_handler(Recording, model_dir=str(tmp_path), handler_config={"micro_batch_size": 4, "audit_share": 0.0},
                            model_config={"pt2": {"compile": {"enable": True, "backend": "eager"}}})
    try:
        assert handler.compiled is not None and handler.compiled.sizes == (4,)
        before = len(handler.collated)
        error = assert_isolates_bad_request(handler, [json.dumps(row) for row in ROWS], "not json", 400)
        assert error["code"] == 400
        assert 4 in served_sizes(handler, before)  # three good ones padded to the bucket
    finally:
        handler.close()


class RanksNearTies(AffineHandler):
    """Answers y and, for the log only, the full ranking of y's near-tied features: like a random
    ResNet's argsort over 1000 near-equal probabilities, the ranking's tail follows differences
    of 1e-7 that no answer shows."""

    def infer(self, batch):
        y = super().infer(batch)
        tie_break = (-1.0) ** batch.shape[0] * torch.arange(4.0)  # the ties break one way alone, another way by 4
        return {"y": y, "ranking": torch.argsort(y + 1e-7 * tie_break, dim=1)}

    def postprocess_one(self, output, item):
        return output["y"].tolist()


def test_regression_the_audit_compares_answers_not_the_raw_ranking_a_compiled_batch_reorders(tmp_path):
    """A compiled ResNet-18 batch of 8 against eager alone reordered the tail of its 1000-class
    ranking; the audit compared raw parts, refuted the layout, and every request was then answered
    alone (0.8x eager). The client's answers agreed."""
    rows = [[1.0, 1.0, 1.0, 1.0], [2.0, 2.0, 2.0, 2.0], [3.0, 3.0, 3.0, 3.0], [0.0, 0.0, 0.0, 0.0]]
    config = {"micro_batch_size": 4, "audit_share": 0.5}
    with LocalServer.start(RanksNearTies, model_dir=str(tmp_path), handler_config=config, samples=ROWS) as server:
        for _ in range(10):
            responses = server.send(rows)
            server.handler._engine._model.submit(lambda: None).result(5)  # the audit queued after the batch ran
        audit = server.handler._engine._model_call.audit
        assert not server.handler._scatter.answers_alone
    assert audit.audits >= 1 and audit.disagreements == 0
    assert [r.body for r in responses] == [affine(row) for row in rows]
