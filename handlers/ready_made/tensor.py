"""Ready-made handler for numeric models: a JSON array (or .npy bytes) of a declared shape and
dtype in, the model's output as JSON out."""

from __future__ import annotations

import numpy as np
import torch

from handlers.core.handler import MicroBatchHandler
from handlers.core.request import Request
from handlers.engine.settings import ConfigError
from handlers.ready_made.tensor_input import TensorSpec, check_spec, parse_array


class TensorHandler(MicroBatchHandler):
    """For tabular and other numeric models.

    A request is a JSON array (or ``{"inputs": [...]}``, or ``.npy`` bytes) of ``shape`` and
    ``dtype``; a wrong shape, dtype, a NaN/Inf or a ragged array gets a 400 that says what was
    expected. The answer is the model's output for that request, as nested lists.

    Settings (``handler:`` section): ``shape`` (e.g. ``[4]``; ``-1`` for any length on an axis,
    ``[]`` for any shape), ``dtype``, ``allow_non_finite``, ``max_elements``.
    """

    options = {"shape": [], "dtype": "float32", "allow_non_finite": False, "max_elements": 1_000_000}

    @classmethod
    def check_options(cls, options: dict) -> None:
        super().check_options(options)
        problem = check_spec(options["shape"], options["dtype"])
        if problem:
            raise ConfigError(problem)

    def setup(self, model_dir: str) -> None:
        self.spec = TensorSpec(
            shape=tuple(self.config["shape"]),
            dtype=self.config["dtype"],
            allow_non_finite=self.config["allow_non_finite"],
            max_elements=self.config["max_elements"],
        )

    def preprocess_one(self, request: Request) -> np.ndarray:
        return parse_array(request.body, self.spec)

    def collate(self, items: list) -> torch.Tensor:
        # One tensor per micro-batch, not per request (a torch tensor costs microseconds to make).
        # Arrays of one declared shape stack; with -1 axes, differing lengths are a micro-batch
        # the engine splits and retries, so each request still gets its own answer.
        return self.to_model(torch.from_numpy(np.stack(items)))
