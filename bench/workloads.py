"""The benchmark workloads: a model directory (as a .mar would unpack), inputs, our handler and
the stock-style baseline, for each of photo-12mp, photo-vga, text and tensor."""

from __future__ import annotations

import io
import json
import shutil
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from bench.baselines import SequentialImageClassifier, SequentialTensorHandler, SequentialTextEmbedder
from handlers import ImageClassifierHandler, SentenceEmbeddingHandler, TensorHandler

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / ".work"


@dataclass
class Workload:
    name: str
    batch_size: int
    model_file: Path | None
    ours: type
    baseline: type
    make_inputs: Callable[[int], list]
    handler_config: dict = field(default_factory=dict)
    model_dir_source: Path | None = None  # an existing folder to use instead (text)
    content_type: str = "application/octet-stream"

    def model_dir(self) -> Path:
        """A folder laid out as TorchServe unpacks an archive: model file, weights, labels."""
        if self.model_dir_source is not None:
            return self.model_dir_source
        folder = WORK / self.name / self.model_file.stem
        weights = folder / "weights.pt"
        if not weights.exists():
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copy(self.model_file, folder / self.model_file.name)
            from handlers.core.loading import build_module

            torch.manual_seed(0)
            torch.save(build_module(str(folder / self.model_file.name)).state_dict(), weights)
            (folder / "index_to_name.json").write_text(json.dumps({str(i): f"class_{i}" for i in range(1000)}))
        return folder

    def manifest(self) -> dict:
        if self.model_file is None:
            return {"model": {"modelName": self.name}}
        return {"model": {"modelName": self.name, "modelFile": self.model_file.name, "serializedFile": "weights.pt"}}


@lru_cache(maxsize=None)
def _photo(width: int, height: int, index: int) -> bytes:
    import sklearn.datasets

    photos = sorted((Path(sklearn.datasets.__file__).parent / "images").glob("*.jpg"))
    with Image.open(photos[index % len(photos)]) as image:
        big = image.convert("RGB").resize((width, height), Image.Resampling.BICUBIC)
    if index >= len(photos):  # different pixels, same cost
        big = big.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    buffer = io.BytesIO()
    big.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def photos(width: int, height: int, count: int, distinct: int = 4) -> list:
    return [_photo(width, height, i % distinct) for i in range(count)]


WORDS = ("the quick brown fox jumps over a lazy dog while serving engineers measure batched "
         "throughput of sentence embeddings on small machines with two cores").split()


def sentences(count: int) -> list:
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 120, size=count)  # mixed: a few words to a long paragraph
    return [" ".join(rng.choice(WORDS, size=n)).encode() for n in lengths]


def feature_rows(count: int) -> list:
    rng = np.random.default_rng(0)
    return [json.dumps(rng.normal(size=4).round(4).tolist()).encode() for _ in range(count)]


def text_model_dir() -> Path:
    folder = ROOT / "build" / "text_embedding"
    if not (folder / "model.safetensors").exists():
        import subprocess
        import sys

        subprocess.run([sys.executable, "examples/text_embedding/build.py", str(folder)], cwd=ROOT, check=True)
    return folder


# Models a photo workload can run instead of its own (``--model``): the GPU benchmark uses ResNet-50.
IMAGE_MODELS = {
    "small-cnn": ROOT / "bench" / "models" / "small_cnn.py",
    "resnet18": ROOT / "examples" / "image_classifier" / "model.py",
    "resnet50": ROOT / "bench" / "models" / "resnet50.py",
}


def load_workload(name: str, model: str | None = None) -> Workload:
    """The workload ``name``; for a photo workload, with ``model`` (a key of IMAGE_MODELS) instead
    of its own."""
    workload = WORKLOADS[name]()
    if model is not None:
        if workload.ours is not ImageClassifierHandler:
            raise ValueError(f"--model applies to the photo workloads, not {name}")
        workload.model_file = IMAGE_MODELS[model]
    return workload


WORKLOADS = {
    "photo-12mp": lambda: Workload(
        "photo-12mp", 32, ROOT / "bench" / "models" / "small_cnn.py", ImageClassifierHandler,
        SequentialImageClassifier, lambda n: photos(4032, 3024, n), {"micro_batch_strategy": "adaptive"},
        content_type="image/jpeg",
    ),
    "photo-vga": lambda: Workload(
        "photo-vga", 16, ROOT / "examples" / "image_classifier" / "model.py", ImageClassifierHandler,
        SequentialImageClassifier, lambda n: photos(640, 480, n), {"micro_batch_strategy": "adaptive"},
        content_type="image/jpeg",
    ),
    "text": lambda: Workload(
        "text", 32, None, SentenceEmbeddingHandler, SequentialTextEmbedder, sentences,
        {"micro_batch_size": 8}, model_dir_source=text_model_dir(), content_type="text/plain",
    ),
    "tensor": lambda: Workload(
        "tensor", 64, ROOT / "bench" / "models" / "tiny_linear.py", TensorHandler, SequentialTensorHandler,
        feature_rows, {"shape": [4]}, content_type="application/json",
    ),
}
