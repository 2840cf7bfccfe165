"""From a new user's trial (issue 31, journey round 3), on a real TorchServe: a handler file with
a helper ``@dataclass`` beside its handler class is served from an archive made by the real
command, its ``RawAnswer`` goes out as ``image/png``, and the curl command ``scripts.serve``
prints for a model of one's own (no example sample) gets a 200."""

import io
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml
from PIL import Image

from handlers.packaging.archive import archive_config
from scripts.serve import curl_for
from scripts.torchserve_instance import Ports, TorchServe

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]

HANDLER = '''import io
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from handlers import BadRequest, MicroBatchHandler, RawAnswer


@dataclass(frozen=True)
class Item:  # a helper class beside the handler class
    x: torch.Tensor
    grey: bool


class PngHandler(MicroBatchHandler):
    def preprocess_one(self, request):
        payload = request.json()
        if not isinstance(payload, dict) or "x" not in payload:
            raise BadRequest('expected {"x": [4 numbers]}')
        return Item(torch.tensor(payload["x"], dtype=torch.float32), bool(payload.get("grey", True)))

    def collate(self, items):
        return super().collate([item.x for item in items])

    def postprocess_one(self, output, item):
        pixels = output.clamp(0, 255).round().to(torch.uint8).numpy()[None, :]  # one row of 4 pixels
        buffer = io.BytesIO()
        Image.fromarray(pixels, "L").save(buffer, "PNG")
        return RawAnswer(buffer.getvalue(), "image/png")
'''


@pytest.fixture(scope="module")
def png_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("png_model")
    (folder / "png_handler.py").write_text(HANDLER)
    shutil.copy2(ROOT / "examples" / "quickstart" / "model.py", folder / "model.py")
    subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart" / "build.py"), str(folder)], check=True,
                   cwd=ROOT, stdout=subprocess.DEVNULL)  # weights.pt: y = 2x + 1
    (folder / "samples").mkdir()
    (folder / "samples" / "a.json").write_text('{"x": [1, 2, 3, 4]}')
    (folder / "samples" / "b.json").write_text('{"x": [10, 20, 30, 40]}')
    config = {"model_name": "png_model", "version": "1.0", "handler": "png_handler.py", "model_file": "model.py",
              "serialized_file": "weights.pt", "samples": ["samples"],
              "model_config": {"batchSize": 4, "maxBatchDelay": 20, "minWorkers": 1, "maxWorkers": 1,
                               "responseTimeout": 30, "handler": {"micro_batch_size": 2, "pool_size": 2}}}
    (folder / "png_model.yaml").write_text(yaml.safe_dump(config))
    store = folder / "model_store"
    archive_config(folder / "png_model.yaml", store)
    server = TorchServe(folder / "serve", store, ROOT / "config.properties", ports=Ports.free())
    server.start()
    try:
        server.wait_ready(["png_model"])
        yield server
    finally:
        server.stop()


def test_a_handler_file_with_a_dataclass_answers_image_png_on_torchserve(png_server):
    answer = requests.post(f"{png_server.inference_url}/predictions/png_model", json={"x": [1, 2, 3, 4]},
                           headers=png_server.auth(), timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.headers["Content-Type"] == "image/png"
    pixels = np.asarray(Image.open(io.BytesIO(answer.content)))
    assert pixels.tolist() == [[3, 5, 7, 9]]  # y = 2x + 1


def test_the_printed_curl_command_for_a_model_of_ones_own_gets_a_200(png_server):
    command = curl_for(png_server, "png_model")
    assert "Content-Type: application/json" in command
    answer = subprocess.run(["bash", "-c", command + " -s -o /dev/null -w ' %{http_code} %{content_type}'"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert answer.stdout.strip().endswith("200 image/png"), (command, answer.stdout, answer.stderr)
