"""`python -m handlers.torchserve_config` prints a config.properties a user can start TorchServe
with: the same safe settings as this repository's own, and the handlers' metrics declared from
the installed package."""

from pathlib import Path

from handlers.torchserve_config import METRICS_YAML, main, torchserve_properties
from scripts.torchserve_instance import read_properties

ROOT = Path(__file__).resolve().parents[2]
SAFETY_KEYS = ("inference_address", "management_address", "metrics_address", "grpc_inference_address",
               "grpc_management_address", "enable_model_api", "disable_token_authorization", "max_request_size",
               "max_response_size", "job_queue_size", "metrics_mode", "install_py_dep_per_model")


def test_the_printed_config_keeps_the_repositorys_safe_settings(capsys, tmp_path):
    assert main([]) == 0
    printed = tmp_path / "config.properties"
    printed.write_text(capsys.readouterr().out)
    ours, shipped = read_properties(printed), read_properties(ROOT / "config.properties")
    assert {key: ours[key] for key in SAFETY_KEYS} == {key: shipped[key] for key in SAFETY_KEYS}


def test_metrics_come_from_the_package_and_declare_the_handlers_metrics():
    path = Path(torchserve_properties()["metrics_config"])
    assert path == METRICS_YAML and path.is_file()
    assert (ROOT / read_properties(ROOT / "config.properties")["metrics_config"]).resolve() == path
    for name in ("BatchesServed", "ModelCalls", "StageTimeMs", "RequestErrors"):
        assert f"name: {name}" in path.read_text()


def test_a_port_moves_all_three_addresses():
    properties = torchserve_properties(9100)
    assert [properties[k] for k in ("inference_address", "management_address", "metrics_address")] == [
        "http://127.0.0.1:9100", "http://127.0.0.1:9101", "http://127.0.0.1:9102"]
