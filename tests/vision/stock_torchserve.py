"""TorchServe's real stock ``image_classifier`` and the same handler upgraded in one line
(``upgraded_image_classifier.py``), both archived by the real torch-model-archiver with the same
model file, weights and labels, and served by one real TorchServe from this venv (its workers
too: the one with torchvision). One per test session (``tests/vision/conftest.py``'s ``served``):
test_stock_served.py and test_stock_on_ray.py ask the same server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import requests

from handlers.packaging.archive import ArchiveSpec, archive
from scripts.torchserve_instance import Ports, TorchServe
from tests.integration.helpers import concurrently
from tests.vision.stock_models import MODEL_MODULE, PHOTOS, write_model_dir

ROOT = Path(__file__).resolve().parents[2]
BATCH = len(PHOTOS) + 1  # the photos and one upload that is not an image: one TorchServe batch
# Both models: one TorchServe batch of BATCH requests sent together (the batch fills long before the delay).
MODEL_CONFIG = {"batchSize": BATCH, "maxBatchDelay": 3000, "minWorkers": 1, "maxWorkers": 1, "responseTimeout": 120}
STOCK, UPGRADED = "stock", "upgraded"


def archive_stock(model_dir: Path, store: Path, workdir: Path) -> Path:
    """``--handler image_classifier``: TorchServe's own, by name, as its docs archive it; the .mar."""
    config = workdir / "stock.yaml"
    config.write_text(json.dumps(MODEL_CONFIG))  # JSON is YAML
    subprocess.run(
        [str(Path(sys.executable).with_name("torch-model-archiver")), "--model-name", STOCK, "--version", "1.0",
         "--handler", "image_classifier", "--model-file", str(model_dir / f"{MODEL_MODULE}.py"),
         "--serialized-file", str(model_dir / "weights.pt"), "--extra-files", str(model_dir / "index_to_name.json"),
         "--config-file", str(config), "--export-path", str(store)],
        check=True, cwd=workdir,
    )
    return store / f"{STOCK}.mar"


def archive_upgraded(model_dir: Path, store: Path) -> None:
    spec = ArchiveSpec(
        source=Path("<test upgraded>"), root=ROOT, model_name=UPGRADED, version="1.0",
        handler=Path(__file__).with_name("upgraded_image_classifier.py"),
        model_config={**MODEL_CONFIG, "handler": {"micro_batch_size": 2}},
        model_file=model_dir / f"{MODEL_MODULE}.py", serialized_file=model_dir / "weights.pt",
        extra_files=[model_dir / "index_to_name.json"],
    )
    archive(spec, store)


def serve_both(workdir: Path) -> TorchServe:
    """Both archived in ``workdir/model_store`` and served, ready; the caller stops the server."""
    model_dir, store = write_model_dir(workdir / "model"), workdir / "model_store"
    store.mkdir()
    archive_stock(model_dir, store, workdir)
    archive_upgraded(model_dir, store)
    return start_on_free_ports(workdir, store)


def start_on_free_ports(workdir: Path, store: Path, tries: int = 3) -> TorchServe:
    """A TorchServe from this venv on free ports, ready. A free port is an ephemeral one, which
    another process on this shared machine may take before TorchServe binds it: then new ports."""
    for attempt in range(tries):
        server = TorchServe(workdir / f"server{attempt}", store, ROOT / "config.properties", ports=Ports.free(),
                            python_bin=Path(sys.executable).parent)
        server.start()
        try:
            server.wait_ready([STOCK, UPGRADED])
            return server
        except RuntimeError:
            server.stop()
            console = (server.workdir / "console.log").read_text(errors="replace")
            if "Address already in use" not in console or attempt == tries - 1:
                raise
    raise AssertionError("unreachable")


def post_together(server, model, bodies):
    """``bodies`` sent at once (one TorchServe batch); each response's status and JSON."""
    def send(index):
        response = requests.post(f"{server.inference_url}/predictions/{model}", data=bodies[index],
                                 headers={"Content-Type": "image/jpeg", **server.auth()}, timeout=120)
        return response.status_code, response.json()

    return concurrently(len(bodies), send)
