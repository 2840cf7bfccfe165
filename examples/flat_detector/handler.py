"""The flat detector example: a greyscale image in (PNG, JPEG, ... bytes), its boxes out,
``{"boxes": [{"box": [x0, y0, x1, y1], "score": 0.9, "label": "white"}, ...]}``.

The model (model.py) returns one (K, 7) tensor for a whole micro-batch, one row per box with the
image's index in column 0. Which rows are whose is the framework's business: the default
``split`` hands ``postprocess_one`` this request's rows alone, a (k, 7) tensor whose column 0
is 0, as if the image had been sent alone (see README.md).
"""

import numpy as np
import torch

from handlers import ConfigError, ImageGeometry, ImageLimits, MicroBatchHandler, decode_image


class FlatDetectorHandler(MicroBatchHandler):
    """Boxes of the bright cells of an image, in the pixels of its ``size`` × ``size`` version
    (an image of another size is resized, shorter side first, and centre-cropped)."""

    options = {"size": 32, "labels": ["grey", "white"], "max_bytes": 1024 * 1024, "max_pixels": 4_000_000}

    @classmethod
    def check_options(cls, options: dict) -> None:
        super().check_options(options)
        if options["size"] < 1:
            raise ConfigError(f"handler.size must be >= 1, got {options['size']!r}")
        labels = options["labels"]
        if len(labels) != 2 or not all(isinstance(label, str) for label in labels):
            raise ConfigError(f"handler.labels must be 2 names (model labels 0 and 1), got {labels!r}")

    def setup(self, model_dir: str) -> None:
        size = self.config["size"]
        self.geometry = ImageGeometry(resize=size, crop=size)
        self.limits = ImageLimits(max_bytes=self.config["max_bytes"], max_pixels=self.config["max_pixels"])

    def preprocess_one(self, request):
        return greyscale(request.bytes(), self.geometry, self.limits)  # 4xx for what is not an image

    def collate(self, items):
        pixels = torch.from_numpy(np.stack(items)).unsqueeze(1)  # (N, 1, size, size) uint8
        return self.to_model(pixels).float() / 255.0

    def postprocess_one(self, output, item):
        return boxes_json(output, self.config["labels"])


def greyscale(data: bytes, geometry: ImageGeometry, limits: ImageLimits) -> np.ndarray:
    """Image bytes → uint8 (size, size) brightness (the mean of R, G and B)."""
    rgb = decode_image(data, geometry, limits)
    return rgb.mean(axis=2).round().astype(np.uint8)


def boxes_json(rows: torch.Tensor, labels: list) -> dict:
    """One image's (k, 7) rows → its answer. ``reshape`` also reads a single row handed over
    as (7,), as a hand-written YOLO post-processor does."""
    boxes = rows.reshape(-1, 7).tolist()
    return {"boxes": [{"box": [int(x0), int(y0), int(x1), int(y1)], "score": round(score, 4),
                       "label": labels[int(label)]}
                      for _, x0, y0, x1, y1, score, label in boxes]}
