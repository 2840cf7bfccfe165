"""The sweep tool on a user's own model, for real: the quickstart model copied into a project of
its own (handler, model, weights, a config with paths relative to it) and a folder of JSON
samples, swept over a one-point grid on the sweep's own TorchServe."""

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bench.sweep import main

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "examples" / "quickstart"


@pytest.fixture
def user_project(tmp_path):
    project = tmp_path / "my_project"
    project.mkdir()
    for name in ("handler.py", "model.py"):
        shutil.copy(QUICKSTART / name, project / name)
    # The weights, made by the quickstart config's own build command, into the project.
    subprocess.run([sys.executable, str(QUICKSTART / "build.py"), str(project)], check=True, capture_output=True,
                   timeout=120)
    config = {
        "model_name": "my_model", "version": "1.0",
        "handler": "handler.py", "model_file": "model.py", "serialized_file": "weights.pt",
        "model_config": {"batchSize": 16, "maxBatchDelay": 20, "minWorkers": 1, "maxWorkers": 1,
                         "responseTimeout": 60, "handler": {"micro_batch_size": 4, "pool_size": 2, "deadline_s": 30}},
    }
    (project / "my_model.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    samples = project / "samples"
    samples.mkdir()
    for i in range(3):
        (samples / f"request_{i}.json").write_text(json.dumps({"id": f"r{i}", "x": [i, 1, 2, 3]}))
    return project


@pytest.mark.timeout(180)
def test_the_sweep_tunes_a_users_own_model_from_its_config_and_sample_folder(user_project, tmp_path):
    out = tmp_path / "out"
    code = main([
        "--config", str(user_project / "my_model.yaml"), "--inputs", str(user_project / "samples"),
        "--batch-sizes", "4", "--delays", "10", "--micro", "2", "--pools", "1",
        "--concurrency", "2", "--seconds", "2", "--p99-budget-ms", "30000", "--out", str(out),
    ])
    assert code == 0
    with open(out / "sweep.csv") as f:
        [row] = list(csv.DictReader(f))
    assert (row["batch_size"], row["delay_ms"], row["micro"], row["pool"]) == ("4", "10", "2", "1")
    assert float(row["throughput_rps"]) > 0
    assert int(row["errors"]) == 0
    assert (out / "recommendation.txt").read_text().startswith("recommended: batchSize 4, maxBatchDelay 10 ms")
