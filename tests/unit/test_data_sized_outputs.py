"""Issue 29: model outputs whose leading size is set by the DATA, not by the batch, stated as
properties and searched by Hypothesis.

A detector or a tokenizer returns as many rows as the requests' data holds: with samples that
each hold one item, a data-sized dimension equals the micro-batch size on every call and looks
like the batch dimension; a later micro-batch whose total item count happens to equal its size is
then cut row by row, and requests get their batch-mates' rows in a 200. The layouts generated
(``LAYOUTS``):

- ``flat`` (a): ONE ``(K, 7)`` tensor for the micro-batch, the request's index in column 0, rows
  grouped by request, interleaved or in reverse request order;
- ``nms`` (b): ONNX NonMaxSuppression style, a dict or tuple of ``selected`` ``(K, 3)`` int64
  ``[batch, class, box]`` and ``boxes`` ``(n, CANDIDATES, 4)`` batched along dimension 0;
- ``csr`` (c): a dict or tuple of ``values`` ``(sum of counts, D)`` and ``counts`` ``(n,)`` int64;
- ``concat`` (d): variable-length sequences concatenated, ``values`` only (nothing to declare).

Each request's body is ``[value, count]``: its item count comes from its own data (0 to k, k <= 4).

The invariant (what the framework promises): each response is a 200 equal to the request's answer
ALONE, that is ``postprocess_one`` of the model's output for that request called alone, or an
error of its own (status >= 400, a JSON body with code, type and message); never a batch-mate's
data. Beyond it, liveness: without a declaration the framework answers what it cannot cut with
one model call per request (so every good request gets its 200), and with a declaration
(``batch_dims``: ``{"index_column": 0}``, ``{"counts": "output['counts']"}``) micro-batches run
together and are cut by it.

``postprocess_one`` gives the same JSON for a lone call's whole output as for the part a
declaration cuts (``test_the_answer_alone_is_the_answer_of_a_declared_part`` checks that on a
reference cutter), and it tolerates any shape, so that a wrong cut shows as a wrong 200 here and
not as a 500 of the test's own making.

Profiles (tests/conftest.py): ``ci`` (default, about a minute on 2 cores) and ``soak``;
``bench/soak_layouts.py`` runs the soak for a fixed time and prints a summary per layout. With
``DATA_SIZED_TALLY=<file>`` every example appends its outcomes to that file (JSON lines), and with
``DATA_SIZED_KEEP_GOING=1`` a breach is tallied instead of raised (the soak's shares then cover the
whole run instead of stopping at the first failure). ``DATA_SIZED_NO_EXPLICIT=1`` skips the
hand-picked ``@example``s, so that the search runs even where they fail.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, Phase, event, example, given, note, settings
from hypothesis import strategies as st

from handlers import MicroBatchHandler, Request
from handlers.core.self_test import Sample
from handlers.engine.settings import ConfigError
from handlers.testing import LocalServer, run_batch

# A hang fails the test: a minute or so in CI, the soak's thousands of examples an hour.
pytestmark = pytest.mark.timeout(600 if settings().max_examples <= 100 else 3600)

# -- layouts -----------------------------------------------------------------------------------

LAYOUTS = ("flat", "nms", "csr", "concat")
DECLARABLE = ("flat", "nms", "csr")  # (d) has nothing that says where a request's rows end
ORDERS = ("by_request", "interleaved", "reversed")  # of the rows of a flat output or of NMS's selected
COLUMNS = 7  # of a flat output: the request's index, then 6 values
WIDTH = 6  # of a CSR / concatenated row
CANDIDATES = 6  # NMS boxes per image: above any count (4) and any micro-batch or probe size (5)
MAX_COUNT = 4

GOOD_VALUES = [float(v) for v in range(8)]
# Value-coded faults: -1 → a body that is not JSON (400), 13 → the model raises on any
# micro-batch holding it (500), 99 → postprocess_one raises (500).
FAULT_VALUES = [-1.0, 13.0, 99.0]


@dataclasses.dataclass(frozen=True)
class Layout:
    """How the model lays its data-sized output out: ``name`` one of LAYOUTS, ``structure`` dict or
    tuple for nms/csr (``tensor`` otherwise), ``order`` of the rows for flat/nms."""

    name: str
    structure: str = "tensor"
    order: str = "by_request"

    def paths(self) -> tuple:
        """``(first, second)`` output paths of a two-part output, as ``batch_dims`` names them."""
        if self.structure == "dict":
            first, second = ("selected", "boxes") if self.name == "nms" else ("values", "counts")
            return f"output[{first!r}]", f"output[{second!r}]"
        return "output[0]", "output[1]"

    def declaration(self) -> dict:
        """The truth about this layout in ``handler.batch_dims`` (empty for ``concat``)."""
        if self.name == "flat":
            return {"output": {"index_column": 0}}
        if self.name == "nms":
            selected, boxes = self.paths()
            return {selected: {"index_column": 0}, boxes: 0}
        if self.name == "csr":
            values, counts = self.paths()
            return {values: {"counts": counts}}
        return {}


def row_order(counts: list, order: str) -> list:
    """``[(request index, item index)]`` in the order the model writes its rows."""
    pairs = [(i, j) for i, count in enumerate(counts) for j in range(count)]
    if order == "interleaved":
        return sorted(pairs, key=lambda p: (p[1], p[0]))
    if order == "reversed":
        return sorted(pairs, key=lambda p: (-p[0], p[1]))
    return pairs


def data_row(value: float, count: int, j: int) -> list:
    """Item ``j`` of a request: values that tell requests (and items) apart."""
    return [value, float(count), float(j), 2 * value + 1, value * j, 10 * value + j]


def build(layout: Layout, batch: torch.Tensor) -> Any:
    """The model: a micro-batch of ``[value, count]`` rows → the data-sized output of ``layout``."""
    values = [float(v) for v in batch[:, 0]]
    counts = [int(c) for c in batch[:, 1]]
    n = len(values)
    if layout.name == "flat":
        rows = [[float(i)] + data_row(values[i], counts[i], j) for i, j in row_order(counts, layout.order)]
        return torch.tensor(rows, dtype=torch.float32).reshape(-1, COLUMNS)
    if layout.name == "nms":
        selected = torch.tensor([[i, 8 * int(values[i]) + counts[i], j] for i, j in row_order(counts, layout.order)],
                                dtype=torch.int64).reshape(-1, 3)
        boxes = torch.tensor([[[v, b, v + b, 2 * v + 1] for b in range(CANDIDATES)] for v in values],
                             dtype=torch.float32).reshape(n, CANDIDATES, 4)
        return {"selected": selected, "boxes": boxes} if layout.structure == "dict" else (selected, boxes)
    rows = [data_row(values[i], counts[i], j) for i, j in row_order(counts, "by_request")]
    flat = torch.tensor(rows, dtype=torch.float32).reshape(-1, WIDTH)
    if layout.name == "concat":
        return flat
    per_request = torch.tensor(counts, dtype=torch.int64)
    return {"values": flat, "counts": per_request} if layout.structure == "dict" else (flat, per_request)


def rows_of(leaf: Any, width: int) -> list:
    """A tensor as a list of rows of ``width``, whatever cut it came from (a wrong cut's lone row too)."""
    tensor = torch.as_tensor(leaf)
    if tensor.numel() % width == 0:
        return tensor.reshape(-1, width).tolist()
    return tensor.tolist()


def field(output: Any, layout: Layout, which: int) -> Any:
    if isinstance(output, dict):
        return output[("selected", "boxes")[which] if layout.name == "nms" else ("values", "counts")[which]]
    return output[which]


def answer(layout: Layout, output: Any) -> dict:
    """postprocess_one's answer: the same JSON for a lone call's whole output and for a declared
    part (index column dropped, a lone call's leading 1 of ``boxes`` dropped, a count as an int)."""
    if layout.name == "flat":
        return {"rows": [row[1:] for row in rows_of(output, COLUMNS)]}
    if layout.name == "nms":
        boxes = torch.as_tensor(field(output, layout, 1))
        if boxes.dim() == 3 and boxes.shape[0] == 1:
            boxes = boxes[0]
        return {"detections": [row[1:] for row in rows_of(field(output, layout, 0), 3)], "boxes": boxes.tolist()}
    if layout.name == "concat":
        return {"values": rows_of(output, WIDTH)}
    counts = torch.as_tensor(field(output, layout, 1))
    return {"values": rows_of(field(output, layout, 0), WIDTH),
            "count": int(counts.reshape(-1)[0]) if counts.numel() == 1 else counts.tolist()}


def answer_alone(layout: Layout, value: float, count: int) -> Any:
    """The request's answer alone, as a client reads it: postprocess_one of the model's output
    for that request called alone."""
    return json.loads(json.dumps(answer(layout, build(layout, torch.tensor([[value, float(count)]])))))


# -- the handler -------------------------------------------------------------------------------


class DataSizedModel(torch.nn.Module):
    """``build`` as a module; counts its calls (the test reads them, the hooks do not)."""

    def __init__(self, layout: Layout):
        super().__init__()
        self.layout = layout
        self.calls: list = []

    def forward(self, batch):
        self.calls.append(len(batch))
        return build(self.layout, batch)


class DataSizedHandler(MicroBatchHandler):
    """Bodies ``[value, count]`` (the default preprocessing), a model whose output is data-sized,
    and the value-coded faults (see FAULT_VALUES)."""

    options = {"layout": "flat", "structure": "tensor", "order": "by_request"}

    def layout(self) -> Layout:
        return Layout(self.config["layout"], self.config["structure"], self.config["order"])

    def load_model(self, model_dir, device):
        return DataSizedModel(self.layout())

    def infer(self, batch):
        if (batch[:, 0] == 13.0).any():
            raise RuntimeError("injected model failure")
        return self.model(batch)

    def postprocess_one(self, output, item):
        if float(item[0]) == 99.0:
            raise ZeroDivisionError("injected postprocessing bug")
        return answer(self.layout(), output)


# -- cases ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    """One example: the layout, the batches sent (``(value, count)`` per request; a later batch
    runs with what an earlier one taught), the micro-batch size, whether the layout is declared,
    and the samples (``(value, count)``; a start-up self-test when any)."""

    layout: Layout
    batches: tuple
    micro_batch_size: int
    declared: bool = False
    samples: tuple = ()

    def config(self) -> dict:
        section = {"micro_batch_size": self.micro_batch_size, "pool_size": 1, "layout": self.layout.name,
                   "structure": self.layout.structure, "order": self.layout.order}
        if self.declared:
            section["batch_dims"] = self.layout.declaration()
        return section

    def sample_kind(self) -> str:
        counts = {c for _, c in self.samples}
        if not self.samples:
            return "no samples"
        return f"samples all of count {counts.pop()}" if len(counts) == 1 else "samples of varied counts"

    def has_coincidence(self) -> bool:
        """A micro-batch (of the good requests, in order) whose total count equals its size."""
        for batch in self.batches:
            good = [c for v, c in batch if v != -1.0]
            chunks = [good[i:i + self.micro_batch_size] for i in range(0, len(good), self.micro_batch_size)]
            if any(len(chunk) > 1 and sum(chunk) == len(chunk) and set(chunk) != {1} for chunk in chunks):
                return True
        return False


@st.composite
def cases(draw, declare: str = "sometimes", faults: str = "sometimes"):
    """``declare``: never, sometimes or always (then only the declarable layouts); ``faults``:
    never or sometimes."""
    names = DECLARABLE if declare == "always" else LAYOUTS
    name = draw(st.sampled_from(names))
    structure = draw(st.sampled_from(["dict", "tuple"])) if name in ("nms", "csr") else "tensor"
    order = draw(st.sampled_from(ORDERS)) if name in ("flat", "nms") else "by_request"
    layout = Layout(name, structure, order)
    k = draw(st.integers(1, MAX_COUNT))
    counts = st.one_of(st.just(1), st.integers(0, k))  # one item each: the coincidence's seed
    kind = draw(st.sampled_from(["none", "homogeneous", "varied"]))
    samples: tuple = ()
    if kind == "homogeneous":
        count = draw(counts)
        samples = tuple((v, count) for v in draw(st.lists(st.sampled_from(GOOD_VALUES), min_size=1, max_size=3,
                                                          unique=True)))
    elif kind == "varied":
        samples = tuple(draw(st.lists(st.tuples(st.sampled_from(GOOD_VALUES), counts), min_size=2, max_size=3)))
    with_faults = faults == "sometimes" and draw(st.booleans())
    pool = GOOD_VALUES + FAULT_VALUES if with_faults else GOOD_VALUES
    request = st.tuples(st.sampled_from(pool), counts)
    batches = tuple(tuple(b) for b in draw(st.lists(st.lists(request, min_size=1, max_size=8), min_size=1,
                                                     max_size=2)))
    declared = declare == "always" or (declare == "sometimes" and name in DECLARABLE and draw(st.booleans()))
    return Case(layout, batches, draw(st.integers(1, 4)), declared, samples)


# The exact coincidence of issue 29: samples of one item each teach "dimension 0 is the batch";
# then a micro-batch of 2 whose counts are 2 and 0 (total 2) is cut row by row.
ONE_EACH = ((0.0, 1), (1.0, 1), (2.0, 1))
COINCIDENCE = (((3.0, 2), (4.0, 0)),)
FLAT_COINCIDENCE = Case(Layout("flat"), COINCIDENCE, 2, samples=ONE_EACH)
NMS_COINCIDENCE = Case(Layout("nms", "dict"), COINCIDENCE, 2, samples=ONE_EACH)
CSR_COINCIDENCE = Case(Layout("csr", "dict"), COINCIDENCE, 2, samples=ONE_EACH)
CONCAT_COINCIDENCE = Case(Layout("concat"), COINCIDENCE, 2, samples=ONE_EACH)
# Without samples, the live probe learns the same from a first micro-batch of one item each.
PROBED_COINCIDENCE = Case(Layout("flat"), (((0.0, 1), (1.0, 1), (3.0, 2), (4.0, 0)),), 2)
# Found by the safety property on b3b33ac (shrunk; no samples, every count 1): rows written in
# reverse request order, the live probe at size 1 learns "dimension 0 is the batch", and the two
# requests get each other's row in a 200. A data-sized output need not even be ordered by request.
REVERSED_ONE_EACH = Case(Layout("flat", order="reversed"), (((0.0, 1), (1.0, 1)),), 2)
# Found by the soak (shrunk; one micro-batch, no samples, rows by request): counts 0, 2, 1, 1 total
# 4 at size 4 and the probe's first half (0, 2) totals 2 at size 2, so the probe itself learns
# "dimension 0 is the batch" and cuts row by row.
PROBE_FOOLED = Case(Layout("flat"), (((0.0, 0), (0.0, 2), (0.0, 1), (0.0, 1)),), 4)
# With a declaration, the same coincidence must be cut by it.
DECLARED_FLAT_COINCIDENCE = dataclasses.replace(FLAT_COINCIDENCE, declared=True)
DECLARED_NMS_COINCIDENCE = dataclasses.replace(NMS_COINCIDENCE, declared=True)
DECLARED_CSR_COINCIDENCE = dataclasses.replace(CSR_COINCIDENCE, declared=True)


# -- serving and checking ------------------------------------------------------------------------


@dataclasses.dataclass
class Outcome:
    """What one example did to its requests."""

    answered: int = 0  # good requests answered with their answer alone
    refused: int = 0  # good requests given an error (their own: a valid error body)
    wrong: int = 0  # 200s other than the answer alone (or a 200 for a faulted request)
    broken: int = 0  # error responses without a valid JSON body of their own
    startup_refusal: str = ""  # the ConfigError when the handler would not start
    first_wrong: str = ""  # the first few wrong 200s, in words
    first_refusal: str = ""
    first_broken: str = ""
    model_calls: list = dataclasses.field(default_factory=list)
    micro_batches: int = 0  # the micro-batches the good and model-faulted requests make


def body_of(value: float, count: int) -> Any:
    return b"[1, 2, oops" if value == -1.0 else [value, float(count)]


def error_body_problem(status: int, body: Any) -> str:
    """Why ``body`` is not a valid error response of ``status`` ('' when it is)."""
    if status < 400:
        return f"status {status} is not an error"
    if not isinstance(body, dict):
        return f"body {body!r:.200} is not a JSON object"
    if body.get("code") != status or not isinstance(body.get("type"), str) or not body.get("message"):
        return f"body {body!r:.300} lacks code == {status}, a type or a message"
    return ""


def serve(case: Case) -> Outcome:
    """Start the handler as users do (the test kit's server, the samples' self-test), send each
    batch through the TorchServe adapter (run_batch), and sort every response."""
    outcome = Outcome()
    samples = [Sample(f"sample{i}.json", Request([v, float(c)], {"Content-Type": "application/json"}))
               for i, (v, c) in enumerate(case.samples)]
    try:
        server = LocalServer.start(DataSizedHandler, handler_config=case.config(), samples=samples)
    except ConfigError as exc:
        outcome.startup_refusal = f"{type(exc).__name__}: {exc}"
        goods = sum(1 for batch in case.batches for v, _ in batch if v not in FAULT_VALUES)
        outcome.refused = goods
        return outcome
    model = server.handler.model
    model.calls.clear()  # the self-test's calls are not serving's
    try:
        for batch in case.batches:
            responses, context = run_batch(server.handler, [body_of(v, c) for v, c in batch])
            statuses = context.statuses(len(batch))
            for position, ((value, count), status, body) in enumerate(zip(batch, statuses, responses)):
                sort_response(case, outcome, position, value, count, status, body)
            reaching = sum(1 for v, _ in batch if v != -1.0)
            outcome.micro_batches += math.ceil(reaching / case.micro_batch_size)
    finally:
        server.close()
    outcome.model_calls = list(model.calls)
    return outcome


def sort_response(case: Case, outcome: Outcome, position: int, value: float, count: int, status: int,
                  body: Any) -> None:
    where = f"request {position} {[value, count]}"
    if status == 200:
        if value in FAULT_VALUES:
            outcome.wrong += 1
            outcome.first_wrong = outcome.first_wrong or f"{where}: a faulted request got a 200: {body!r:.300}"
            return
        wanted = answer_alone(case.layout, value, count)
        if body == wanted:
            outcome.answered += 1
        else:
            outcome.wrong += 1
            if outcome.wrong <= 3:  # the first few: the one holding a batch-mate's rows is often not the first
                outcome.first_wrong += f"{'; ' if outcome.first_wrong else ''}{where}: a 200 of {body!r:.300}, " \
                                       f"its answer alone is {wanted!r:.300}"
        return
    problem = error_body_problem(status, body)
    if problem:
        outcome.broken += 1
        outcome.first_broken = outcome.first_broken or f"{where}: {problem}"
    elif value not in FAULT_VALUES:
        outcome.refused += 1
        outcome.first_refusal = outcome.first_refusal or f"{where}: {status} {body.get('type')}: " \
                                                         f"{str(body.get('message'))[:400]}"


def describe(case: Case) -> str:
    declared = f"declared {case.layout.declaration()}" if case.declared else "undeclared"
    return (f"layout {case.layout}, {declared}, {case.sample_kind()} {list(case.samples)}, micro-batch size "
            f"{case.micro_batch_size}, batches {[list(b) for b in case.batches]}")


def label(case: Case, outcome: Outcome) -> None:
    """Statistics per layout (--hypothesis-show-statistics), and the tally the soak reads."""
    name = case.layout.name
    event(f"{name}: {'declared' if case.declared else 'undeclared'}, {case.sample_kind()}")
    if outcome.startup_refusal:
        event(f"{name}: refused at start-up")
    if outcome.wrong:
        event(f"{name}: a wrong 200")
    if outcome.refused:
        event(f"{name}: a good request refused")
    if outcome.answered and not (outcome.wrong or outcome.refused):
        event(f"{name}: every good request answered 200")
    if case.layout.order != "by_request" and any(len(batch) > 1 for batch in case.batches):
        event(f"{name}: rows not in request order")
    if case.has_coincidence():
        event(f"{name}: a micro-batch whose total count equals its size")
    tally = os.environ.get("DATA_SIZED_TALLY")
    if tally:
        record = {"test": os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0], "layout": name,
                  "declared": case.declared, "samples": case.sample_kind(), **dataclasses.asdict(outcome),
                  "case": describe(case)}
        with open(tally, "a") as out:
            out.write(json.dumps(record) + "\n")


def keep_going() -> bool:
    return os.environ.get("DATA_SIZED_KEEP_GOING") == "1"


def check(case: Case, liveness: bool) -> Outcome:
    """Serve ``case`` and assert: no wrong 200, every error a valid one of its own; with
    ``liveness``, no good request refused either. Each breach on its own line, so that Hypothesis
    reports each as a distinct failure."""
    outcome = serve(case)
    note(describe(case))
    label(case, outcome)
    if keep_going():
        return outcome
    assert not outcome.wrong, f"a wrong 200 ({outcome.wrong}): {outcome.first_wrong}; case: {describe(case)}"
    assert not outcome.broken, f"an error without its own JSON body: {outcome.first_broken}; case: {describe(case)}"
    if liveness:
        assert not outcome.startup_refusal, f"refused at start-up: {outcome.startup_refusal:.600}; " \
                                            f"case: {describe(case)}"
        assert not outcome.refused, f"a good request refused ({outcome.refused}): {outcome.first_refusal}; " \
                                    f"case: {describe(case)}"
    return outcome


SETTINGS = dict(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
if os.environ.get("DATA_SIZED_NO_EXPLICIT") == "1":
    # Only generated examples (and their shrinking): the hand-picked ones fail first on code that
    # has the bug, and a failing explicit example stops the search before it starts.
    SETTINGS["phases"] = [Phase.generate, Phase.target, Phase.shrink]


# -- the properties ----------------------------------------------------------------------------


@settings(**SETTINGS, max_examples=settings().max_examples * 4)
@example(case=FLAT_COINCIDENCE)
@example(case=NMS_COINCIDENCE)
@example(case=CSR_COINCIDENCE)
@example(case=CONCAT_COINCIDENCE)
@example(case=PROBED_COINCIDENCE)
@example(case=REVERSED_ONE_EACH)
@example(case=PROBE_FOOLED)
@example(case=DECLARED_FLAT_COINCIDENCE)
@given(case=cases(declare="sometimes", faults="sometimes"))
def test_a_data_sized_output_never_gives_a_request_another_requests_data(case):
    """Safety, over every layout, declared or not, with samples or not, with faults or not: each
    response is the request's answer alone or an error of its own. A refusal passes here."""
    check(case, liveness=False)


@settings(**SETTINGS, max_examples=settings().max_examples * 4)
@example(case=FLAT_COINCIDENCE)
@example(case=NMS_COINCIDENCE)
@example(case=CSR_COINCIDENCE)
@example(case=CONCAT_COINCIDENCE)
@example(case=PROBED_COINCIDENCE)
@example(case=REVERSED_ONE_EACH)
@example(case=PROBE_FOOLED)
@given(case=cases(declare="never", faults="sometimes"))
def test_without_a_declaration_every_good_request_is_answered_alone(case):
    """Liveness without a declaration: what cannot be cut is answered with one model call per
    request, so every good request (faults aside) gets its answer alone in a 200."""
    check(case, liveness=True)


@settings(**SETTINGS, max_examples=settings().max_examples * 4)
@example(case=DECLARED_FLAT_COINCIDENCE)
@example(case=DECLARED_NMS_COINCIDENCE)
@example(case=DECLARED_CSR_COINCIDENCE)
@given(case=cases(declare="always", faults="sometimes"))
def test_with_a_declaration_micro_batches_run_together_and_are_cut_by_it(case):
    """Liveness with a declaration (index_column, counts): every good request is answered, and
    without faults each micro-batch is one model call (no lone calls, no probes)."""
    outcome = check(case, liveness=True)
    faulted = any(v in FAULT_VALUES for batch in case.batches for v, _ in batch)
    if not faulted and not keep_going():
        assert len(outcome.model_calls) == outcome.micro_batches, (
            f"{len(outcome.model_calls)} model calls of sizes {outcome.model_calls} for {outcome.micro_batches} "
            f"micro-batch(es): a declared layout runs each micro-batch once; case: {describe(case)}")


# -- the test's own ground truth -----------------------------------------------------------------


def declared_parts(layout: Layout, output: Any, n: int) -> list:
    """A reference cut by the declaration, as the intended behaviour describes it: index_column →
    the request's rows in order with column 0 set to 0; counts → consecutive segments, each
    request's count a 0-d tensor; a batched dimension 0 → unbind."""

    def by_index(rows: torch.Tensor) -> list:
        parts = []
        for i in range(n):
            mine = rows[rows[:, 0] == i].clone()
            mine[:, 0] = 0
            parts.append(mine)
        return parts

    if layout.name == "flat":
        return by_index(output)
    if layout.name == "nms":
        selected, boxes = by_index(field(output, layout, 0)), list(field(output, layout, 1).unbind(0))
        parts = zip(selected, boxes)
        return [{"selected": s, "boxes": b} if layout.structure == "dict" else (s, b) for s, b in parts]
    values, counts = field(output, layout, 0), field(output, layout, 1)
    segments = values.split([int(c) for c in counts])
    return [{"values": v, "counts": c} if layout.structure == "dict" else (v, c)
            for v, c in zip(segments, counts.unbind(0))]


@settings(max_examples=settings().max_examples * 5, deadline=None)
@given(layout=st.builds(Layout, st.just("flat"), st.just("tensor"), st.sampled_from(ORDERS))
       | st.builds(Layout, st.just("nms"), st.sampled_from(["dict", "tuple"]), st.sampled_from(ORDERS))
       | st.builds(Layout, st.just("csr"), st.sampled_from(["dict", "tuple"])),
       requests=st.lists(st.tuples(st.sampled_from(GOOD_VALUES), st.integers(0, MAX_COUNT)), min_size=1, max_size=8))
def test_the_answer_alone_is_the_answer_of_a_declared_part(layout, requests):
    """postprocess_one answers the same for a declared part as for a lone call's whole output:
    otherwise the properties above would call a correct cut a wrong 200."""
    batch = torch.tensor([[v, float(c)] for v, c in requests])
    parts = declared_parts(layout, build(layout, batch), len(requests))
    got = [json.loads(json.dumps(answer(layout, part))) for part in parts]
    assert got == [answer_alone(layout, v, c) for v, c in requests]


def test_the_coincidence_cut_row_by_row_would_be_a_wrong_200():
    """The check can fail: cutting the issue's coincidence row by row (what a layout learned from
    one-item samples does) gives request 1 a row of request 0, which its answer alone does not hold."""
    layout = Layout("flat")
    requests = [(3.0, 2), (4.0, 0)]
    output = build(layout, torch.tensor([[v, float(c)] for v, c in requests]))
    row_by_row = [json.loads(json.dumps(answer(layout, row))) for row in output.unbind(0)]
    assert row_by_row != [answer_alone(layout, v, c) for v, c in requests]
