"""The worker's main thread, measured in-process: how much of it one response costs, and how
much of the GIL the pool leaves to it.

    python -m bench.hotpath --workloads text tensor --batch 64 --rounds 20 --out bench/results

A TorchServe worker answers a batch on one Python thread: it decodes the requests, calls the
handler's ``handle`` (which waits for the pool and the model threads), then encodes the answers
(``create_predict_response``: ``json.dumps(indent=2)`` for anything not already bytes). Here
TorchServe's own ``Service.predict`` does exactly that on this thread, for a batch of the
workload's inputs as TorchServe hands them over (decoded by its socket reader, on the same
thread, unless ``config.properties`` says ``decode_input_request=false``), and two numbers
come out:

- ``main_us_per_response``: the CPU time of the calling thread (``time.thread_time``) in
  ``predict``, per response. Waiting for the pool costs it nothing; the work it does itself
  (request objects, encoding, copying) does. The target of issue 19: <= 20 us.
  ``handler_us_per_response`` is the part inside our ``handle`` (the rest is TorchServe's:
  reading the batch, writing the response message).
- ``gil_share``: a probe thread counts loop iterations while the batch is answered, over the
  iterations it counts alone in the same time: the share of the GIL the batch left to other
  Python threads (the model thread's Python, the next batch's decoding). 1.0: none taken.

And the tokenizer alone (text): the same probe while two pool threads tokenise the texts one
request at a time with ``encode`` (holds the GIL) and with ``encode_batch([text])`` (releases it).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

from bench.workloads import ROOT, WORKLOADS

PROBE_CHUNK = 10_000


class GilProbe:
    """A thread counting loop iterations while ``running``: how often it gets the GIL."""

    def __init__(self):
        self.count = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._spin, daemon=True)

    def _spin(self):
        count = 0
        while not self.stop.is_set():
            for _ in range(PROBE_CHUNK):
                pass
            count += PROBE_CHUNK
        self.count = count

    def __enter__(self):
        self.started = time.perf_counter()
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.rate = self.count / (time.perf_counter() - self.started)


def alone_rate(seconds: float = 0.5) -> float:
    """The probe's iterations per second with nothing else running."""
    with GilProbe() as probe:
        time.sleep(seconds)
    return probe.rate


def torchserve_decodes() -> bool:
    """Whether this checkout's config.properties lets TorchServe's worker decode JSON and text
    bodies (``decode_input_request``, default true) on its main thread, as it reads them."""
    from scripts.torchserve_instance import read_properties

    return read_properties(ROOT / "config.properties").get("decode_input_request", "true") == "true"


def torchserve_decoded(value: bytes, content_type: str):
    """What TorchServe 0.12's socket reader makes of a body when it decodes
    (``ts/protocol/otf_message_handler.py``, ``_retrieve_input_data``)."""
    try:
        if content_type == "application/json":
            return json.loads(value.decode("utf-8"))
        if content_type.startswith("text"):
            return value.decode("utf-8")
    except ValueError:
        pass
    return value


def wire_batch(workload, bodies: list, decode: bool) -> list:
    """The batch as TorchServe's worker hands it to ``Service.predict``; ``decode``: its socket
    reader decodes the bodies, on the main thread (timed with the rest)."""
    content_type = workload.content_type
    return [{
        "requestId": f"bench-{idx}".encode(),
        "headers": [{"name": b"Content-Type", "value": content_type.encode()}],
        "parameters": [{"name": "body", "value": torchserve_decoded(body, content_type) if decode else body,
                        "contentType": content_type}],
    } for idx, body in enumerate(bodies)]


def torchserve_service(workload, folder: Path, batch: int):
    """Our handler for ``workload``, started by TorchServe's own ``Service`` as a worker does."""
    from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl
    from ts.service import Service

    import handlers

    model_dir = workload.model_dir()
    config = {"batchSize": batch, "handler": {**workload.handler_config, "pool_size": 2}}
    (folder / "model-config.yaml").write_text(yaml.safe_dump(config))
    manifest = workload.manifest()
    manifest["model"]["configFile"] = str(folder / "model-config.yaml")
    handler = workload.ours()
    # The metrics cache of a worker served with the package's metrics.yaml: metrics are emitted
    # on the main thread too.
    metrics = MetricsCacheYamlImpl(str(Path(handlers.__file__).parent / "metrics.yaml"))
    metrics.initialize_cache()
    inside = []  # main-thread CPU seconds inside the handler's handle(), per batch

    def handle(data, context):
        started = time.thread_time()
        try:
            return handler.handle(data, context)
        finally:
            inside.append(time.thread_time() - started)

    service = Service(workload.name, str(model_dir), manifest, handle, None, batch, metrics_cache=metrics)
    service.set_cl_socket(None)
    handler.initialize(service.context)
    handler.main_thread_seconds = inside
    return service, handler


def measure_predict(workload_name: str, batch: int, rounds: int) -> dict:
    workload = WORKLOADS[workload_name]()
    with tempfile.TemporaryDirectory() as tmp:
        service, handler = torchserve_service(workload, Path(tmp), batch)
        try:
            bodies, decode = workload.make_inputs(batch), torchserve_decodes()
            for _ in range(3):  # warm-up: the layout probe, allocator, first calls
                service.predict(wire_batch(workload, bodies, decode))
            per_response, wall, shares = [], [], []
            handler.main_thread_seconds.clear()
            for _ in range(rounds):
                cpu0, wall0 = time.thread_time(), time.perf_counter()
                message = service.predict(wire_batch(workload, bodies, decode))
                per_response.append((time.thread_time() - cpu0) / batch * 1e6)
                wall.append(time.perf_counter() - wall0)
            alone = alone_rate()
            for _ in range(max(3, rounds // 4)):
                with GilProbe() as probe:
                    service.predict(wire_batch(workload, bodies, decode))
                shares.append(probe.rate / alone)
            assert isinstance(message, (bytes, bytearray)) and len(message) > batch
            in_handler = [seconds / batch * 1e6 for seconds in handler.main_thread_seconds[:rounds]]
        finally:
            handler.close()
    return {
        "workload": workload_name, "batch": batch, "rounds": rounds, "torchserve_decodes": decode,
        "main_us_per_response": round(statistics.median(per_response), 1),
        "main_us_per_response_p90": round(sorted(per_response)[int(0.9 * (len(per_response) - 1))], 1),
        "handler_us_per_response": round(statistics.median(in_handler), 1),
        "batch_ms": round(statistics.median(wall) * 1e3, 1),
        "gil_share": round(statistics.median(shares), 3),
    }


def measure_tokenizer(batch: int, rounds: int) -> dict:
    """The probe's share beside two pool threads tokenising one text per call."""
    from tokenizers import Tokenizer

    workload = WORKLOADS["text"]()
    tokenizer = Tokenizer.from_file(str(workload.model_dir() / "tokenizer.json"))
    tokenizer.enable_truncation(max_length=256)
    texts = [t.decode() for t in workload.make_inputs(batch)]
    ways = {"encode": lambda text: tokenizer.encode(text).ids,
            "encode_batch": lambda text: tokenizer.encode_batch([text])[0].ids}
    results = {}
    alone = alone_rate()
    with ThreadPoolExecutor(2) as pool:
        for name, tokenize in ways.items():
            list(pool.map(tokenize, texts))  # warm-up
            shares, times = [], []
            for _ in range(rounds):
                started = time.perf_counter()
                list(pool.map(tokenize, texts))
                times.append(time.perf_counter() - started)
                with GilProbe() as probe:
                    list(pool.map(tokenize, texts))
                shares.append(probe.rate / alone)
            # batch_ms: without the probe (beside a spinning probe, a thread that releases the
            # GIL waits up to the switch interval to take it back: the convoy effect).
            results[name] = {"gil_share": round(statistics.median(shares), 3),
                             "batch_ms": round(statistics.median(times) * 1e3, 2)}
    return {"workload": "tokenizer", "batch": batch, "rounds": rounds, **results}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hotpath", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", nargs="+", default=["text", "tensor"], choices=sorted(WORKLOADS))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--label", default="", help="a name for this run in the output (e.g. before, after)")
    parser.add_argument("--out", type=Path, default=None, help="folder for hotpath[_LABEL].json")
    args = parser.parse_args(argv)
    rows = [measure_predict(name, args.batch, args.rounds) for name in args.workloads]
    if "text" in args.workloads:
        rows.append(measure_tokenizer(args.batch, args.rounds))
    for row in rows:
        print(json.dumps(row), flush=True)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        name = f"hotpath_{args.label}.json" if args.label else "hotpath.json"
        (args.out / name).write_text(json.dumps({"machine": platform.platform(), "label": args.label,
                                                 "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
