"""Issue 29: outputs whose leading size is set by the data (detectors), thin evidence,
refutation for good, answering alone, the declarations for such outputs, and the audit.

A flat detector returns ONE (K, 7) tensor for the whole micro-batch, one row per box, the
image's index in column 0. With samples of one box each, K follows the micro-batch size on
every sample batch; on 0442939 it was learned as the batch dimension, and a live micro-batch
whose total box count equalled its size was cut row by row: wrong 200s.
"""

from __future__ import annotations

import logging

import pytest
import torch

from handlers import MicroBatchHandler, Request
from handlers.core.self_test import Sample, SelfTestFailed
from handlers.testing import LocalServer

JSON = {"Content-Type": "application/json"}


class FlatDetector(torch.nn.Module):
    """Every cell of an 8-cell row above 0.5 is a box: [image, x0, 0, x0 + 1, 1, score, 0]."""

    def forward(self, x):
        found = torch.nonzero(x > 0.5)
        image, cell = found[:, 0].float(), found[:, 1].float()
        score = x[found[:, 0], found[:, 1]]
        return torch.stack([image, cell, torch.zeros_like(cell), cell + 1, torch.ones_like(cell), score,
                            torch.zeros_like(cell)], dim=1)


class DetectorHandler(MicroBatchHandler):
    def load_model(self, model_dir, device):
        return FlatDetector()

    def postprocess_one(self, output, item):
        return [[round(v, 5) for v in row[1:]] for row in output.tolist()]  # the boxes, without the index


def image(*cells):
    """A row of 8 cells, bright at ``cells`` (each a box), with a score that tells boxes apart."""
    row = [0.0] * 8
    for cell in cells:
        row[cell] = 0.6 + 0.01 * cell
    return row


def boxes_alone(row):
    with torch.inference_mode():
        output = FlatDetector()(torch.tensor([row]))
    return [[round(v, 5) for v in box[1:]] for box in output.tolist()]


ONE_BOX_SAMPLES = [Sample(f"one-box-{cell}.json", Request(image(cell), JSON)) for cell in (1, 4, 6)]
# Four images holding four boxes in all: the coincidence that cut boxes row by row.
COINCIDENCE = [image(0, 3, 5), image(), image(), image(2)]
VARIED = [image(), image(1), image(2, 3), image(0, 4, 7), image(6), image(), image(1, 2, 3, 4), image(5)]


def served(handler_class, config, samples, batches):
    with LocalServer.start(handler_class, handler_config=config, samples=samples) as server:
        answers = [server.send(batch) for batch in batches]
        calls = server.handler._engine._model_call.answered_alone
        report = server.handler.self_test
    return answers, calls, report


@pytest.mark.parametrize("samples", [ONE_BOX_SAMPLES, []], ids=["one-box samples", "no samples"])
def test_a_flat_detector_with_one_box_samples_never_hands_a_request_another_requests_boxes(samples):
    """Regression: on 0442939 the coincidence batch gave image 0's three boxes to images 0, 1
    and 2 (and image 3's box to image 3), all with 200."""
    answers, alone, report = served(DetectorHandler, {"micro_batch_size": 4}, samples, [COINCIDENCE, VARIED])
    for batch, responses in zip([COINCIDENCE, VARIED], answers):
        assert [r.status for r in responses] == [200] * len(batch)
        assert [r.body for r in responses] == [boxes_alone(row) for row in batch]
    assert alone == len(COINCIDENCE) + len(VARIED)  # each by a model call of its own
    if samples:
        assert "NO batch layout can be trusted" in report.summary()
        assert "answers batch-invariant" not in report.summary()


def test_the_warning_names_the_index_column_declaration_not_the_batch_dimension(caplog):
    with caplog.at_level(logging.WARNING, logger="handlers"):
        served(DetectorHandler, {"micro_batch_size": 4}, ONE_BOX_SAMPLES, [])
    [warning] = [r.getMessage() for r in caplog.records if "answered one per model call" in r.getMessage()]
    assert "{'index_column': 0}" in warning
    assert "{'output': 0}" not in warning and '"output": 0' not in warning


def test_with_the_index_column_declared_a_detector_is_answered_in_micro_batches():
    config = {"micro_batch_size": 4, "batch_dims": {"output": {"index_column": 0}}}
    answers, alone, report = served(DetectorHandler, config, ONE_BOX_SAMPLES, [COINCIDENCE, VARIED])
    for batch, responses in zip([COINCIDENCE, VARIED], answers):
        assert [r.status for r in responses] == [200] * len(batch)
        assert [r.body for r in responses] == [boxes_alone(row) for row in batch]
    assert alone == 0
    assert "batch layout declared" in report.summary()


def test_a_batch_dimension_declared_for_a_flat_detector_is_refused_at_start_naming_the_index_column():
    """Regression: the SplitFailed message suggested batch_dims {'output': 0} and repeated it
    after the user had declared exactly that."""
    config = {"micro_batch_size": 4, "batch_dims": {"output": 0}}
    with pytest.raises(SelfTestFailed) as refused:
        served(DetectorHandler, config, ONE_BOX_SAMPLES, [])
    assert "declared with batch dimension 0" in str(refused.value)


def test_a_declared_layout_contradicted_at_run_time_is_refuted_for_good():
    """No samples, a wrong declaration: the first micro-batch that contradicts it turns every
    later one to lone calls, the coincidence included (K == micro-batch size fits the
    declaration, and would otherwise be cut row by row)."""
    config = {"micro_batch_size": 4, "batch_dims": {"output": 0}}
    answers, alone, _ = served(DetectorHandler, config, [], [VARIED[:4], COINCIDENCE])
    for batch, responses in zip([VARIED[:4], COINCIDENCE], answers):
        assert [r.status for r in responses] == [200] * 4
        assert [r.body for r in responses] == [boxes_alone(row) for row in batch]
    assert alone == 8


class PerRequestValues(torch.nn.Module):
    """values plus per-request counts (CSR): a request's values are its bright cells' scores."""

    def forward(self, x):
        bright = x > 0.5
        return {"values": x[bright], "counts": bright.sum(dim=1)}


class CountsHandler(MicroBatchHandler):
    def load_model(self, model_dir, device):
        return PerRequestValues()

    def postprocess_one(self, output, item):
        return {"values": [round(v, 5) for v in output["values"].tolist()], "count": int(output["counts"].sum())}


def values_alone(row):
    bright = [v for v in row if v > 0.5]
    return {"values": [round(v, 5) for v in bright], "count": len(bright)}


def test_values_cut_by_declared_counts_are_each_requests_own_in_micro_batches():
    config = {"micro_batch_size": 4, "batch_dims": {"output['values']": {"counts": "output['counts']"}}}
    answers, alone, _ = served(CountsHandler, config, ONE_BOX_SAMPLES, [VARIED, COINCIDENCE])
    for batch, responses in zip([VARIED, COINCIDENCE], answers):
        assert [r.body for r in responses] == [values_alone(row) for row in batch]
    assert alone == 0


def test_values_and_counts_undeclared_are_answered_alone_and_the_counts_declaration_suggested(caplog):
    with caplog.at_level(logging.WARNING, logger="handlers"):
        answers, alone, _ = served(CountsHandler, {"micro_batch_size": 4}, ONE_BOX_SAMPLES, [VARIED])
    assert [r.body for r in answers[0]] == [values_alone(row) for row in VARIED]
    assert alone == len(VARIED)
    assert any("\"output['values']\": {'counts': \"output['counts']\"}" in r.getMessage() for r in caplog.records)


def test_suggestions_fit_every_output_seen():
    from handlers.engine.scatter import suggest_declarations

    flat = lambda n, k: torch.cat([torch.arange(n).repeat_interleave(k).float().unsqueeze(1),  # noqa: E731
                                   torch.rand(n * k, 6)], dim=1)
    assert suggest_declarations([(2, flat(2, 3)), (3, flat(3, 1))]) == ['"output": {\'index_column\': 0}']
    logits = [(n, torch.zeros(n, 10)) for n in (1, 2, 3)]
    assert suggest_declarations(logits) == ['"output": 0']


class StringItems(MicroBatchHandler):
    """Items no derived input can be made of (strings): the evidence for a layout stays thin."""

    def load_model(self, model_dir, device):
        return torch.nn.Identity()

    def preprocess_one(self, request):
        return request.json()["word"]

    def collate(self, items):
        return torch.tensor([[float(len(word)), 1.0] for word in items])

    def postprocess_one(self, output, item):
        return output.tolist()


def test_thin_evidence_answers_alone_with_the_same_answer_shape_as_batched():
    """A layout no derived input could test is not trusted; a lone call's output is still cut by
    it where it fits, so that postprocess_one gets the (2,) row it would get from a batch."""
    samples = [Sample(f"{w}.json", Request({"word": w}, JSON)) for w in ("a", "bb", "ccc")]
    answers, alone, report = served(StringItems, {"micro_batch_size": 4}, samples,
                                    [[{"word": "dddd"}, {"word": "e"}, {"word": "ff"}]])
    assert [r.body for r in answers[0]] == [[4.0, 1.0], [1.0, 1.0], [2.0, 1.0]]
    assert alone == 3
    assert "the evidence is thin" in report.summary()


class LeaksOnLongRows(MicroBatchHandler):
    """Batch-invariant on the samples; on rows whose first value is over 100 (no sample has one)
    it adds the micro-batch's mean: a leak only live traffic shows."""

    def load_model(self, model_dir, device):
        return torch.nn.Identity()

    def infer(self, batch):
        if bool((batch[:, 0] > 100).any()):
            return batch + batch.mean()
        return batch


def test_the_audit_finds_a_leak_the_samples_could_not_show_and_answers_alone_from_then_on(caplog):
    samples = [Sample(f"{v}.json", Request([float(v), 1.0], JSON)) for v in (1, 2, 3)]
    config = {"micro_batch_size": 4, "audit_share": 0.5}
    leaky = [[200.0, 1.0], [300.0, 2.0], [400.0, 3.0], [500.0, 4.0]]
    with caplog.at_level(logging.ERROR, logger="handlers"), \
            LocalServer.start(LeaksOnLongRows, handler_config=config, samples=samples) as server:
        for _ in range(20):
            server.send(leaky)
            server.handler._engine._model.submit(lambda: None).result(5)  # the audit queued after the batch ran
            if server.handler._scatter.answers_alone:
                break
        audit = server.handler._engine._model_call.audit
        after = server.send(leaky)
    assert audit.disagreements == 1 and audit.audits >= 1
    # alone, each row gets its own mean added: no batch-mate's data in it
    assert [r.body for r in after] == [[v + sum(row) / 2 for v in row] for row in leaky]
    assert any("an audit ran a request" in r.getMessage() for r in caplog.records)


def test_the_audit_costs_nothing_while_answers_agree():
    samples = [Sample(f"{v}.json", Request([float(v), 1.0], JSON)) for v in (1, 2, 3)]
    with LocalServer.start(LeaksOnLongRows, handler_config={"micro_batch_size": 4, "audit_share": 0.5},
                           samples=samples) as server:
        for _ in range(10):
            responses = server.send([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
            server.handler._engine._model.submit(lambda: None).result(5)
        audit = server.handler._engine._model_call.audit
        assert not server.handler._scatter.answers_alone
    assert audit.audits >= 1 and audit.disagreements == 0
    assert [r.body for r in responses] == [[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]


def test_a_poison_request_answered_alone_fails_alone():
    class Poisoned(DetectorHandler):
        def infer(self, batch):
            if bool((batch == 0.13).any()):
                raise RuntimeError("poison")
            return super().infer(batch)

    poison = [0.13] + [0.0] * 7
    answers, alone, _ = served(Poisoned, {"micro_batch_size": 4}, ONE_BOX_SAMPLES, [[image(1), poison, image(2, 3)]])
    assert [r.status for r in answers[0]] == [200, 500, 200]
    assert answers[0][0].body == boxes_alone(image(1)) and answers[0][2].body == boxes_alone(image(2, 3))


def test_a_scatter_refuted_once_stays_refuted():
    from handlers.engine.scatter import Scatter

    scatter = Scatter()
    scatter.answer_alone("a contradiction")
    output = torch.zeros(2, 3)
    with pytest.raises(Exception, match="a contradiction"):
        scatter.split(output, 2)
    assert scatter.split(torch.zeros(1, 3), 1)[0].shape == (1, 3)  # a lone call: its whole output


def test_requests_answered_alone_are_counted_in_the_batch_metrics():
    from handlers.testing import run_batch, start_handler

    handler = start_handler(DetectorHandler, handler_config={"micro_batch_size": 4})
    try:
        _, context = run_batch(handler, VARIED[:4])
        _, declared_context = run_batch(handler, VARIED[4:])
    finally:
        handler.close()
    assert context.metrics.named("RequestsAnsweredAlone")[0].value == 4
    assert declared_context.metrics.named("RequestsAnsweredAlone")[0].value == 4
