"""TorchServe's real stock ``image_classifier`` on a real TorchServe, beside the same handler
upgraded in one line (``upgraded_image_classifier.py``), both archived by the real
torch-model-archiver with the same model file, weights and labels: the upgraded one answers each
photo as stock does, and a batch with an upload that is not an image gets a 400 for it and 200s
for its batch-mates, where stock fails the whole batch. TorchServe runs from this venv (its
workers too): the one with torchvision."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.vision.conftest import REASON

pytest.importorskip("torchvision", reason=REASON)
pytest.importorskip("captum", reason=REASON)

import requests  # noqa: E402

from handlers.packaging.archive import ArchiveSpec, archive  # noqa: E402
from scripts.torchserve_instance import Ports, TorchServe  # noqa: E402
from tests.integration.helpers import concurrently  # noqa: E402
from tests.vision.stock_models import MODEL_MODULE, NOT_AN_IMAGE, PHOTOS, assert_same_answers, write_model_dir  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]
BATCH = len(PHOTOS) + 1  # the photos and one upload that is not an image: one TorchServe batch
# Both models: one TorchServe batch of BATCH requests sent together (the batch fills long before the delay).
MODEL_CONFIG = {"batchSize": BATCH, "maxBatchDelay": 3000, "minWorkers": 1, "maxWorkers": 1, "responseTimeout": 120}


def archive_stock(model_dir: Path, store: Path, workdir: Path) -> None:
    """``--handler image_classifier``: TorchServe's own, by name, as its docs archive it."""
    config = workdir / "stock.yaml"
    config.write_text(json.dumps(MODEL_CONFIG))  # JSON is YAML
    subprocess.run(
        [str(Path(sys.executable).with_name("torch-model-archiver")), "--model-name", "stock", "--version", "1.0",
         "--handler", "image_classifier", "--model-file", str(model_dir / f"{MODEL_MODULE}.py"),
         "--serialized-file", str(model_dir / "weights.pt"), "--extra-files", str(model_dir / "index_to_name.json"),
         "--config-file", str(config), "--export-path", str(store)],
        check=True, cwd=workdir,
    )


def archive_upgraded(model_dir: Path, store: Path) -> None:
    spec = ArchiveSpec(
        source=Path("<test upgraded>"), root=ROOT, model_name="upgraded", version="1.0",
        handler=Path(__file__).with_name("upgraded_image_classifier.py"),
        model_config={**MODEL_CONFIG, "handler": {"micro_batch_size": 2}},
        model_file=model_dir / f"{MODEL_MODULE}.py", serialized_file=model_dir / "weights.pt",
        extra_files=[model_dir / "index_to_name.json"],
    )
    archive(spec, store)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("stock_served")
    model_dir, store = write_model_dir(workdir / "model"), workdir / "model_store"
    store.mkdir()
    archive_stock(model_dir, store, workdir)
    archive_upgraded(model_dir, store)
    server = start_on_free_ports(workdir, store)
    try:
        yield server
    finally:
        server.stop()


def start_on_free_ports(workdir: Path, store: Path, tries: int = 3) -> TorchServe:
    """A TorchServe from this venv on free ports, ready. A free port is an ephemeral one, which
    another process on this shared machine may take before TorchServe binds it: then new ports."""
    for attempt in range(tries):
        server = TorchServe(workdir / f"server{attempt}", store, ROOT / "config.properties", ports=Ports.free(),
                            python_bin=Path(sys.executable).parent)
        server.start()
        try:
            server.wait_ready(["stock", "upgraded"])
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


def test_the_upgraded_stock_handler_answers_each_photo_as_stock_does(served):
    stock = [post_together(served, "stock", [p])[0] for p in PHOTOS]
    assert [status for status, _ in stock] == [200] * len(PHOTOS)
    assert len({tuple(answer) for _, answer in stock}) > 1  # the photos are told apart
    ours = post_together(served, "upgraded", PHOTOS)
    assert [status for status, _ in ours] == [200] * len(PHOTOS)
    assert_same_answers([answer for _, answer in ours], [answer for _, answer in stock])


def test_an_upload_that_is_not_an_image_fails_alone_upgraded_and_the_whole_batch_on_stock(served):
    bodies = PHOTOS[:2] + [NOT_AN_IMAGE] + PHOTOS[2:]
    ours = post_together(served, "upgraded", bodies)
    assert [status for status, _ in ours] == [200, 200, 400, 200, 200, 200], ours
    assert ours[2][1]["code"] == 400 and "UnidentifiedImageError" in ours[2][1]["message"]
    stock_alone = [post_together(served, "stock", [p])[0][1] for p in PHOTOS]
    assert_same_answers([answer for _, answer in ours[:2] + ours[3:]], stock_alone)
    # Stock TorchServe: the handler raises for the whole batch, and every request of it fails.
    stock = post_together(served, "stock", bodies)
    assert all(status >= 500 for status, _ in stock), stock
