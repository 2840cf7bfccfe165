"""What issue 29's evidence costs at full load: batches back to back through the handler (as
TorchServe hands them over, in one process, no server), in alternating rounds (A B B A ...), each
in a fresh process. By default the audit: ``handler.audit_share`` 0 (off) against the default.
With ``--versus alone``: micro-batches cut by their layout against every request answered by a
model call of its own (what a model whose output cannot be cut pays).

    python -m bench.audit_cost                                  # photo-vga, 4 rounds of 20 s
    python -m bench.audit_cost --workload text --rounds 6 --seconds 15 --out bench/results
    python -m bench.audit_cost --versus alone --rounds 2 --seconds 15

Prints requests per second per round and the median ratio, and how many audits ran and the share
of the run's time they took (the budget is ``audit_share`` of the model's time; with batches back
to back every audit delays the next batch by one lone model call).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.report import publish
from handlers.engine.audit import DEFAULT_SHARE


def measure(workload_name: str, share: float, seconds: float, alone: bool = False) -> dict:
    """In this process: the workload's batches back to back for ``seconds`` (``alone``: each
    request answered by a model call of its own)."""
    from bench.workloads import load_workload
    from handlers.testing import FakeContext

    workload = load_workload(workload_name)
    context = FakeContext(model_yaml_config={"handler": {**workload.handler_config, "audit_share": share}},
                          system_properties={"model_dir": str(workload.model_dir())}, manifest=workload.manifest())
    handler = workload.ours()
    handler.initialize(context)
    if alone:
        handler._scatter.answer_alone("bench.audit_cost --versus alone")
    data = [{"body": body} for body in workload.make_inputs(workload.batch_size)]
    for _ in range(2):  # warm-up
        handler.handle(data, FakeContext.for_batch(len(data)))
    answered, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        batch_context = FakeContext.for_batch(len(data))
        handler.handle(data, batch_context)
        if batch_context.statuses() != [200] * len(data):
            raise RuntimeError(f"failed requests: {batch_context.statuses()}")
        answered += len(data)
    elapsed = time.perf_counter() - started
    audit = handler._engine._model_call.audit
    handler.close()
    return {"share": share, "alone": alone, "req_s": answered / elapsed, "seconds": elapsed,
            "audits": audit.audits if audit else 0, "audit_s": audit.seconds if audit else 0.0,
            "disagreements": audit.disagreements if audit else 0}


def in_a_fresh_process(workload: str, share: float, seconds: float, alone: bool = False) -> dict:
    command = [sys.executable, "-m", "bench.audit_cost", "--one", workload, str(share), str(seconds), str(int(alone))]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.audit_cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", default="photo-vga")
    parser.add_argument("--rounds", type=int, default=4, help="rounds of each setting, alternating (A B B A ...)")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--share", type=float, default=DEFAULT_SHARE)
    parser.add_argument("--out", type=Path, default=None, help="folder for audit_cost.md/.json")
    parser.add_argument("--versus", choices=("audit", "alone"), default="audit",
                        help="audit: audit_share 0 vs --share; alone: cut micro-batches vs every request alone")
    parser.add_argument("--one", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.one[0], float(args.one[1]), float(args.one[2]), bool(int(args.one[3])))))
        return 0
    # (label, audit_share, alone) of A and B
    if args.versus == "audit":
        settings = [("audit_share 0", 0.0, False), (f"audit_share {args.share:g}", args.share, False)]
    else:
        settings = [("micro-batches cut", 0.0, False), ("each request alone", 0.0, True)]
    runs: dict = {label: [] for label, _, _ in settings}
    for number in range(args.rounds * 2):
        label, share, alone = settings[(number + number // 2) % 2]  # A B B A A B ...
        run = in_a_fresh_process(args.workload, share, args.seconds, alone)
        runs[label].append(run)
        print(f"{label}: {run['req_s']:.1f} req/s, {run['audits']} audits taking "
              f"{100 * run['audit_s'] / run['seconds']:.2f}% of the run", flush=True)
    (a_label, _, _), (b_label, _, _) = settings
    a = statistics.median(r["req_s"] for r in runs[a_label])
    b = statistics.median(r["req_s"] for r in runs[b_label])
    spent = statistics.median(100 * r["audit_s"] / r["seconds"] for r in runs[b_label])
    lines = [f"# {'Audit' if args.versus == 'audit' else 'Answering alone'}: cost at full load ({args.workload}, "
             f"{args.rounds} rounds of {args.seconds:g} s each, alternating)",
             "", "| setting | req/s by round | median |", "|---|---|---|"]
    for label, measured in runs.items():
        by_round = ", ".join(f"{r['req_s']:.1f}" for r in measured)
        lines.append(f"| {label} | {by_round} | {statistics.median(r['req_s'] for r in measured):.1f} |")
    lines += ["", f"Median req/s, {b_label} / {a_label}: {b / a:.3f} ({100 * (1 - b / a):+.1f}% cost)"
              + (f"; audits took {spent:.2f}% of the run's time (median); disagreements: "
                 f"{sum(r['disagreements'] for r in runs[b_label])}." if args.versus == "audit" else ".")]
    name = "audit_cost" if args.versus == "audit" else "alone_cost"
    publish(args.out, name, [run for measured in runs.values() for run in measured], "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
