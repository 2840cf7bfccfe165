"""`python -m handlers.torchserve_config` prints a config.properties a user can start TorchServe
with: the same safe settings as this repository's own, and the handlers' metrics declared from
the installed package; ``--port`` moves every port and the worker sockets, so that two
TorchServes fit on one machine (docs/operating.md)."""

from pathlib import Path

import pytest

from handlers.torchserve_config import METRICS_YAML, main, torchserve_ports, torchserve_properties
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


PORT_KEYS = ("inference_address", "management_address", "metrics_address", "grpc_inference_port",
             "grpc_management_port", "initial_worker_port")


def ports_of(properties):
    """The six numbers of a config: five TCP ports and the first worker socket's."""
    return [int(properties[key].rsplit(":", 1)[-1]) for key in PORT_KEYS]


def printed(capsys, tmp_path, *argv):
    assert main(list(argv)) == 0
    path = tmp_path / "config.properties"
    path.write_text(capsys.readouterr().out)
    return read_properties(path)


def test_the_default_ports_are_the_repositorys_own(capsys, tmp_path):
    ours, shipped = printed(capsys, tmp_path), read_properties(ROOT / "config.properties")
    assert {key: ours[key] for key in PORT_KEYS} == {key: shipped[key] for key in PORT_KEYS}


@pytest.mark.parametrize("port", [8180, 9080, 18080, 2000])
def test_a_port_moves_every_port_and_the_worker_sockets_and_keeps_the_safe_settings(capsys, tmp_path, port):
    default, moved = printed(capsys, tmp_path), printed(capsys, tmp_path, "--port", str(port))
    assert ports_of(moved) == [number + port - 8080 for number in ports_of(default)]
    assert len(set(ports_of(moved))) == 6
    assert {key: moved[key] for key in moved if key not in PORT_KEYS} == {
        key: default[key] for key in default if key not in PORT_KEYS}
    for key in set(SAFETY_KEYS) - set(PORT_KEYS):
        assert moved[key] == read_properties(ROOT / "config.properties")[key], key


def test_the_documented_pair_shares_no_number(capsys, tmp_path):
    """docs/operating.md: 8080 and 8180, side by side."""
    numbers = ports_of(printed(capsys, tmp_path, "--port", "8080")) + ports_of(printed(capsys, tmp_path, "--port", "8180"))
    assert len(set(numbers)) == 12, numbers
    assert ports_of(printed(capsys, tmp_path, "--port", "8180")) == [8180, 8181, 8182, 7170, 7171, 9600]


def test_grpc_and_worker_ports_can_be_given_apart_from_the_port(capsys, tmp_path):
    properties = printed(capsys, tmp_path, "--port", "8180", "--grpc-port", "50051", "--worker-port", "30000")
    assert ports_of(properties) == [8180, 8181, 8182, 50051, 50052, 30000]
    assert torchserve_ports(8180, grpc_port=50051) == {
        "inference": 8180, "management": 8181, "metrics": 8182, "gRPC inference": 50051, "gRPC management": 50052,
        "first worker": 9600}


@pytest.mark.parametrize("options, message", [
    ({"grpc_port": 8081}, "the gRPC inference port and the management port are both 8081: choose another --grpc-port"),
    ({"worker_port": 7071}, "the first worker port and the gRPC management port are both 7071: "
                            "choose another --worker-port"),
    ({"grpc_port": 8079}, "the gRPC management port and the inference port are both 8080: choose another --grpc-port"),
    ({"port": 1000}, "the gRPC inference port must be within 1-65535, got -10: give --grpc-port, or another --port"),
    ({"port": 65534}, "the metrics port must be within 1-65535, got 65536: choose another --port"),
    ({"worker_port": 70000}, "the first worker port must be within 1-65535, got 70000: choose another --worker-port"),
])
def test_a_port_used_twice_or_out_of_range_is_refused_with_the_option_to_change(capsys, options, message):
    with pytest.raises(ValueError) as error:
        torchserve_properties(**options)
    assert str(error.value) == message
    with pytest.raises(SystemExit) as exit_:
        main([word for key, value in options.items() for word in (f"--{key.replace('_', '-')}", str(value))])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
