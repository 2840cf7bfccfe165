"""Soak of issue 29's properties (``tests/unit/test_data_sized_outputs.py``): data-sized model
outputs (flat with an index column, NMS, CSR, concatenated sequences) through the handler, under
Hypothesis's ``soak`` profile, in rounds of fresh seeds until the time is up; then a summary per
layout, declared or not: the share of good requests answered 200 with their answer alone, the
share refused, the wrong 200s, and the first wrong 200 seen.

    python -m bench.soak_layouts --minutes 10              # tallies every breach, stops at none
    python -m bench.soak_layouts --minutes 10 --strict     # Hypothesis fails and shrinks instead

By default a breach is tallied and the search goes on (``DATA_SIZED_KEEP_GOING=1``), so that the
shares cover the whole soak; ``--strict`` lets each property fail at its first breach and prints
Hypothesis's shrunk examples (``--no-explicit`` skips the hand-picked ones, which fail first on
code that has the bug). Each round's pytest output (with ``--hypothesis-show-statistics``) and
the tally (JSON lines, one per example) are kept in ``--out``. Exits 1 on any wrong 200, any
error without its own JSON body, or any good request refused where the properties want it
answered (without a declaration, or with one in the declaration property).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEST_FILE = "tests/unit/test_data_sized_outputs.py"
LIVENESS_TESTS = ("test_without_a_declaration_every_good_request_is_answered_alone",
                  "test_with_a_declaration_micro_batches_run_together_and_are_cut_by_it")


def run_round(seed: int, out: Path, tally: Path, strict: bool, no_explicit: bool, seconds: float) -> tuple:
    """One pytest run of the properties under the soak profile; ``(return code or None when cut
    at the deadline, its output file)``."""
    log = out / f"round_seed{seed}.txt"
    env = {**os.environ, "HYPOTHESIS_PROFILE": "soak", "DATA_SIZED_TALLY": str(tally)}
    env["DATA_SIZED_KEEP_GOING"] = "0" if strict else "1"
    if no_explicit:
        env["DATA_SIZED_NO_EXPLICIT"] = "1"
    command = [sys.executable, "-m", "pytest", TEST_FILE, "-q", "-p", "no:cacheprovider", "-p", "no:logging",
               "--hypothesis-show-statistics", f"--hypothesis-seed={seed}"]
    with open(log, "w") as output:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT)
        try:
            return process.wait(timeout=max(1.0, seconds)), log
        except subprocess.TimeoutExpired:
            process.terminate()  # the time is up: this round's examples are in the tally already
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            return None, log


def failures_in(log: Path) -> list:
    """The first line of each failure a strict round reported (Hypothesis's shrunk examples)."""
    found = []
    for line in log.read_text(errors="replace").splitlines():
        match = re.search(r"AssertionError: (.*)", line)
        if match and match.group(1) not in found:
            found.append(match.group(1))
    return found


def summarise(tally: Path) -> tuple:
    """``(lines of the per-layout table, breaches)`` from the tally."""
    groups: dict = defaultdict(lambda: defaultdict(int))
    first_wrong: dict = {}
    breaches = 0
    for line in tally.read_text().splitlines() if tally.exists() else []:
        record = json.loads(line)
        key = (record["layout"], "declared" if record["declared"] else "undeclared")
        group = groups[key]
        group["examples"] += 1
        good = record["answered"] + record["refused"] + record["wrong"]
        group["good"] += good
        for field in ("answered", "refused", "wrong", "broken"):
            group[field] += record[field]
        group["start-up refusals"] += bool(record["startup_refusal"])
        live = record["test"].split("::")[-1] in LIVENESS_TESTS
        if live:
            group["refused where liveness holds"] += record["refused"]
        breaches += record["wrong"] + record["broken"] + (record["refused"] if live else 0)
        if record["wrong"] and key not in first_wrong:
            first_wrong[key] = f"{record['first_wrong'][:600]} | {record['case']}"
    header = f"{'layout':8} {'declared':10} {'examples':>8} {'good reqs':>9} {'200 alone':>9} {'refused':>8} " \
             f"{'wrong 200':>9} {'start-up refusals':>17}"
    lines = [header, "-" * len(header)]
    for (layout, declared), group in sorted(groups.items()):
        good = group["good"] or 1
        lines.append(f"{layout:8} {declared:10} {group['examples']:8d} {group['good']:9d} "
                     f"{group['answered'] / good:9.1%} {group['refused'] / good:8.1%} {group['wrong']:9d} "
                     f"{group['start-up refusals']:17d}")
    for (layout, declared), group in sorted(groups.items()):
        if group["broken"]:
            lines.append(f"{layout} {declared}: {group['broken']} error(s) without their own JSON body")
    if first_wrong:
        lines.append("")
        lines.append("first wrong 200 per layout:")
        lines.extend(f"  {layout} {declared}: {text}" for (layout, declared), text in sorted(first_wrong.items()))
    return lines, breaches


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="how long to soak (default 10)")
    parser.add_argument("--strict", action="store_true", help="fail and shrink at the first breach per property")
    parser.add_argument("--no-explicit", action="store_true", help="skip the hand-picked @examples")
    parser.add_argument("--out", type=Path, default=None, help="folder for the rounds' output and the tally")
    args = parser.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="soak_layouts_"))
    out.mkdir(parents=True, exist_ok=True)
    tally = out / "tally.jsonl"
    tally.unlink(missing_ok=True)
    started = time.monotonic()
    deadline = started + 60 * args.minutes
    rounds, failures = 0, []
    while time.monotonic() < deadline:
        seed = random.randrange(2**32)
        code, log = run_round(seed, out, tally, args.strict, args.no_explicit, deadline - time.monotonic())
        rounds += 1
        state = "cut at the deadline" if code is None else f"exit {code}"
        print(f"round {rounds} (seed {seed}): {state}, {log}", flush=True)
        for failure in failures_in(log):
            if failure not in failures:
                failures.append(failure)
    lines, breaches = summarise(tally)
    print(f"\n{rounds} round(s) in {(time.monotonic() - started) / 60:.1f} min; tally {tally}")
    print("\n".join(lines))
    if failures:
        print("\nfailures Hypothesis reported (shrunk):")
        print("\n".join(f"  {failure[:800]}" for failure in failures))
    return 1 if breaches or failures else 0


if __name__ == "__main__":
    sys.exit(main())
