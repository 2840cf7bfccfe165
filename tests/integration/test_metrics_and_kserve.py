"""Handler metrics on TorchServe's Prometheus endpoint, and the KServe v2 envelope."""

import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from handlers.packaging.archive import archive_config
from scripts.torchserve_instance import Ports, TorchServe

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def prometheus_samples(server, name, model):
    """{labels-dict-as-tuple: value} for one metric of one model."""
    status, body = server.get(f"{server.metrics_url}/metrics", api=None)
    assert status == 200
    samples = {}
    for line in body.decode().splitlines():
        match = re.match(rf"^{name}\{{(.*)\}} ([0-9.eE+-]+)$", line)
        if match:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
            if labels.get("ModelName") == model:
                samples[tuple(sorted(labels.items()))] = float(match.group(2))
    return samples


def test_batch_sizes_stage_times_and_errors_reach_prometheus(torchserve):
    url = f"{torchserve.inference_url}/predictions/quickstart"
    headers = {"Content-Type": "application/json", **torchserve.auth()}
    bodies = [json.dumps({"id": str(i), "x": [i, i, i, i]}) for i in range(64)] + ["{broken"] * 3
    with ThreadPoolExecutor(64) as pool:
        responses = list(pool.map(lambda body: requests.post(url, data=body, headers=headers, timeout=60), bodies))
    assert sorted(r.status_code for r in responses) == [200] * 64 + [400] * 3

    batches = prometheus_samples(torchserve, "BatchesServed", "quickstart")
    sizes = {int(dict(labels)["BatchSize"]): count for labels, count in batches.items()}
    assert sum(size * count for size, count in sizes.items()) >= 67  # every request was in a batch
    assert max(sizes) > 1, f"no batch larger than 1: {sizes}"
    stages = {dict(labels)["Stage"] for labels in prometheus_samples(torchserve, "StageTimeMs", "quickstart")}
    assert stages == {"queue", "preprocess", "inference", "postprocess"}
    errors = {dict(labels)["StatusCode"]: v for labels, v in prometheus_samples(torchserve, "RequestErrors", "quickstart").items()}
    assert errors.get("400", 0) >= 3
    assert sum(prometheus_samples(torchserve, "ModelCalls", "quickstart").values()) >= 1


@pytest.fixture(scope="module")
def kserve_v2(tmp_path_factory):
    """A second TorchServe, with the KServe v2 envelope (a server-wide setting) and the tabular
    model archived with batchSize 1: TorchServe's envelopes read only the first request of a
    batch; the instances of that one request are the handler's batch."""
    store = tmp_path_factory.mktemp("kserve_store")
    archive_config(
        ROOT / "archiver_configs" / "tabular.yaml", store,
        model_name="tabular_kserve", model_config_updates={"batchSize": 1, "maxBatchDelay": 1},
    )
    server = TorchServe(
        tmp_path_factory.mktemp("kserve"), store, ROOT / "config.properties", ports=Ports.free(),
        extra_properties={"service_envelope": "kservev2"},
    )
    server.start()
    try:
        server.wait_ready(["tabular_kserve"])
        yield server
    finally:
        server.stop()


def test_kserve_v2_requests_and_responses(kserve_v2):
    request = {
        "id": "req-42",
        "inputs": [
            {"name": "flower-1", "shape": [4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]},
            {"name": "flower-2", "shape": [4], "datatype": "FP32", "data": [6.7, 3.0, 5.2, 2.3]},
        ],
    }
    response = requests.post(
        f"{kserve_v2.inference_url}/v2/models/tabular_kserve/infer",
        json=request, headers=kserve_v2.auth(), timeout=60,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["id"] == "req-42" and body["model_name"] == "tabular_kserve"
    outputs = {o["name"]: o["data"][0] for o in body["outputs"]}
    assert outputs["flower-1"]["species"] == "setosa"
    assert outputs["flower-2"]["species"] == "virginica"


def test_kserve_v2_bad_input_gets_its_4xx_and_message(kserve_v2):
    request = {"inputs": [{"name": "bad", "shape": [3], "datatype": "FP32", "data": [1.0, 2.0, 3.0]}]}
    response = requests.post(
        f"{kserve_v2.inference_url}/v2/models/tabular_kserve/infer",
        json=request, headers=kserve_v2.auth(), timeout=60,
    )
    assert response.status_code == 400
    assert "expected shape [4] of float32, got shape [3]" in response.text
