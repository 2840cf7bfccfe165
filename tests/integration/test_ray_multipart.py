"""``curl -F data=@file`` (multipart/form-data, as TorchServe's docs show) on a real Ray Serve: the
form's ``data`` file is the body, as TorchServe hands it to the handler (was a 4xx on Ray Serve)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
import requests

from handlers.servers.ray_cluster import set_ray_environment
from scripts.torchserve_instance import free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]
set_ray_environment()  # before Ray is imported: it reads these at import time
ray = pytest.importorskip("ray")

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ray_quickstart():
    """A private Ray cluster serving the quickstart example only; stopped at the end."""
    from handlers.servers.ray_cluster import start_local_cluster, stop_local_cluster
    from handlers.servers.ray_serve import serve_configs

    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's unix sockets live there
    for attempt in range(3):  # a free port can be taken by another process before Ray binds it
        port = free_port()
        try:
            start_local_cluster(temp_dir, port, num_cpus=2)
            break
        except Exception:  # noqa: BLE001 - retried with another port, re-raised on the last try
            stop_local_cluster()
            if attempt == 2:
                raise
    try:
        serve_configs([ROOT / "archiver_configs" / "quickstart.yaml"])
        yield f"http://127.0.0.1:{port}/predictions/quickstart"
    finally:
        stop_local_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_a_multipart_form_file_is_the_body_on_ray_serve_as_on_torchserve(ray_quickstart):
    body = b'{"x": [1, 2, 3, 4]}'
    raw = requests.post(ray_quickstart, data=body, headers={"Content-Type": "application/json"}, timeout=60)
    form = requests.post(ray_quickstart, files={"data": ("input.json", body, "application/json")}, timeout=60)
    assert raw.status_code == form.status_code == 200, form.text
    assert form.json() == raw.json()
    other = requests.post(ray_quickstart, files={"file": ("input.json", body)}, timeout=60)
    assert other.status_code == 415, other.text  # TorchServe reads a field named body or data only
