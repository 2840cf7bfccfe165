"""What each batch tells the metrics, in no server's terms: every adapter emits these the way its
server takes metrics (TorchServe: ``context.metrics`` → its Prometheus endpoint, declared in
metrics.yaml; Ray Serve: ``ray.serve.metrics``)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass(frozen=True)
class BatchMetric:
    """One value: ``kind`` is "counter" (summed across batches) or "ms" (summed milliseconds)."""

    name: str
    value: float
    kind: str = "counter"
    labels: dict = field(default_factory=dict)


def batch_metrics(report) -> list:
    """Batch size (as a ``BatchSize`` label: the counts per label are the histogram), model
    calls, requests answered alone (a model call each: no layout to cut their micro-batch's
    output by; only when there were some), summed time per stage and errors per status code."""
    metrics = [
        BatchMetric("BatchesServed", 1, labels={"BatchSize": str(len(report.outcomes))}),
        BatchMetric("ModelCalls", report.model_calls),
    ]
    if getattr(report, "answered_alone", 0):
        metrics.append(BatchMetric("RequestsAnsweredAlone", report.answered_alone))
    metrics += [
        BatchMetric("StageTimeMs", round(seconds * 1000.0, 3), "ms", {"Stage": stage})
        for stage, seconds in report.stage_seconds.items()
    ]
    errors = Counter(outcome.error.status for outcome in report.outcomes if not outcome.ok)
    metrics += [
        BatchMetric("RequestErrors", count, labels={"StatusCode": str(status)}) for status, count in sorted(errors.items())
    ]
    return metrics
