"""The Ray Serve adapter's reading of an archiver config, without Ray: the ray_serve: section is
checked with the rest of the config, and TorchServe's batching maps to @serve.batch's."""

import pytest
import yaml

from handlers.core.request import NO_BODY
from handlers.packaging.archive import ArchiveConfigError, load_spec
from handlers.packaging.server_sections import check_ray_section
from handlers.servers.ray_serve import batching_of, request_from_http
from handlers.testing import LocalServer

from .models import AffineHandler
from .test_archive_configs import ROOT, write_config


def test_batch_size_and_delay_map_to_serve_batch():
    assert batching_of({"batchSize": 16, "maxBatchDelay": 20}) == {"max_batch_size": 16, "batch_wait_timeout_s": 0.02}
    assert batching_of({}) == {"max_batch_size": 1, "batch_wait_timeout_s": 0.1}  # TorchServe's defaults


def test_replicas_autoscaling_and_gpus_pass_through_as_written():
    section = {"num_replicas": 2, "ray_actor_options": {"num_gpus": 1}, "max_concurrent_batches": 2,
               "autoscaling_config": {"min_replicas": 1, "max_replicas": 4}}
    assert check_ray_section(section) == section


@pytest.mark.parametrize("section, message", [
    ({"replicas": 2}, "ray_serve.replicas is not a known setting"),
    ({"max_concurrent_batches": 0}, "ray_serve.max_concurrent_batches must be an integer >= 1, got 0"),
    ([1, 2], "ray_serve must be a mapping"),
])
def test_a_bad_ray_serve_section_fails_the_archive_check_naming_the_key(tmp_path, section, message):
    path = write_config(tmp_path, ray_serve=section)
    with pytest.raises(ArchiveConfigError) as caught:
        load_spec(path, ROOT)
    assert message in str(caught.value)


def test_a_config_without_a_ray_serve_section_is_served_with_defaults(tmp_path):
    spec = load_spec(write_config(tmp_path), ROOT)
    assert spec.ray_serve == {}
    assert yaml.safe_load(spec.source.read_text())["model_name"] == "quickstart"


# -- one HTTP request as the core takes it (parity with TorchServe) ------------------------------


def test_a_ray_request_keeps_its_raw_bytes_for_the_pool_to_decode():
    request = request_from_http(b'{"x": [1]}', {"content-type": "application/json", "x-request-id": "r-1"})
    assert request.body == b'{"x": [1]}' and request.id == "r-1"


def test_a_form_post_on_ray_is_read_as_torchserve_reads_it():
    """curl -d without a Content-Type sends a form: on TorchServe its fields, with no body (a 415
    that says what to send) unless a field is named body or data. Ray Serve answered it 200 by
    reading the form's raw bytes as JSON."""
    form = {"content-type": "application/x-www-form-urlencoded"}
    assert request_from_http(b'{"x": [1, 2, 3, 4]}', form).body is NO_BODY
    assert request_from_http(b"data=%5B1%2C+2%5D", form).body == b"[1, 2]"
    form_utf8 = {"content-type": "application/x-www-form-urlencoded; charset=utf-8"}
    assert request_from_http(b"body=caf%C3%A9&other=1", form_utf8).body == "café".encode()
    with LocalServer.start(AffineHandler) as server:
        [response] = server.send([NO_BODY])
    assert response.status == 415 and "curl -d without" in response.body["message"]


def test_without_ray_the_command_says_in_one_line_how_to_install_it(monkeypatch, capsys):
    """From the new-user trial: a venv with only [serve] got a ModuleNotFoundError traceback."""
    import builtins

    from handlers import ray_serve

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ModuleNotFoundError("No module named 'ray'", name="ray")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    assert ray_serve.main(["archiver_configs/quickstart.yaml"]) == 1
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: Ray Serve is not installed in this Python") and "[ray]" in line


def test_torch_threads_follow_the_replicas_cpus_unless_the_handler_sets_them():
    from handlers.servers.ray_serve import replica_threads

    assert replica_threads(2.0, 0) == 2 and replica_threads(1.0, 0) == 1 and replica_threads(0.5, 0) == 1
    assert replica_threads(4.0, 3) == 0  # the handler's torch_threads: it applies them itself
    assert replica_threads(None, 0) == 0  # nothing assigned (outside Ray): torch left as it is


def test_the_local_node_holds_what_the_configs_replicas_reserve(tmp_path):
    from types import SimpleNamespace

    from handlers.servers.ray_serve import reserved_cpus

    specs = [SimpleNamespace(ray_serve={}),
             SimpleNamespace(ray_serve={"num_replicas": 2, "ray_actor_options": {"num_cpus": 2}}),
             SimpleNamespace(ray_serve={"autoscaling_config": {"min_replicas": 3}, "ray_actor_options": {"num_cpus": 0.5}})]
    assert reserved_cpus(specs) == 1 + 4 + 1.5
    shipped = [load_spec(path) for path in sorted((ROOT / "archiver_configs").glob("*.yaml"))]
    assert reserved_cpus(shipped) == 8  # image_classifier and text_embedding reserve 2, the other four 1


def test_a_request_without_the_inference_key_is_refused_and_one_with_it_passes():
    from handlers.servers.ray_serve import unauthorized

    assert unauthorized({"authorization": "Bearer k1"}, "k1") is None
    assert unauthorized({"Authorization": "Bearer k1"}, "k1") is None
    for headers in ({}, {"authorization": "Bearer k2"}, {"authorization": "k1"}, {"authorization": "Bearer k1 "}):
        refused = unauthorized(headers, "k1")
        assert refused["code"] == 401 and "Authorization: Bearer" in refused["message"], headers
    assert unauthorized({}, None) is None  # --no-token-auth


def test_the_key_file_is_new_each_start_and_readable_by_its_owner_only(tmp_path):
    import json
    import stat

    from handlers.ray_serve import write_key_file

    path = tmp_path / "ray_serve_key.json"
    first = write_key_file(path)
    assert json.loads(path.read_text()) == {"inference": {"key": first}} and len(first) >= 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert write_key_file(path) != first


def test_ray_metrics_of_a_batch_refused_before_the_model_keep_its_error_counts(caplog):
    """Regression: Ray's Counter.inc(0) raises, so a batch whose every request was refused before
    the model (ModelCalls 0) logged a traceback and lost its RequestErrors (seen serving a .mar)."""
    pytest.importorskip("ray")
    from types import SimpleNamespace

    from handlers.engine.batch_engine import BatchReport
    from handlers.engine.errors import BadRequest
    from handlers.engine.outcome import Failure
    from handlers.servers.ray_serve import _RayMetrics

    metrics = _RayMetrics()  # real Ray counters: inc(0) raises ValueError
    counted = []
    metrics.errors = SimpleNamespace(inc=lambda value, tags: counted.append((value, tags)))
    report = BatchReport(outcomes=[Failure(BadRequest("no field 'x'"))] * 2, micro_batch_sizes=[], model_calls=0)
    metrics.record(report)
    assert counted == [(2, {"status_code": "400"})]
    assert "could not record metrics" not in caplog.text
