"""In-process comparison with TorchServe's real stock ``ImageClassifier`` (``ts.torch_handler.
image_classifier``, torchvision transforms): same torch, same model and weights, same JPEG bytes.

    python -m bench.stock_image_classifier --out bench/results            # photo-12mp, batch 32, small CNN
    python -m bench.stock_image_classifier --model resnet18-torchvision --name stock_image_classifier_resnet18 --out bench/results

Contenders, each archived with the real ``torch-model-archiver`` (model file + serialized
state_dict + ``index_to_name.json``), unpacked, loaded by TorchServe's own model loader
(``ts.model_loader.TsModelLoader``: the real ``ts.context.Context`` and metrics cache, as the
worker builds them) and called through ``handle(data, context)`` with the context prepared as the
worker's ``Service.predict`` prepares it:

- ``stock``: ``--handler image_classifier``, TorchServe's own handler, unmodified;
- ``sequential``: the bench's re-implementation of it (``bench/baselines.py``), the old headline's
  baseline;
- ``ours``: ``ImageClassifierHandler`` with the headline's settings (``micro_batch_strategy:
  adaptive``).

Every contender runs in its own subprocess; the contenders take turns ``--repeats`` times (so that
a slow minute of the shared VM falls on all of them), each turn ``--warmup`` unmeasured batches and
then at least ``--rounds`` batches and 3 s. Before timing, the parent checks that all three give the
same top-1 class for each distinct photo. Needs torchvision (and captum, which TorchServe's
``VisionHandler`` imports); the project's own venv has neither, see the results file for the
bench venv.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import zipfile
from pathlib import Path

from bench.report import publish

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / ".work" / "stock_image_classifier"
CONTENDERS = ("stock", "sequential", "ours")
HANDLER = {
    "stock": "image_classifier",  # TorchServe's built-in handler, by name, as in its docs
    "sequential": str(ROOT / "bench" / "serve_handlers" / "sequential_image.py"),
    "ours": str(ROOT / "bench" / "serve_handlers" / "ours_image.py"),
}
MIN_MEASURED_S = 3.0
DISTINCT_PHOTOS = 4  # workloads.photos() cycles through 4 distinct photos
# One more model besides workloads.IMAGE_MODELS: the stock handler needs a model file with exactly
# one class, which examples/image_classifier/model.py (ResNet-18 and its block) is not.
EXTRA_MODELS = {"resnet18-torchvision": ROOT / "bench" / "models" / "resnet18_torchvision.py"}


def load_workload(name: str, model: str | None):
    from bench import workloads

    if model in EXTRA_MODELS:
        workload = workloads.load_workload(name)
        workload.model_file = EXTRA_MODELS[model]
        return workload
    return workloads.load_workload(name, model)


def build_archive(contender: str, workload_name: str, model: str | None) -> Path:
    """A real .mar for ``contender``, built by torch-model-archiver and unpacked as TorchServe
    unpacks it; returns the folder."""

    workload = load_workload(workload_name, model)
    model_dir = workload.model_dir()  # small_cnn.py / model.py, weights.pt (seed 0), index_to_name.json
    name = f"{workload_name.replace('-', '_')}_{workload.model_file.stem}_{contender}"
    store, unpacked = WORK / "store", WORK / name
    store.mkdir(parents=True, exist_ok=True)
    config = {"batchSize": workload.batch_size, "maxBatchDelay": 50, "minWorkers": 1, "maxWorkers": 1,
              "responseTimeout": 120}
    if contender == "ours":
        config["handler"] = dict(workload.handler_config)
    config_file = WORK / f"{name}.yaml"
    config_file.write_text(json.dumps(config))  # JSON is YAML
    extra = [model_dir / "index_to_name.json"]
    if contender == "sequential":
        extra.append(ROOT / "bench" / "baselines.py")
    archiver = Path(sys.executable).with_name("torch-model-archiver")
    subprocess.run(
        [str(archiver), "--model-name", name, "--version", "1.0", "--model-file", str(model_dir / workload.model_file.name),
         "--serialized-file", str(model_dir / "weights.pt"), "--handler", HANDLER[contender],
         "--extra-files", ",".join(map(str, extra)), "--config-file", str(config_file),
         "--export-path", str(store), "--force"],
        check=True,
    )
    shutil.rmtree(unpacked, ignore_errors=True)
    with zipfile.ZipFile(store / f"{name}.mar") as mar:
        mar.extractall(unpacked)
    return unpacked


def top5(response) -> list:
    """The class indices of one response, best first, whichever handler wrote it."""
    if isinstance(response, (bytes, bytearray, str)):
        response = json.loads(response)
    if isinstance(response, dict):  # stock: {label: probability}, best first
        return [int(label.rsplit("_", 1)[1]) for label in response]
    return [int(entry["index"]) for entry in response]  # ours, sequential: [{"index": ...}, ...]


def compare_inputs(workload_name: str, model: str | None) -> dict:
    """What each contender feeds the model for each distinct photo, against the stock handler's
    torchvision pipeline: pixel differences (0–255 units, after undoing the normalisation) and the
    same model's outputs on those inputs."""
    import io

    import torch
    from PIL import Image
    from ts.torch_handler.image_classifier import ImageClassifier

    from bench.baselines import IMAGENET_STD, SequentialImageClassifier
    from handlers import ImageClassifierHandler
    from handlers.ready_made.image_input import ImageGeometry, ImageLimits, decode_image
    from handlers.core.loading import build_module

    workload = load_workload(workload_name, model)
    model_dir = workload.model_dir()
    net = build_module(str(model_dir / workload.model_file.name))
    net.load_state_dict(torch.load(model_dir / "weights.pt"))
    net.eval()
    options = ImageClassifierHandler.options
    geometry = ImageGeometry(resize=options["resize"], crop=options["crop"], draft=options["draft"])
    limits = ImageLimits(max_bytes=options["max_bytes"], max_pixels=options["max_pixels"])
    mean = torch.tensor(options["mean"]).view(3, 1, 1)
    std = torch.tensor(options["std"]).view(3, 1, 1)
    rows = []
    for index, body in enumerate(workload.make_inputs(DISTINCT_PHOTOS)):
        stock = ImageClassifier.image_processing(Image.open(io.BytesIO(body)))
        pixels = torch.from_numpy(decode_image(body, geometry, limits)).permute(2, 0, 1).float() / 255.0
        inputs = {"ours": (pixels - mean) / std, "sequential": SequentialImageClassifier.preprocess_one(
            SequentialImageClassifier(), body)}
        with torch.inference_mode():
            logits = {name: net(x.unsqueeze(0))[0] for name, x in {"stock": stock, **inputs}.items()}
        row = {"photo": index, "shape": list(stock.shape)}
        for name, x in inputs.items():
            diff = ((x - stock) * IMAGENET_STD * 255).abs()
            row[name] = {
                "pixel_mean_abs_diff": round(diff.mean().item(), 3), "pixel_max_abs_diff": round(diff.max().item(), 2),
                "logits_cosine": round(torch.nn.functional.cosine_similarity(logits[name], logits["stock"], dim=0).item(), 6),
                "top5": logits[name].topk(5).indices.tolist(),
            }
        row["stock_top5"] = logits["stock"].topk(5).indices.tolist()
        rows.append(row)
    return {"photos": rows}


def measure(contender: str, unpacked: Path, workload_name: str, model: str | None, rounds: int, warmup: int) -> dict:
    """Load ``contender`` from its unpacked archive as TorchServe's worker does, and time
    ``handle`` on one batch of the workload's photos."""
    import resource

    import torch
    import ts
    from ts.context import RequestProcessor
    from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl
    from ts.model_loader import TsModelLoader


    workload = load_workload(workload_name, model)
    manifest = json.loads((unpacked / "MAR-INF" / "MANIFEST.json").read_text())
    # The worker runs with the model folder on its path (handler file, model file, extra files).
    sys.path.insert(0, str(unpacked))
    metrics = MetricsCacheYamlImpl(str(Path(ts.__file__).parent / "configs" / "metrics.yaml"))
    service = TsModelLoader().load(manifest["model"]["modelName"], str(unpacked), manifest["model"]["handler"],
                                   None, workload.batch_size, metrics_cache=metrics)
    handle, context = service._entry_point, service.context

    bodies = workload.make_inputs(workload.batch_size)
    data = [{"body": body} for body in bodies]  # what the worker passes for a binary POST

    def one_batch():
        # As Service.predict prepares the context for a batch.
        context.request_ids = {i: f"req-{i}" for i in range(len(data))}
        context.request_processor = [RequestProcessor({"body": {"content-type": "image/jpeg"}}) for _ in data]
        context.metrics.request_ids = context.request_ids
        responses = handle(data, context)
        if not isinstance(responses, list) or len(responses) != len(data):
            raise RuntimeError(f"{contender}: {len(responses)} responses for {len(data)} requests")
        return responses

    first = one_batch()
    classes = [top5(r) for r in first[:DISTINCT_PHOTOS]]
    for _ in range(max(warmup - 1, 0)):
        one_batch()
    seconds = []
    while len(seconds) < rounds or sum(seconds) < MIN_MEASURED_S:
        started = time.perf_counter()
        one_batch()
        seconds.append(time.perf_counter() - started)
    if hasattr(service._entry_point.__self__, "close"):
        service._entry_point.__self__.close()
    return {
        "contender": contender, "handler": manifest["model"]["handler"], "workload": workload_name,
        "model": workload.model_file.stem, "batch_size": workload.batch_size, "seconds": seconds,
        "median_s": statistics.median(seconds), "req_per_s": workload.batch_size / statistics.median(seconds),
        "top5": classes, "top1": [c[0] for c in classes], "first_response": str(first[0])[:300], "torch_threads": torch.get_num_threads(),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def run_isolated(contender: str, unpacked: Path, args) -> dict:
    command = [sys.executable, "-m", "bench.stock_image_classifier", "--one", contender, str(unpacked),
               "--workload", args.workload, "--rounds", str(args.rounds), "--warmup", str(args.warmup)]
    if args.model:
        command += ["--model", args.model]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{contender} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def versions() -> dict:
    from importlib.metadata import version

    names = ("torch", "torchvision", "torchserve", "torch-model-archiver", "pillow", "numpy", "captum")
    found = {}
    for name in names:
        try:
            found[name] = version(name)
        except Exception:  # not installed
            found[name] = None
    found["python"] = platform.python_version()
    return found


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    memory = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal"))
    return f"{os.cpu_count()} CPUs ({cpu}), {memory / 2**20:.0f} GiB, {platform.platform()}"


def summarize(results: list) -> list:
    """One row per contender: all its measured batches pooled; median and min–max per turn."""
    rows = []
    for contender in CONTENDERS:
        runs = [r for r in results if r["contender"] == contender]
        if not runs:
            continue
        pooled = [s for r in runs for s in r["seconds"]]
        batch = runs[0]["batch_size"]
        rows.append({
            "contender": contender, "handler": runs[0]["handler"], "batch_size": batch,
            "req_per_s": batch / statistics.median(pooled),
            "req_per_s_min": batch / max(pooled), "req_per_s_max": batch / min(pooled),
            "turn_medians": [r["req_per_s"] for r in runs], "batches": len(pooled),
            "peak_rss_mib": max(r["peak_rss_mib"] for r in runs), "torch_threads": runs[0]["torch_threads"],
        })
    return rows


LABELS = {
    "stock": "TorchServe `ImageClassifier` (real, `--handler image_classifier`)",
    "sequential": "bench re-implementation (`bench/baselines.py` `SequentialImageClassifier`, old headline's baseline)",
    "ours": "ours: `ImageClassifierHandler`, `micro_batch_strategy: adaptive`",
}


def table(rows: list) -> str:
    stock = next(r for r in rows if r["contender"] == "stock")
    lines = [
        "| handler | req/s median | min–max (per batch) | medians of each turn | speed-up vs real stock | peak RSS |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        turns = ", ".join(f"{v:.1f}" for v in r["turn_medians"])
        lines.append(
            f"| {LABELS[r['contender']]} | {r['req_per_s']:.1f} | {r['req_per_s_min']:.1f}–{r['req_per_s_max']:.1f} "
            f"| {turns} | {r['req_per_s'] / stock['req_per_s']:.2f}x | {r['peak_rss_mib']:.0f} MiB |"
        )
    return "\n".join(lines)


def header(data: dict) -> str:
    v = data["versions"]
    return (
        f"{data['workload']}, batch {data['batch_size']}, model {data['model']} (same weights.pt for all); "
        f"torch {v['torch']}, torchvision {v['torchvision']}, torchserve {v['torchserve']}, "
        f"torch-model-archiver {v['torch-model-archiver']}, Pillow {v['pillow']}, numpy {v['numpy']}, "
        f"captum {v['captum']}, Python {v['python']}; {data['machine']}; load average at start "
        + "/".join(f"{x:.2f}" for x in data["load_average_at_start"])
        + f"; top-1 classes of the {len(data['top1_all_agree'])} distinct photos, identical for every contender "
        f"and turn: {list(data['top1_all_agree'])}.\n\n`{data['command']}`\n\n"
        + inputs_table(data["inputs_vs_stock"]) + "\n\n"
    )


def inputs_table(inputs: dict) -> str:
    lines = ["| photo | contender | model input vs stock's: mean abs diff (0–255) | max abs diff "
             "| logits cosine vs stock | top-5 (stock's top-5) |", "|---|---|---|---|---|---|"]
    for row in inputs["photos"]:
        for name in ("sequential", "ours"):
            r = row[name]
            lines.append(f"| {row['photo']} | {name} | {r['pixel_mean_abs_diff']} | {r['pixel_max_abs_diff']} "
                         f"| {r['logits_cosine']} | {r['top5']} ({row['stock_top5']}) |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", default="photo-12mp", choices=["photo-12mp", "photo-vga"])
    parser.add_argument("--model", choices=["small-cnn", "resnet18", "resnet50", *EXTRA_MODELS],
                        help="the photo workload's model (default: its own, small-cnn for photo-12mp)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="turns of every contender, interleaved")
    # Not "stock_image_classifier": results/stock_image_classifier.md is the written-up summary.
    parser.add_argument("--name", default="stock_image_classifier_small_cnn", help="file name of the results in --out")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--one", nargs=2, metavar=("CONTENDER", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one and args.one[0] == "compare-inputs":
        print(json.dumps(compare_inputs(args.workload, args.model)))
        return 0
    if args.one:
        print(json.dumps(measure(args.one[0], Path(args.one[1]), args.workload, args.model, args.rounds, args.warmup)))
        return 0

    load_at_start = os.getloadavg()
    folders = {c: build_archive(c, args.workload, args.model) for c in CONTENDERS}
    inputs = run_isolated("compare-inputs", Path("."), args)
    results = []
    for turn in range(args.repeats):
        for contender in CONTENDERS:
            print(f"[turn {turn + 1}/{args.repeats}] {contender} ...", file=sys.stderr, flush=True)
            results.append(run_isolated(contender, folders[contender], args))
            print(f"    {results[-1]['req_per_s']:.1f} req/s, top-1 {results[-1]['top1']}", file=sys.stderr, flush=True)
    agree = {tuple(r["top1"]) for r in results}
    if len(agree) != 1:  # a real check, not an assert: the comparison is void if the answers differ
        raise SystemExit(f"the contenders disagree on the top-1 classes: {[(r['contender'], r['top1']) for r in results]}")
    rows = summarize(results)
    data = {
        "workload": args.workload, "model": results[0]["model"], "batch_size": results[0]["batch_size"],
        "top1_all_agree": sorted(agree)[0], "load_average_at_start": load_at_start,
        "load_average_at_end": os.getloadavg(), "versions": versions(), "machine": machine(),
        "command": " ".join([sys.executable, "-m", "bench.stock_image_classifier",
                             *(argv if argv is not None else sys.argv[1:])]),
        "inputs_vs_stock": inputs, "rows": rows, "runs": results,
    }
    publish(args.out, args.name, data, header(data) + table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
