"""The sweep tool on a user's own model (bench/sweep.py --config/--inputs): sample reading and
content types, the grid's model config keeping the user's other settings, the refusals, the
check that every sample is answered 200, and the load generator's per-body headers. No
TorchServe here: tests/integration/test_sweep_user_model.py runs a real sweep."""

import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from bench.loadgen import run_closed_loop
from bench.sweep import Refused, Sample, first_failing_sample, grid_model_config, main, sample_requests

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "examples" / "quickstart"


def write_files(folder: Path, files: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, body in files.items():
        (folder / name).write_bytes(body)
    return folder


def test_every_regular_file_is_one_request_body_sorted_by_name(tmp_path):
    folder = write_files(tmp_path / "samples", {"b.json": b'{"x": 2}', "a.json": b'{"x": 1}', "c.bin": b"\x00\x01"})
    (folder / "nested").mkdir()  # a folder is not a request
    (folder / "nested" / "d.json").write_bytes(b"{}")
    samples = sample_requests(folder)
    assert [s.name for s in samples] == ["a.json", "b.json", "c.bin"]
    assert [s.body for s in samples] == [b'{"x": 1}', b'{"x": 2}', b"\x00\x01"]


def test_content_types_are_guessed_from_each_suffix_else_octet_stream(tmp_path):
    folder = write_files(tmp_path / "samples", {"a.json": b"{}", "b.jpg": b"jpeg", "c.txt": b"hi", "d.npy": b"npy",
                                                "e": b"no suffix"})
    assert {s.name: s.content_type for s in sample_requests(folder)} == {
        "a.json": "application/json", "b.jpg": "image/jpeg", "c.txt": "text/plain",
        "d.npy": "application/octet-stream", "e": "application/octet-stream",
    }


def test_content_type_given_applies_to_every_file(tmp_path):
    folder = write_files(tmp_path / "samples", {"a.json": b"{}", "b": b"raw"})
    assert {s.content_type for s in sample_requests(folder, "application/x-npy")} == {"application/x-npy"}


def test_a_folder_with_no_files_or_no_folder_is_refused(tmp_path):
    (tmp_path / "empty" / "only_a_folder").mkdir(parents=True)
    with pytest.raises(Refused, match="no files in it"):
        sample_requests(tmp_path / "empty")
    with pytest.raises(Refused, match="not a folder"):
        sample_requests(tmp_path / "missing")


def test_the_grid_overrides_batching_and_keeps_the_users_other_settings():
    base = {"batchSize": 16, "maxBatchDelay": 20, "minWorkers": 2, "responseTimeout": 60, "jobQueueSize": 128,
            "handler": {"micro_batch_size": 4, "pool_size": 2, "deadline_s": 30, "top_k": 5,
                        "micro_batch_strategy": "static"}}
    before = json.loads(json.dumps(base))
    config = grid_model_config(base, 8, 5, "2", 1)
    assert config == {"batchSize": 8, "maxBatchDelay": 5, "minWorkers": 2, "responseTimeout": 60, "jobQueueSize": 128,
                      "handler": {"micro_batch_size": 2, "pool_size": 1, "deadline_s": 30, "top_k": 5,
                                  "micro_batch_strategy": "static"}}
    assert base == before  # the user's config is not changed in place
    assert grid_model_config(base, 8, 5, "whole", 1)["handler"]["micro_batch_size"] == "whole"


def test_the_grid_adds_a_handler_section_to_a_config_without_one():
    assert grid_model_config({"batchSize": 4}, 8, 0, "4", 2) == {
        "batchSize": 8, "maxBatchDelay": 0, "handler": {"micro_batch_size": 4, "pool_size": 2}}


# -- refusals (before any TorchServe starts) --


@pytest.fixture
def user_project(tmp_path):
    """A user's project: the quickstart handler and model, a config with paths relative to it, and
    a folder of samples (weights are not needed to check a config)."""
    project = tmp_path / "project"
    project.mkdir()
    for name in ("handler.py", "model.py"):
        shutil.copy(QUICKSTART / name, project / name)
    config = {"model_name": "my_model", "version": "1.0", "handler": "handler.py", "model_file": "model.py",
              "model_config": {"batchSize": 8, "maxBatchDelay": 10, "handler": {"pool_size": 1}}}
    (project / "my_model.yaml").write_text(yaml.safe_dump(config))
    write_files(project / "samples", {"one.json": (QUICKSTART / "sample.json").read_bytes()})
    return project


def refusal(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_a_missing_config_is_refused(tmp_path, capsys, user_project):
    err = refusal(capsys, ["--config", str(tmp_path / "nope.yaml"), "--inputs", str(user_project / "samples")])
    assert err == f"error: --config {tmp_path / 'nope.yaml'}: no such file"


def test_an_empty_inputs_folder_is_refused(tmp_path, capsys, user_project):
    (tmp_path / "empty").mkdir()
    err = refusal(capsys, ["--config", str(user_project / "my_model.yaml"), "--inputs", str(tmp_path / "empty")])
    assert "no files in it" in err and str(tmp_path / "empty") in err


def test_a_config_the_archive_check_rejects_is_refused_with_its_message(capsys, user_project):
    path = user_project / "my_model.yaml"
    config = yaml.safe_load(path.read_text())
    config["model_config"]["batchSize"] = 0
    path.write_text(yaml.safe_dump(config))
    err = refusal(capsys, ["--config", str(path), "--inputs", str(user_project / "samples")])
    assert str(path) in err and "model_config.batchSize: must be an integer >= 1, got 0" in err


@pytest.mark.parametrize("argv, message", [
    (["--config", "c.yaml", "--workload", "tensor", "--inputs", "s"], "not allowed with argument"),
    (["--config", "c.yaml"], "--config needs --inputs"),
    (["--inputs", "samples"], "go with --config"),
    (["--workload", "tensor", "--content-type", "application/json"], "go with --config"),
])
def test_argument_combinations_that_make_no_sense_are_refused(capsys, argv, message):
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


# -- against a small local HTTP server standing in for TorchServe --


class AnswerOrRefuse(BaseHTTPRequestHandler):
    """200 with {}, or 400 with a JSON error for a body starting with b"bad"; records every
    (body, Content-Type) on its server."""

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        with self.server.lock:
            self.server.received.append((body, self.headers["Content-Type"]))
        bad = body.startswith(b"bad")
        answer = json.dumps({"code": 400, "type": "BadRequest", "message": "expected\nJSON"} if bad else {}).encode()
        self.send_response(400 if bad else 200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args):
        pass


class RecordingServer(ThreadingHTTPServer):
    def __init__(self):
        super().__init__(("127.0.0.1", 0), AnswerOrRefuse)
        self.received = []
        self.lock = threading.Lock()
        self.url = f"http://127.0.0.1:{self.server_address[1]}/predictions/m"


@pytest.fixture
def server():
    server = RecordingServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(5)


def test_every_sample_is_sent_once_with_its_content_type_before_the_sweep(server):
    samples = [Sample("a.json", b"{}", "application/json"), Sample("b.npy", b"\x93NUMPY", "application/octet-stream")]
    assert first_failing_sample(server.url, samples, {"Authorization": "Bearer t"}) is None
    assert server.received == [(b"{}", "application/json"), (b"\x93NUMPY", "application/octet-stream")]


def test_the_first_sample_not_answered_200_is_named_with_its_status_and_body(server):
    samples = [Sample("a.json", b"{}", "application/json"), Sample("b.json", b"bad", "application/json"),
               Sample("c.json", b"bad too", "application/json")]
    failure = first_failing_sample(server.url, samples, {})
    assert failure == ('sample b.json (application/json) was answered 400: '
                       '{"code": 400, "type": "BadRequest", "message": "expected\\nJSON"}')
    assert len(server.received) == 2  # it stops at the first


def test_the_load_generator_sends_each_body_with_its_own_headers(server):
    bodies = [b"one", b"two", b"three"]
    body_headers = [{"Content-Type": "text/plain"}, {"Content-Type": "image/png"}, {}]
    run_closed_loop(server.url, bodies, {"Content-Type": "application/octet-stream"}, concurrency=1, seconds=0.5,
                    warmup_s=0.0, body_headers=body_headers)
    seen = dict(server.received)
    assert seen == {b"one": "text/plain", b"two": "image/png", b"three": "application/octet-stream"}


def test_the_load_generator_refuses_headers_that_do_not_match_the_bodies():
    with pytest.raises(ValueError, match="one entry per body"):
        run_closed_loop("http://127.0.0.1:9/x", [b"a", b"b"], {}, 1, 0.1, body_headers=[{}])
