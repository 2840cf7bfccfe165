"""TorchServe's stock ``image_classifier`` .mar (``--handler image_classifier``, archived by the real
torch-model-archiver: tests/vision/stock_torchserve.py) served on Ray Serve from the archive as it
is, by ``python -m handlers.ray_serve stock.mar`` on a real local Ray cluster (loopback, dashboard
off, its own temp dir; started and stopped by this module). The stock ``ImageClassifier``, upgraded
by the engine there, answers the photos as the real stock TorchServe of the session answers them
from the same .mar, and an upload that is not an image gets its own 400 while its batch-mates in
the same batch get 200 and stock's answers. Needs Ray in this venv (``make vision-venv``)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.vision.conftest import RAY_MISSING, RAY_REASON, REASON

pytest.importorskip("torchvision", reason=REASON)
pytest.importorskip("captum", reason=REASON)
if RAY_MISSING:
    pytest.skip(RAY_REASON, allow_module_level=True)

import psutil  # noqa: E402
import requests  # noqa: E402

from tests.integration.helpers import ProcessOutput, alive, concurrently  # noqa: E402
from tests.vision.stock_models import NOT_AN_IMAGE, PHOTOS, assert_same_answers  # noqa: E402
from tests.vision.stock_torchserve import STOCK, post_together  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 240
SERVING = r"serving on Ray Serve at (http://127\.0\.0\.1:\d+)"


class OnRay:
    """The running ``python -m handlers.ray_serve``: its URL and inference key."""

    def __init__(self, url: str, key: str):
        self.url, self.key = url, key

    def post_together(self, bodies: list) -> list:
        """``bodies`` sent at once (one Ray Serve batch: the model config's batchSize is their
        number at most, its maxBatchDelay 3 s); each response."""
        return concurrently(len(bodies), lambda i: self.post(bodies[i]))

    def post(self, body: bytes) -> requests.Response:
        return requests.post(f"{self.url}/predictions/{STOCK}", data=body, timeout=120,
                             headers={"Content-Type": "image/jpeg", "Authorization": f"Bearer {self.key}"})


@pytest.fixture(scope="module")
def on_ray(served, tmp_path_factory):
    """The very .mar the session's TorchServe serves as ``stock``, served by the command on Ray Serve."""
    folder = tmp_path_factory.mktemp("stock_on_ray")
    (folder / "tmp").mkdir()
    env = {**os.environ, "TMPDIR": str(folder / "tmp"), "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "handlers.ray_serve", str(served.model_store / f"{STOCK}.mar"),
               "--port", "0", "--key-file", str(folder / "key.json")]
    started = time.monotonic()
    cli = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = ProcessOutput(cli, started)
    try:
        output.wait_for(SERVING, START_TIMEOUT_S)
        url = re.search(SERVING, output.text).group(1)
        key = json.loads((folder / "key.json").read_text())["inference"]["key"]
        server = OnRay(url, key)
        first = ready(server)
        print(f"\nRay Serve: stock.mar answered in {time.monotonic() - started:.1f} s from the command's start")
        assert first.status_code == 200, first.text
        yield server
    finally:
        stop(cli, output)


def ready(server: OnRay, timeout: float = 60) -> requests.Response:
    """The first answer to a photo: HAProxy may still be loading the replica's address for a
    moment after the command says it is serving."""
    deadline = time.monotonic() + timeout
    while True:
        response = server.post(PHOTOS[0])
        if response.status_code not in (404, 502, 503) or time.monotonic() > deadline:
            return response
        time.sleep(0.5)


def stop(cli: subprocess.Popen, output: ProcessOutput) -> None:
    """SIGTERM, as Ctrl-C: the command stops its cluster; then any process it started that is
    still there (the command killed after a hang) is ended, only those."""
    descendants: dict = {}
    if cli.poll() is None:
        descendants.update({p.pid: p for p in psutil.Process(cli.pid).children(recursive=True)})
        cli.send_signal(signal.SIGTERM)
        try:
            output.wait_exit(timeout=90)
        except subprocess.TimeoutExpired:
            cli.kill()
            cli.wait(timeout=30)
    for pid, process in descendants.items():
        try:
            if alive(pid) and process.is_running():  # is_running: the same process, not a reused pid
                process.kill()
        except psutil.Error:
            pass


@pytest.fixture(scope="module")
def stock_answers(served):
    """The real stock TorchServe's answers to the photos (one batch of them, as stock serves a batch of good photos)."""
    answers = post_together(served, STOCK, PHOTOS)
    assert [status for status, _ in answers] == [200] * len(PHOTOS), answers
    assert len({tuple(answer) for _, answer in answers}) > 1  # the photos are told apart
    return [answer for _, answer in answers]


def test_the_stock_mar_on_ray_serve_answers_each_photo_as_stock_torchserve_does(on_ray, stock_answers):
    ours = on_ray.post_together(PHOTOS)
    assert [r.status_code for r in ours] == [200] * len(PHOTOS), [r.text for r in ours]
    assert_same_answers([r.json() for r in ours], stock_answers)


def test_an_upload_that_is_not_an_image_gets_its_own_400_on_ray_and_its_batch_mates_200(on_ray, stock_answers):
    bodies = PHOTOS[:2] + [NOT_AN_IMAGE] + PHOTOS[2:]
    ours = on_ray.post_together(bodies)
    assert [r.status_code for r in ours] == [200, 200, 400, 200, 200, 200], [r.text for r in ours]
    bad = ours[2]
    assert bad.json()["code"] == 400 and "UnidentifiedImageError" in bad.json()["message"], bad.text
    assert int(bad.headers["X-Batch-Size"]) > 1, "the bad upload was not batched with others: nothing was shown"
    assert_same_answers([r.json() for r in ours[:2] + ours[3:]], stock_answers)
