"""What TorchServe's stock vision handlers load and read, built here: a model file with one class
(as ``--model-file`` wants), its seeded state_dict (``--serialized-file``), ``index_to_name.json``,
and photos as JPEG bytes. Nothing is downloaded."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

MODEL_MODULE = "vision_tiny_cnn"  # the worker imports the model file by this name: one per process
CLASSES = 10

MODEL_SOURCE = '''
import torch
from torch import nn


class TinyCNN(nn.Module):
    """224x224 RGB -> 10 logits, cheap on a CPU."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 5, stride=4, padding=2), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(),
        )
        self.fc = nn.Linear(16 * 16, 10)

    def forward(self, x):
        return self.fc(self.features(x))
'''


DETECTOR_MODULE = "vision_fake_detector"
DETECTOR_SOURCE = '''
import torch
from torch import nn


class FakeDetector(nn.Module):
    """A list with one dict of boxes, labels and scores per image, as torchvision's detection
    models return: two boxes, whose size and first score follow the image's mean."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, images):
        found = []
        for image in images:
            level = image.mean() * self.scale[0]
            found.append({"boxes": torch.stack([level * torch.tensor([0.0, 0.0, 40.0, 30.0]),
                                                torch.tensor([1.0, 1.0, 5.0, 5.0])]),
                          "labels": torch.tensor([1, 2]), "scores": torch.stack([level, torch.tensor(0.9)])})
        return found
'''


SEGMENTER_MODULE = "vision_tiny_segmenter"
SEGMENTER_SOURCE = '''
import torch
from torch import nn


class TinySegmenter(nn.Module):
    """224x224 RGB -> {"out": 4 class scores per pixel of a 28x28 map}, as torchvision's segmentation models answer."""

    def __init__(self):
        super().__init__()
        self.pool = nn.AvgPool2d(8)
        self.classify = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return {"out": self.classify(self.pool(x))}
'''


def write_segmenter_dir(folder: Path) -> Path:
    """A model folder for TorchServe's ``ImageSegmenter``: the tiny segmenter above (seed 0)."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{SEGMENTER_MODULE}.py").write_text(SEGMENTER_SOURCE)
    namespace: dict = {}
    exec(compile(SEGMENTER_SOURCE, SEGMENTER_MODULE, "exec"), namespace)  # noqa: S102 - our own source, above
    torch.manual_seed(0)
    torch.save(namespace["TinySegmenter"]().state_dict(), folder / "weights.pt")
    return folder


def write_detector_dir(folder: Path) -> Path:
    """A model folder for TorchServe's ``ObjectDetector``: the fake detector above and its labels."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{DETECTOR_MODULE}.py").write_text(DETECTOR_SOURCE)
    namespace: dict = {}
    exec(compile(DETECTOR_SOURCE, DETECTOR_MODULE, "exec"), namespace)  # noqa: S102 - our own source, above
    torch.save(namespace["FakeDetector"]().state_dict(), folder / "weights.pt")
    (folder / "index_to_name.json").write_text(json.dumps({str(i): f"class_{i}" for i in range(CLASSES)}))
    return folder


def write_model_dir(folder: Path) -> Path:
    """``folder`` laid out as TorchServe unpacks an archive: ``vision_tiny_cnn.py``,
    ``weights.pt`` (seed 0, logits scaled so that the classes' probabilities are far apart) and
    ``index_to_name.json``."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{MODEL_MODULE}.py").write_text(MODEL_SOURCE)
    namespace: dict = {}
    exec(compile(MODEL_SOURCE, MODEL_MODULE, "exec"), namespace)  # noqa: S102 - our own source, above
    torch.manual_seed(0)
    model = namespace["TinyCNN"]()
    with torch.no_grad():
        model.fc.weight.mul_(20.0)
    torch.save(model.state_dict(), folder / "weights.pt")
    (folder / "index_to_name.json").write_text(json.dumps({str(i): f"class_{i}" for i in range(CLASSES)}))
    return folder


def photo(index: int, size=(640, 480)) -> bytes:
    """A JPEG whose content differs with ``index``: smooth colour fields plus texture, so that
    resizing and the model have something to tell apart."""
    rng = np.random.default_rng(index)
    width, height = size
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = []
    for _ in range(3):
        fx, fy, phase = rng.uniform(0.002, 0.03), rng.uniform(0.002, 0.03), rng.uniform(0, 6.28)
        channels.append(127 + 100 * np.sin(fx * x + fy * y + phase))
    pixels = np.stack(channels, axis=-1) + rng.normal(0, 12, (height, width, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB").save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


PHOTOS = [photo(i, size) for i, size in enumerate([(640, 480), (480, 640), (800, 600), (320, 320), (1024, 768)])]
NOT_AN_IMAGE = b"this is not an image, it is text"


def assert_same_answers(ours, theirs):
    """Equal labels in the same order; probabilities equal to float noise (a micro-batch of 2 and
    a batch of 5 may sum in another order)."""
    assert len(ours) == len(theirs)
    for mine, stock in zip(ours, theirs):
        if isinstance(stock, dict) and all(isinstance(v, float) for v in stock.values()):
            assert list(mine) == list(stock), (mine, stock)
            assert list(mine.values()) == pytest.approx(list(stock.values()), rel=1e-4, abs=1e-6)
        else:
            assert mine == stock
