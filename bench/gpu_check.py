"""Issue 32's GPU checks in one run, on the first CUDA GPU, in under 5 minutes on one H100:

    python -m bench.gpu_check [--only tests oom-overlap probe-oom oom device-assert e2e] [--out DIR]

- ``tests``: the GPU and CPU regressions of findings 1-7 (``tests/unit/test_gpu_paths.py``) and
  ``tests/unit/test_gpu.py``;
- ``oom-overlap`` (finding 5): two model threads whose micro-batches fit alone but not side by
  side: every request 200 with its own answer, the micro-batch size not capped;
- ``probe-oom`` (finding 6): a lone request whose layout is unknown, near the memory limit (twice
  it does not fit): 200 with its own answer, every time;
- ``oom``: a real out-of-memory error: the failed attempt's memory is back to the baseline before
  the halves run, and every request is 200;
- ``device-assert``: a device-side assert on one request with two model threads, in a process of
  its own: each answer a 500/503 or exactly its own 200, never a wrong 200; every request after
  is a 503 (the worker reports itself unhealthy);
- ``e2e``: the image classifier example (``archiver_configs/image_classifier.yaml``) on a real
  TorchServe, 12 MP photos from 32 clients: images/s and the share of time the GPU was busy
  (``bench/gpu.py``); skipped where TorchServe is not installed.

Each check but ``tests`` and ``e2e`` runs in a process of its own (a CUDA context a check breaks
or fills stays out of the next). Exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECKS = ("tests", "oom-overlap", "probe-oom", "oom", "device-assert", "e2e")
MIB = 2 ** 20
CHUNK = 256 * MIB  # scratch per request in the memory checks
JSON_HEADERS = {"Content-Type": "application/json"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=CHECKS, default=list(CHECKS), help="the checks to run")
    parser.add_argument("--seconds", type=float, default=30, help="e2e: seconds measured")
    parser.add_argument("--concurrency", type=int, default=32, help="e2e: clients")
    parser.add_argument("--out", type=Path, help="a folder for gpu_check.json")
    parser.add_argument("--child", choices=CHECKS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(CHILDREN[args.child]()))
        return 0
    results = []
    for name in args.only:
        started = time.perf_counter()
        try:
            if name == "tests":
                result = run_tests()
            elif name == "e2e":
                result = run_e2e(args.seconds, args.concurrency)
            else:
                result = in_child(name)
        except Exception as exc:  # noqa: BLE001 - one check's failure is reported, the others still run
            result = {"ok": False, "detail": f"{type(exc).__name__}: {exc}"}
        result["seconds"] = round(time.perf_counter() - started, 1)
        results.append({"check": name, **result})
        print(f"{name}: {'ok' if result['ok'] else 'FAILED'} ({result['seconds']} s) {result['detail']}", flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_check.json").write_text(json.dumps(results, indent=2))
    return 0 if all(r["ok"] for r in results) else 1


def in_child(name: str, timeout_s: float = 90) -> dict:
    try:
        done = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--child", name], cwd=ROOT,
                              capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"ok": False, "detail": f"no answer within {timeout_s:.0f} s"}
    lines = done.stdout.strip().splitlines()
    try:
        return json.loads(lines[-1])
    except (IndexError, ValueError):
        return {"ok": False, "detail": f"exit {done.returncode}: {done.stderr.strip()[-2000:]}"}


def run_tests() -> dict:
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/unit/test_gpu_paths.py",
                           "tests/unit/test_gpu.py"], cwd=ROOT, capture_output=True, text=True, timeout=180)
    tail = done.stdout.strip().splitlines()[-15:]
    return {"ok": done.returncode == 0, "detail": " | ".join(tail[-1:]), "output": tail}


# -- the checks that run in a process of their own ---------------------------------------------------

def _limit_memory(extra_bytes: int) -> None:
    """Caps torch's allocator at what is allocated now plus ``extra_bytes``."""
    import torch

    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, (torch.cuda.memory_allocated(0) + extra_bytes) / total), 0)


def _rows(n: int, offset: int = 0) -> list:
    return [[float(i + offset), 1.0, -2.0] for i in range(n)]


def _requests(rows: list) -> list:
    from handlers import Request

    return [Request(row, JSON_HEADERS) for row in rows]


def _exact(responses, rows) -> tuple:
    """(wrong 200s, right 200s, statuses) of answers of y = 2x + 1."""
    wrong = right = 0
    for response, row in zip(responses, rows):
        if response.status == 200:
            body = response.body[0] if response.body and isinstance(response.body[0], list) else response.body
            if body == [2 * v + 1 for v in row]:
                right += 1
            else:
                wrong += 1
    return wrong, right, sorted({r.status for r in responses})


def _scratch_handler(fraction: float = 1.0, busy: int = 0, step: bool = False):
    """y = 2x + 1, with ``fraction`` * CHUNK of scratch per request (in two halves when ``step``:
    the first still held when the second runs out of memory), after ``busy`` matrix products
    (so that two model threads' calls overlap). Notes (size, allocated at entry, ran out)."""
    import torch

    from handlers import MicroBatchHandler

    calls = []

    class Scratch(MicroBatchHandler):
        def load_model(self, model_dir, device):
            eye = torch.eye(2048, device=device)

            def model(batch):
                entry = torch.cuda.memory_allocated(batch.device)
                floats = int(fraction * CHUNK / 4) * batch.shape[0]
                try:
                    if step:
                        held = torch.ones(floats // 2, device=batch.device)
                        scratch = torch.ones(floats - floats // 2, device=batch.device) + held[0]
                    else:
                        scratch = torch.ones(floats, device=batch.device)
                except torch.OutOfMemoryError:
                    calls.append((batch.shape[0], entry, True))
                    raise
                calls.append((batch.shape[0], entry, False))
                wide = eye
                for _ in range(busy):
                    wide = wide @ eye
                if busy:  # the scratch is held until the work is done (as a model reading .item() does)
                    torch.cuda.current_stream(batch.device).synchronize()
                return 2 * batch + scratch[0] + wide[0, 0] - 1  # scratch and eye are 1: + 1

            return model

    return Scratch, calls


def check_oom_overlap() -> dict:
    """Finding 5: micro-batches of 4 fit alone (4 chunks) but not two side by side (8 chunks)."""
    handler_class, calls = _scratch_handler(busy=400)
    handler = handler_class()
    handler.start(section={"micro_batch_size": 4, "inference_workers": 2, "batch_dims": {"output": 0},
                           "audit_share": 0}, device="cuda:0")
    try:
        _limit_memory(6 * CHUNK + 64 * MIB)
        wrong = right = 0
        statuses = set()
        for round_ in range(4):
            rows = _rows(16, 100 * round_)
            w, r, s = _exact(handler.respond(_requests(rows))[0], rows)
            wrong, right, statuses = wrong + w, right + r, statuses | set(s)
        cap = handler._engine.safe_micro_batch_size
    finally:
        handler.close()
    ran_out = sum(1 for _, _, failed in calls if failed)
    ok = wrong == 0 and right == 64 and cap is None and ran_out > 0
    return {"ok": ok, "detail": f"{right}/64 exact 200s, {wrong} wrong, statuses {sorted(statuses)}, cap {cap}, "
                                f"{ran_out} call(s) out of memory side by side"
                                + ("" if ran_out else " (NOT exercised: the calls did not overlap)")}


def check_probe_oom() -> dict:
    """Finding 6: no samples, no declaration: a lone request is probed at 2 and 3, which do not fit."""
    handler_class, calls = _scratch_handler(fraction=1.0)
    handler = handler_class()
    handler.start(section={"micro_batch_size": 1, "audit_share": 0}, device="cuda:0")
    try:
        _limit_memory(CHUNK + CHUNK // 2)
        results = []
        for i in range(3):
            rows = _rows(1, i)
            results.append(_exact(handler.respond(_requests(rows))[0], rows))
    finally:
        handler.close()
    right = sum(r for _, r, _ in results)
    wrong = sum(w for w, _, _ in results)
    ran_out = sum(1 for _, _, failed in calls if failed)
    return {"ok": right == 3 and wrong == 0 and ran_out > 0,
            "detail": f"{right}/3 lone requests 200 with their answer, {wrong} wrong, statuses "
                      f"{[s for _, _, s in results]}, {ran_out} probe(s) out of memory"}


def check_oom() -> dict:
    """A real out-of-memory error on a micro-batch of 8 (4 fit): the halves start where it started."""
    handler_class, calls = _scratch_handler(fraction=1.0, step=True)
    handler = handler_class()
    handler.start(section={"micro_batch_size": 8, "batch_dims": {"output": 0}, "audit_share": 0}, device="cuda:0")
    try:
        _limit_memory(5 * CHUNK)
        rows = _rows(8)
        wrong, right, statuses = _exact(handler.respond(_requests(rows))[0], rows)
    finally:
        handler.close()
    entries = [entry for _, entry, _ in calls]
    failed = [size for size, _, ran_out in calls if ran_out]
    spread = (max(entries) - min(entries)) / MIB if entries else None
    ok = right == 8 and wrong == 0 and failed == [8] and spread is not None and spread < 1
    return {"ok": ok, "detail": f"{right}/8 exact 200s, statuses {statuses}, calls {[(s, f) for s, _, f in calls]}, "
                                f"memory at each call's start within {spread:.2f} MiB of the first"}


def check_device_assert() -> dict:
    """A device-side assert (an index out of range, on the GPU) on one request, two model threads."""
    import torch

    from handlers import MicroBatchHandler

    class Lookup(MicroBatchHandler):
        def load_model(self, model_dir, device):
            table = torch.arange(10.0, device=device)

            def model(batch):  # row [i, a, b] -> [table[i] * 2 + 1, 2a + 1, 2b + 1]
                looked_up = table[batch[:, 0].long()]
                return torch.cat([2 * looked_up[:, None] + 1, 2 * batch[:, 1:] + 1], dim=1)

            return model

    handler = Lookup()
    handler.start(section={"micro_batch_size": 2, "inference_workers": 2, "batch_dims": {"output": 0},
                           "audit_share": 0}, device="cuda:0")
    try:
        rows = [[float(i % 10), float(i), -1.0] for i in range(16)]
        rows[5][0] = 1000.0  # the poison
        first = handler.respond(_requests(rows))[0]
        after = handler.respond(_requests(_rows(4)))[0]
        reason = handler.unhealthy_reason
    finally:
        handler.close()
    wrong = sum(1 for r, row in zip(first, rows) if r.status == 200 and r.body != [2 * v + 1 for v in row])
    right = sum(1 for r, row in zip(first, rows) if r.status == 200 and r.body == [2 * v + 1 for v in row])
    others = sorted({r.status for r in first if r.status != 200})
    ok = (wrong == 0 and first[5].status in (500, 503) and set(others) <= {500, 503}
          and {r.status for r in after} == {503} and reason is not None)
    return {"ok": ok, "detail": f"{right} exact 200s, {wrong} wrong 200s, others {others}, poison {first[5].status}; "
                                f"after: {sorted({r.status for r in after})}; unhealthy: {reason is not None}"}


CHILDREN = {"oom-overlap": check_oom_overlap, "probe-oom": check_probe_oom, "oom": check_oom,
            "device-assert": check_device_assert}


# -- end to end on TorchServe ------------------------------------------------------------------------

def run_e2e(seconds: float, concurrency: int) -> dict:
    import shutil

    if shutil.which("torchserve") is None or shutil.which("java") is None:
        return {"ok": True, "detail": "skipped: TorchServe (torchserve, java) is not installed here"}
    from bench.goodput import CONFIG, torchserve_serving
    from bench.gpu import GpuBusy
    from bench.loadgen import run_closed_loop
    from bench.workloads import WORKLOADS

    bodies = WORKLOADS["photo-12mp"]().make_inputs(32)
    with tempfile.TemporaryDirectory(prefix="gpu-check-", dir="/tmp") as work:
        with torchserve_serving(Path(work), {}, CONFIG) as (instance, name):
            url = f"{instance.inference_url}/predictions/{name}"
            with GpuBusy(int(os.environ.get("GPU_INDEX", "0"))) as busy:
                load = run_closed_loop(url, bodies, {"Content-Type": "image/jpeg", **instance.auth()}, concurrency,
                                       seconds)
    summary = load.summary()
    share = busy.share
    return {"ok": summary["errors"] == 0 and summary["requests_ok"] > 0,
            "detail": f"{summary['throughput_rps']} img/s (12 MP, {concurrency} clients), p99 {summary['p99_ms']} ms, "
                      f"errors {summary['errors']}, mean batch {summary['mean_batch_size']}, GPU busy "
                      + (f"{share:.0%}" if share is not None else "unknown (no NVML)"),
            "load": summary, "gpu_busy": share}


if __name__ == "__main__":
    sys.exit(main())
