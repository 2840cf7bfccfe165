"""Issue 29's contract on a flat detector, through real servers: every request gets its own boxes
or its own clear error, never a batch-mate's.

    python -m bench.detector_contract --requests 600 --concurrency 32 --out bench/results

The model is ``examples/flat_detector`` (one (K, 7) tensor of boxes per micro-batch, the image's
index in column 0), served from ``archiver_configs/flat_detector.yaml`` as shipped (no
declaration: its one-box samples make K equal the micro-batch size at start-up) and with
``handler.batch_dims: {output: {index_column: 0}}`` declared, each alone on TorchServe and on Ray
Serve. The clients send varied images (0 to 5 boxes each, seeded) and each answer is checked
against the model's answer on that image alone, computed in this process. Per server and config:
correct and wrong 200s, the other answers by status and type, req/s, the mean batch the server
handed the handler (``X-Batch-Size``) and the handler's model calls per request (its
``ModelCalls`` metric: TorchServe's Prometheus endpoint, Ray's metrics export).
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, Optional

import requests
import yaml

from bench.goodput import on_ray_serve, torchserve_serving
from bench.report import publish
from bench.workloads import ROOT, WORK
from handlers.packaging.archive import build_artefacts, load_spec

CONFIG = ROOT / "archiver_configs" / "flat_detector.yaml"
EXAMPLE = ROOT / "examples" / "flat_detector"
DECLARED_NAME = "flat_detector_declared"
DECLARATION = {"output": {"index_column": 0}}
CONFIGS = ("no declaration", "declared")
SERVERS = ("torchserve", "ray")
SCORE_TOLERANCE = 1e-3  # answers carry scores rounded to 4 places


# -- the example, and what each image must get ---------------------------------------------------


@lru_cache(maxsize=None)
def example(module: str):
    """``examples/flat_detector/<module>.py``, imported under its own name (every example has a
    ``handler.py`` and a ``model.py``)."""
    spec = importlib.util.spec_from_file_location(f"flat_detector_{module}", EXAMPLE / f"{module}.py")
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return loaded


def declared_config(folder: Path) -> Path:
    """The shipped config with the declaration added, as ``flat_detector_declared``."""
    config = yaml.safe_load(CONFIG.read_text())
    config.update(root=str(ROOT), model_name=DECLARED_NAME)
    config["model_config"]["handler"]["batch_dims"] = DECLARATION
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{DECLARED_NAME}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def config_for(label: str, folder: Path) -> Path:
    return CONFIG if label == "no declaration" else declared_config(folder)


def images(count: int, seed: int) -> list:
    """``count`` PNGs, 0 to 5 boxes each."""
    return example("images").random_images(count, seed=seed)


def expected_answers(pngs: list) -> list:
    """Each image's answer as the model gives it alone (a micro-batch of one, column 0 all 0),
    through the example's own decoding and answer: what the server must send for it."""
    import torch

    handler, model_module = example("handler"), example("model")
    spec = load_spec(CONFIG)
    build_artefacts(spec)  # the weights, when not built yet
    settings = {**handler.FlatDetectorHandler.options, **spec.model_config["handler"]}
    model = model_module.FlatDetector()
    model.load_state_dict(torch.load(spec.serialized_file, weights_only=True))
    geometry = handler.ImageGeometry(resize=settings["size"], crop=settings["size"])
    limits = handler.ImageLimits(max_bytes=settings["max_bytes"], max_pixels=settings["max_pixels"])
    answers = []
    with torch.inference_mode():
        for png in pngs:
            pixels = torch.from_numpy(handler.greyscale(png, geometry, limits))[None, None].float() / 255.0
            answers.append(handler.boxes_json(model(pixels), settings["labels"]))
    return answers


def same_answer(got, want) -> bool:
    """The same boxes, in the same order, with the same labels; scores within rounding."""
    if not (isinstance(got, dict) and isinstance(got.get("boxes"), list)) or len(got["boxes"]) != len(want["boxes"]):
        return False
    return all(
        isinstance(g, dict) and g.get("box") == w["box"] and g.get("label") == w["label"]
        and isinstance(g.get("score"), (int, float)) and abs(g["score"] - w["score"]) <= SCORE_TOLERANCE
        for g, w in zip(got["boxes"], want["boxes"])
    )


# -- sending and checking ------------------------------------------------------------------------


@dataclass
class Answer:
    status: int  # 599: no answer (the client's timeout, a closed connection)
    body: object
    batch_size: Optional[int]  # X-Batch-Size: the batch the server handed the handler


def send_all(url: str, bodies: list, headers: dict, concurrency: int, timeout_s: float = 60.0) -> tuple:
    """Every body POSTed once, ``concurrency`` at a time; ``([Answer, ...] in body order, seconds)``."""
    local = threading.local()

    def send(body: bytes) -> Answer:
        if not hasattr(local, "session"):
            local.session = requests.Session()  # one per client thread: keep-alive, as real clients
        try:
            response = local.session.post(url, data=body, headers=headers, timeout=timeout_s)
        except requests.RequestException as exc:
            return Answer(599, f"{type(exc).__name__}: {exc}", None)
        try:
            body_read = response.json()
        except ValueError:
            body_read = response.text
        batch = response.headers.get("X-Batch-Size")
        return Answer(response.status_code, body_read, int(batch) if batch and batch.isdigit() else None)

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        answers = list(pool.map(send, bodies))
    return answers, time.perf_counter() - started


@dataclass
class Tally:
    """Each answer against its image's answer alone."""

    correct: int = 0
    wrong: int = 0  # 200s that are not this image's boxes
    others: Counter = field(default_factory=Counter)  # "500 SplitFailed": count
    wrong_examples: list = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.correct + self.wrong + sum(self.others.values())


def check(answers: list, expected: list, examples: int = 3) -> Tally:
    tally = Tally()
    for index, (answer, want) in enumerate(zip(answers, expected)):
        if answer.status != 200:
            kind = answer.body.get("type", "") if isinstance(answer.body, dict) else ""
            tally.others[f"{answer.status} {kind}".strip()] += 1
        elif same_answer(answer.body, want):
            tally.correct += 1
        else:
            tally.wrong += 1
            if len(tally.wrong_examples) < examples:
                tally.wrong_examples.append({"request": index, "expected": want, "got": answer.body})
    return tally


# -- the handler's model calls, from each server's metrics ----------------------------------------


def counter_total(text: str, metric: str, labels: dict) -> float:
    """The sum of a Prometheus counter's samples whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"^{metric}\{{(.*)\}} ([0-9.eE+-]+)$", line)
        if match and labels.items() <= dict(re.findall(r'(\w+)="([^"]*)"', match.group(1))).items():
            total += float(match.group(2))
    return total


def settled(read: Callable[[], float], before: float, interval_s: float, timeout_s: float) -> Optional[float]:
    """``read()`` once it has moved past ``before`` and then held still for ``interval_s`` (metrics
    reach an endpoint a few seconds late); None if it never moved within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last = read()
    while time.monotonic() < deadline:
        time.sleep(interval_s)  # another process's export interval: nothing to wait on instead
        now = read()
        if now == last and now > before:
            return now
        last = now
    return last if last > before else None


def torchserve_calls(instance, name: str) -> Callable[[], float]:
    def read() -> float:
        status, body = instance.get(f"{instance.metrics_url}/metrics", api=None)
        return counter_total(body.decode(), "ModelCalls", {"ModelName": name}) if status == 200 else 0.0

    return read


def ray_calls(application: str) -> Callable[[], float]:
    from handlers.servers.ray_cluster import metrics_url

    def read() -> float:
        url = metrics_url()
        try:
            text = requests.get(url, timeout=10).text if url else ""
        except requests.RequestException:
            text = ""
        return counter_total(text, "ray_microbatch_model_calls_total", {"application": application})

    return read


# -- one server, one config -----------------------------------------------------------------------


def measure(server: str, label: str, url: str, headers: dict, calls: Callable[[], float], pngs: list,
            expected: list, args, settle_s: float) -> dict:
    print(f"{server}, {label}: {len(pngs)} requests from {args.concurrency} clients", file=sys.stderr, flush=True)
    before = calls()
    answers, seconds = send_all(url, pngs, {"Content-Type": "image/png", **headers}, args.concurrency)
    after = settled(calls, before, settle_s, 60.0)
    tally = check(answers, expected)
    batches = [a.batch_size for a in answers if a.batch_size]
    return {
        "server": server, "config": label, "requests": len(pngs), "correct_200": tally.correct,
        "wrong_200": tally.wrong, "other": dict(sorted(tally.others.items())),
        "req_per_s": round(len(pngs) / seconds, 1),
        "mean_x_batch_size": round(sum(batches) / len(batches), 2) if batches else None,
        "model_calls": None if after is None else int(after - before),
        "model_calls_per_request": None if after is None else round((after - before) / len(pngs), 3),
        "wrong_examples": tally.wrong_examples,
    }


def refused(server: str, label: str, exc: BaseException, requests_count: int) -> dict:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    reason = re.sub(r"^\S+\.yaml: ", "", reason)  # the config written for this run: its path says nothing
    print(f"{server}, {label}: cannot serve: {reason}", file=sys.stderr, flush=True)
    return {"server": server, "config": label, "requests": requests_count, "refused": f"{type(exc).__name__}: {reason}"}


def on_torchserve(label: str, work: Path, pngs: list, expected: list, args) -> dict:
    config = config_for(label, work / "configs")
    try:
        with torchserve_serving(work / f"torchserve-{label.replace(' ', '_')}", {}, config) as (instance, name):
            return measure("TorchServe", label, f"{instance.inference_url}/predictions/{name}", instance.auth(),
                           torchserve_calls(instance, name), pngs, expected, args, settle_s=1.0)
    except Exception as exc:  # noqa: BLE001 - a config or model that cannot start is this row's result
        return refused("TorchServe", label, exc, len(pngs))


def on_ray(label: str, work: Path, pngs: list, expected: list, args) -> dict:
    config = config_for(label, work / "configs")
    name = yaml.safe_load(config.read_text())["model_name"]
    try:
        with on_ray_serve(config) as url:
            return measure("Ray Serve", label, url, {}, ray_calls(name), pngs, expected, args, settle_s=6.0)
    except Exception as exc:  # noqa: BLE001 - as on_torchserve
        return refused("Ray Serve", label, exc, len(pngs))


def table(rows: list, args, base: str) -> str:
    lines = [f"{args.requests} requests per row from {args.concurrency} clients, images with 0 to 5 boxes "
             f"(seed {args.seed}), each answer checked against the model's on that image alone; {base}.",
             "",
             "| server | config | wrong 200s | correct 200s | other answers | req/s | mean X-Batch-Size | "
             "model calls / request |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if "refused" in row:
            lines.append(f"| {row['server']} | {row['config']} | – | – | cannot serve: {row['refused'][:240]} "
                         f"| – | – | – |")
            continue
        others = ", ".join(f"{kind}: {count}" for kind, count in row["other"].items()) or "none"
        calls = "–" if row["model_calls_per_request"] is None else f"{row['model_calls_per_request']:.3f}"
        lines.append(f"| {row['server']} | {row['config']} | {row['wrong_200']} | {row['correct_200']} "
                     f"({row['correct_200'] / row['requests']:.0%}) | {others} | {row['req_per_s']} | "
                     f"{row['mean_x_batch_size']} | {calls} |")
    for row in rows:
        for wrong in row.get("wrong_examples", [])[:1]:
            lines.append(f"\n{row['server']}, {row['config']}: request {wrong['request']} should have got "
                         f"{boxes_of(wrong['expected'])}, got {boxes_of(wrong['got'])}")
    return "\n".join(lines)


def boxes_of(answer) -> str:
    """An answer's boxes, short: ``[x0, y0, x1, y1] label`` each."""
    if not (isinstance(answer, dict) and isinstance(answer.get("boxes"), list)):
        return repr(answer)[:120]
    if not answer["boxes"]:
        return "no boxes"
    return f"{len(answer['boxes'])} box(es): " + ", ".join(f"{b.get('box')} {b.get('label')}" for b in answer["boxes"])


def code_version() -> str:
    """The commit measured, and the last one that changed the framework (``handlers/``)."""
    def short(*args) -> str:
        result = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return result.stdout.strip() or "unknown"

    dirty = " (with uncommitted changes)" if short("status", "--porcelain", "--", "handlers") != "unknown" else ""
    return (f"commit {short('rev-parse', '--short', 'HEAD')}, handlers/ as at "
            f"{short('log', '-1', '--format=%h', '--', 'handlers')}{dirty}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--servers", nargs="*", choices=SERVERS, default=list(SERVERS))
    parser.add_argument("--configs", nargs="*", choices=CONFIGS, default=list(CONFIGS))
    parser.add_argument("--out", type=Path)
    parser.add_argument("--name", default="detector_contract")
    args = parser.parse_args(argv)
    work = WORK / "detector_contract"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    pngs = images(args.requests, args.seed)
    expected = expected_answers(pngs)
    rows = []
    for server in args.servers:
        for label in args.configs:
            run = on_torchserve if server == "torchserve" else on_ray
            rows.append(run(label, work, pngs, expected, args))
    publish(args.out, args.name, rows, table(rows, args, code_version()))
    return 1 if any(row.get("wrong_200") for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
