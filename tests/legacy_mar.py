"""A legacy TorchServe archive, made as a TorchServe user makes one: a ``BaseHandler`` subclass
written for stock TorchServe (its ``preprocess`` loops over the batch's rows and stacks, the default
``inference``, a ``postprocess`` that returns one answer per row), a TorchScript model whose answer
is computed by hand (y = 2x + 1 on two features: [1, 2] -> [3, 5]), archived by the real
``torch-model-archiver``. Nothing of this project is in it."""

import os
import subprocess
from pathlib import Path

import torch
import yaml

HANDLER = '''"""A stock-TorchServe handler: nothing of microbatch-handlers."""
import json

import torch
from ts.torch_handler.base_handler import BaseHandler
from ts.utils.util import PredictionException


class LegacyHandler(BaseHandler):
    def preprocess(self, data):
        rows = []
        for row in data:
            body = row.get("data") or row.get("body")
            if isinstance(body, (bytes, bytearray)):
                body = json.loads(body)
            if not isinstance(body, dict) or "x" not in body:
                raise PredictionException("the request has no field 'x'", 422)
            rows.append(torch.tensor(body["x"], dtype=torch.float32))
        return torch.stack(rows)

    def postprocess(self, data):
        return [{"y": row.tolist()} for row in data]
'''

MODEL_CONFIG = {"batchSize": 8, "maxBatchDelay": 300, "minWorkers": 1, "maxWorkers": 1, "responseTimeout": 30,
                "handler": {"micro_batch_size": 4, "pool_size": 2}}
NAME = "legacy"
GOOD = [{"x": [1.0, 2.0]}, {"x": [4.0, 0.0]}, {"x": [-1.0, 3.0]}, {"x": [0.5, 0.25]}]


def expected(body):
    """The model's answer, by hand."""
    return {"y": [2 * v + 1 for v in body["x"]]}


class Doubler(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(2, 2)
        with torch.no_grad():
            self.linear.weight.copy_(2 * torch.eye(2))
            self.linear.bias.fill_(1.0)

    def forward(self, x):
        return self.linear(x)


def build_legacy_mar(folder: Path, model_name: str = NAME, handler_source: str = HANDLER) -> Path:
    """``<folder>/<model_name>.mar``, written by the real torch-model-archiver."""
    from handlers.packaging.archive import _archiver

    stage = folder / f"{model_name}_src"
    stage.mkdir(parents=True)
    (stage / "legacy_handler.py").write_text(handler_source)
    torch.jit.save(torch.jit.script(Doubler()), str(stage / "model.pt"))
    (stage / "model-config.yaml").write_text(yaml.safe_dump(MODEL_CONFIG))
    subprocess.run([_archiver(), "--model-name", model_name, "--version", "1.0",
                    "--serialized-file", str(stage / "model.pt"), "--handler", str(stage / "legacy_handler.py"),
                    "--config-file", str(stage / "model-config.yaml"), "--export-path", str(folder), "--force"],
                   check=True, env={**os.environ, "TMPDIR": str(stage)})
    return folder / f"{model_name}.mar"
