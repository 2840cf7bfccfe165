"""The README's and docs' commands, run as a user pastes them (see tests/docs_blocks.py): the
walkthrough from an empty folder to a served archive on a fresh venv, `make serve` and the curl
commands it prints, the queue demonstration beside it, and Ray Serve's start command."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from scripts.torchserve_instance import Ports, TorchServe
from tests.docs_blocks import ROOT, blocks_named, outputs_in_order, script_of

from .helpers import ProcessOutput, alive

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1500)]
TORCHSERVE_PORTS = (8080, 8081, 8082, 7070, 7071)  # what the docs' commands use, as a user's would


def require_free(ports) -> None:
    for port in ports:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                pytest.skip(f"port {port} is in use here (a `make serve` of yours?): the docs' commands need it")


def user_env(temp: Path) -> dict:
    """A shell as a user has it: no venv of this checkout on PATH, no PYTHONPATH, temp dirs of its
    own (TorchServe's pid file and worker sockets); pip takes this machine's torch build."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != venv_bin)
    env.update(TMPDIR=str(temp), TEMP=str(temp), PIP_CONSTRAINT=str(ROOT / "constraints.txt"))
    return env


def run_script(text: str, cwd: Path, env: dict, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", "set -euo pipefail\n" + text], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def assert_printed(blocks, result) -> None:
    report = f"exit {result.returncode}\n--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-4000:]}"
    assert result.returncode == 0, report
    expected = [line for block in blocks for line in block.expected_output]
    assert outputs_in_order(expected, result.stdout) is None, f"missing {outputs_in_order(expected, result.stdout)!r}\n{report}"


def test_the_readme_walkthrough_runs_as_written(tmp_path):
    """From an empty folder beside a clone, on a fresh venv: install (pip builds the wheel from
    the checkout), test, package (both ways), serve, answer, metrics. Then the archives are
    served again by that TorchServe after the framework is uninstalled: they are self-contained."""
    require_free(TORCHSERVE_PORTS)
    clone = tmp_path / "microbatch-handlers"
    clone.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, clone / name)
    shutil.copytree(ROOT / "handlers", clone / "handlers", ignore=shutil.ignore_patterns("__pycache__"))
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = user_env(temp)
    blocks = blocks_named("walkthrough")
    project = tmp_path / "my_project"
    started = time.monotonic()
    try:
        result = run_script(script_of(blocks), tmp_path, env, timeout=1200)
    finally:
        own_tmp = project / "tmp"  # the walkthrough's TMPDIR for its TorchServe
        if (own_tmp / ".model_server.pid").exists():  # the script failed before its `torchserve --stop`
            subprocess.run([str(project / ".venv" / "bin" / "torchserve"), "--stop"], cwd=project,
                           env={**env, "TMPDIR": str(own_tmp), "TEMP": str(own_tmp)}, timeout=120)
    print(f"\nwalkthrough: {time.monotonic() - started:.0f} s")
    assert_printed(blocks, result)

    venv_bin = project / ".venv" / "bin"
    subprocess.run([str(venv_bin / "pip"), "uninstall", "-q", "-y", "microbatch-handlers"], check=True, env=env)
    assert subprocess.run([str(venv_bin / "python"), "-c", "import handlers"], cwd=temp, env=env,
                          stderr=subprocess.DEVNULL).returncode != 0
    server = TorchServe(tmp_path / "served", project / "model_store", project / "config.properties",
                        ports=Ports.free(), python_bin=venv_bin,
                        extra_properties={"load_models": "all", "metrics_config": str(ROOT / "handlers" / "metrics.yaml")})
    server.start()
    try:
        server.wait_ready(["my_model", "my_model_direct"])
        for model in ("my_model", "my_model_direct"):
            answer = requests.post(f"{server.inference_url}/predictions/{model}", json={"x": [5, 6]},
                                   headers=server.auth(), timeout=30)
            assert (answer.status_code, answer.json()) == (200, {"y": [11.0, 13.0]}), answer.text
    finally:
        server.stop()


def test_make_serve_and_the_commands_it_prints(tmp_path):
    """`make serve` as the README says, every curl command it prints, then docs/queueing.md's
    demonstration against it (from a folder of its own, with the tokens where make serve puts them)."""
    require_free((*TORCHSERVE_PORTS, 9500))
    [block] = blocks_named("make-serve")
    process = subprocess.Popen(["bash", "-c", block.text], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    output = ProcessOutput(process, time.monotonic())
    server = TorchServe(ROOT / ".serve", ROOT / "model_store", ROOT / "config.properties")  # make serve's own
    try:
        output.wait_for(r"Ctrl-C stops TorchServe", 900)
        commands = [line.strip() for _, line in output.lines if line.startswith("curl ")]
        assert len(commands) >= 5, output.text[-4000:]
        for command in commands:
            answer = subprocess.run(["bash", "-c", command + " -s -w ' %{http_code}'"], cwd=ROOT, capture_output=True,
                                    text=True, timeout=120)
            assert answer.stdout.endswith(" 200"), f"{command}\n{answer.stdout[-500:]}{answer.stderr[-500:]}"

        queue_demo = blocks_named("with-make-serve")
        (tmp_path / ".serve").symlink_to(ROOT / ".serve")
        result = run_script(script_of(queue_demo), tmp_path, dict(os.environ), timeout=300)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        counts = result.stdout.split('"jobQueueStatus"')[-1]
        assert " 503" in counts and " 200" in counts, result.stdout[-2000:]
    finally:
        server_pid = server.pid()
        os.killpg(process.pid, signal.SIGINT)  # Ctrl-C, as the README says
        try:
            output.wait_exit(180)
        except subprocess.TimeoutExpired:  # fails the test; leaves no server behind for the next one
            os.killpg(process.pid, signal.SIGKILL)
            server.stop()
            raise
    assert "stopping TorchServe" in output.text
    if server_pid is not None:
        assert not alive(server_pid)


def test_the_ray_serve_commands_run_as_written():
    require_free((8000,))
    blocks = blocks_named("ray-serve")
    result = run_script(script_of(blocks), ROOT, dict(os.environ), timeout=600)
    assert_printed(blocks, result)
