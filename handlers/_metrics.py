"""What the handler tells TorchServe's metrics about each batch (declared in metrics.yaml)."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

log = logging.getLogger(__name__)

try:  # TorchServe's own class when it is installed; the same two fields otherwise (unit tests).
    from ts.metrics.dimension import Dimension
except ImportError:  # pragma: no cover - exercised where TorchServe is absent

    @dataclass(frozen=True)
    class Dimension:  # type: ignore[no-redef]
        name: str
        value: str


def report_metrics(context, report) -> None:
    """Batch size (as a ``BatchSize`` label: the counts per label are the histogram), model
    calls, summed time per stage and errors per status code. Metrics never fail a batch."""
    metrics = getattr(context, "metrics", None)
    if metrics is None:
        return
    try:
        # Fresh lists each call: TorchServe appends its default dimensions to the list it is given.
        metrics.add_counter("BatchesServed", 1, None, [Dimension("BatchSize", str(len(report.outcomes)))])
        metrics.add_counter("ModelCalls", report.model_calls, None, [])
        for stage, seconds in report.stage_seconds.items():
            metrics.add_metric("StageTimeMs", round(seconds * 1000.0, 3), "ms", None, [Dimension("Stage", stage)])
        errors = Counter(outcome.error.status for outcome in report.outcomes if not outcome.ok)
        for status, count in sorted(errors.items()):
            metrics.add_counter("RequestErrors", count, None, [Dimension("StatusCode", str(status))])
    except Exception:  # noqa: BLE001 - a metrics bug must not cost the batch its answers
        log.exception("could not report metrics for a batch")
