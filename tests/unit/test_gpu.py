"""The handlers on a CUDA GPU: same answers as on the CPU, half precision and channels-last, and
model threads that each queue work on their own stream. Skipped where torch sees no GPU (CI has
none); `bench/run_gpu.sh` runs them on a lent one."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from handlers import ImageClassifierHandler, MicroBatchHandler
from handlers.core.loading import build_module
from handlers.testing import run_batch, start_handler

from .images import encode, photo

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ROOT = Path(__file__).resolve().parents[2]
MODEL_FILE = ROOT / "examples" / "image_classifier" / "model.py"
MANIFEST = {"model": {"modelName": "resnet18", "modelFile": "model.py", "serializedFile": "weights.pt"}}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The example's ResNet-18 with seeded random weights, laid out as an unpacked archive."""
    folder = tmp_path_factory.mktemp("resnet18")
    shutil.copy(MODEL_FILE, folder / "model.py")
    torch.manual_seed(0)
    torch.save(build_module(str(folder / "model.py")).state_dict(), folder / "weights.pt")
    (folder / "index_to_name.json").write_text(json.dumps({str(i): f"class_{i}" for i in range(1000)}))
    return folder


@pytest.fixture(scope="module")
def photos():
    return [encode(photo(i % 2, (320 + 16 * i, 240)), "JPEG") for i in range(12)]


@pytest.fixture
def exact_float32():
    """cuDNN's TF32 convolutions round to 10 bits; compare float32 with float32."""
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = before


def probabilities(handler, bodies) -> list:
    responses, context = run_batch(handler, bodies)
    assert context.statuses() == [200] * len(bodies)
    return [{entry["index"]: entry["probability"] for entry in response} for response in responses]


def start(model_dir, on_gpu: bool, **config):
    config = {"top_k": 1000, **config}
    return start_handler(ImageClassifierHandler, model_dir, config, manifest=MANIFEST, gpu_id=0 if on_gpu else None)


def test_answers_on_the_gpu_match_the_cpu_with_two_model_threads(model_dir, photos, exact_float32):
    cpu = start(model_dir, on_gpu=False)
    gpu = start(model_dir, on_gpu=True, inference_workers=2, micro_batch_strategy="static", micro_batch_size=3)
    try:
        assert gpu.device.type == "cuda"
        expected, got = probabilities(cpu, photos), probabilities(gpu, photos)
    finally:
        cpu.close()
        gpu.close()
    for want, have in zip(expected, got):  # in request order, every class
        assert want.keys() == have.keys()
        assert max(abs(want[k] - have[k]) for k in want) < 1e-5


@pytest.mark.parametrize("precision", ["float16", "bfloat16"])
def test_half_precision_channels_last_stays_close_to_float32(model_dir, photos, precision):
    full = start(model_dir, on_gpu=True)
    half = start(model_dir, on_gpu=True, precision=precision, channels_last=True)
    try:
        assert next(half.model.parameters()).dtype == getattr(torch, precision)
        expected, got = probabilities(full, photos), probabilities(half, photos)
    finally:
        full.close()
        half.close()
    for want, have in zip(expected, got):
        assert sum(have.values()) == pytest.approx(1.0, abs=1e-3)
        assert max(abs(want[k] - have[k]) / want[k] for k in want if want[k] > 1e-4) < 0.1


class SlowDoubler(MicroBatchHandler):
    """Many large matrix products that leave the input as it was, then doubles it; its split
    leaves each output on the GPU, so pool threads read what a model thread's stream wrote."""

    def load_model(self, model_dir, device):
        class Model(torch.nn.Module):
            def forward(self, x):
                eye = torch.eye(2048, device=x.device)
                wide = x.repeat(1, 2048 // x.shape[1])
                for _ in range(200):
                    wide = wide @ eye
                return 2 * wide[:, : x.shape[1]]

        return Model()

    def split(self, output, count):
        return list(output.unbind(0))

    def postprocess_one(self, output, item):
        return output.tolist()


def test_outputs_left_on_the_gpu_are_complete_when_postprocessing_reads_them():
    handler = start_handler(
        SlowDoubler, gpu_id=0,
        handler_config={"inference_workers": 2, "micro_batch_strategy": "static", "micro_batch_size": 4},
    )
    rows = [[float(i), float(i + 1), float(-i), 0.5] for i in range(32)]
    try:
        for _ in range(3):
            responses, context = run_batch(handler, [json.dumps(row).encode() for row in rows])
            assert context.statuses() == [200] * len(rows)
            assert responses == [[2 * v for v in row] for row in rows]
    finally:
        handler.close()


class HalfAffine(MicroBatchHandler):
    """y = 2x + 1, on the GPU in the precision the config asks for."""

    def load_model(self, model_dir, device):
        model = torch.nn.Linear(4, 4)
        with torch.no_grad():
            model.weight.copy_(2 * torch.eye(4))
            model.bias.fill_(1.0)
        return model


@pytest.mark.parametrize("precision", ["float16", "bfloat16"])
def test_float32_requests_reach_a_half_precision_model_in_its_precision(precision):
    """Regression: only the image handler cast inputs; the base collate sent float32 to a float16
    model and every request failed on the GPU."""
    handler = start_handler(HalfAffine, gpu_id=0, handler_config={"precision": precision, "micro_batch_size": 2})
    rows = [[float(i), 0.5, -1.0, 2.0] for i in range(5)]
    try:
        assert handler.input_dtype == getattr(torch, precision)
        responses, context = run_batch(handler, [json.dumps(row).encode() for row in rows])
    finally:
        handler.close()
    assert context.statuses() == [200] * len(rows)
    assert responses == [[2 * v + 1 for v in row] for row in rows]  # exact in half precision
