"""Start, wait for and stop one TorchServe of our own, without touching any other.

TorchServe keeps its pid file in Python's temp dir (``TMPDIR``), worker sockets in Java's
(``TEMP`` → ``-Djava.io.tmpdir``), and writes ``key_file.json`` and ``logs/`` where it starts.
An instance gets its own directory for all of them, so ``torchserve --stop`` here stops exactly
the TorchServe started here.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

READY_TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_properties(path: Path) -> dict:
    props = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            props[key.strip()] = value.strip()
    return props


def write_properties(path: Path, props: dict) -> None:
    path.write_text("".join(f"{key}={value}\n" for key, value in props.items()))


@dataclass
class Ports:
    inference: int
    management: int
    metrics: int
    grpc_inference: int
    grpc_management: int
    first_worker: int

    @classmethod
    def free(cls) -> "Ports":
        # Worker "ports" name the sockets /tmp/.ts.sock.<port>, one per worker counting up from
        # first_worker: pick a free TCP port so that two instances on one machine differ.
        return cls(*(free_port() for _ in range(6)))


class TorchServe:
    """One TorchServe process tree, owned by this object.

    Args:
        workdir: this instance's own directory (temp dirs, logs, key file, config).
        model_store: where the ``.mar`` files are.
        base_config: a ``config.properties`` to start from.
        ports: None keeps the ports of ``base_config``; a :class:`Ports` replaces them.
        python_bin: the ``bin/`` folder whose ``torchserve`` and ``python`` to use.
    """

    def __init__(
        self,
        workdir: Path,
        model_store: Path,
        base_config: Path,
        ports: Optional[Ports] = None,
        python_bin: Optional[Path] = None,
        extra_properties: Optional[dict] = None,
    ):
        self.workdir = Path(workdir).resolve()
        self.model_store = Path(model_store).resolve()
        self.python_bin = Path(python_bin or Path(sys.executable).parent)
        self.tmp = self.workdir / "tmp"
        props = read_properties(Path(base_config))
        if ports is not None:
            props.update(
                inference_address=f"http://127.0.0.1:{ports.inference}",
                management_address=f"http://127.0.0.1:{ports.management}",
                metrics_address=f"http://127.0.0.1:{ports.metrics}",
                grpc_inference_port=str(ports.grpc_inference),
                grpc_management_port=str(ports.grpc_management),
                initial_worker_port=str(ports.first_worker),
            )
        props["model_store"] = str(self.model_store)
        # TorchServe reads paths from where it starts (our workdir): anchor them to the config's folder.
        for key in ("metrics_config",):
            if key in props and not Path(props[key]).is_absolute():
                props[key] = str((Path(base_config).resolve().parent / props[key]).resolve())
        props.update(extra_properties or {})
        self.properties = props
        self.config_path = self.workdir / "config.properties"

    # -- addresses and auth --

    @property
    def inference_url(self) -> str:
        return self.properties["inference_address"]

    @property
    def management_url(self) -> str:
        return self.properties["management_address"]

    @property
    def metrics_url(self) -> str:
        return self.properties["metrics_address"]

    def keys(self) -> dict:
        """The tokens TorchServe wrote: {'inference': ..., 'management': ...} (empty if auth is off)."""
        key_file = self.workdir / "key_file.json"
        try:
            data = json.loads(key_file.read_text())
        except (FileNotFoundError, ValueError):  # not written yet, or being written
            return {}
        return {api: data[api]["key"] for api in ("inference", "management") if api in data}

    def auth(self, api: str = "inference") -> dict:
        key = self.keys().get(api)
        return {"Authorization": f"Bearer {key}"} if key else {}

    # -- life cycle --

    def env(self) -> dict:
        env = dict(os.environ)
        env.update(TMPDIR=str(self.tmp), TEMP=str(self.tmp))
        # The archives must carry what they need: no path into this checkout.
        env.pop("PYTHONPATH", None)
        env["PATH"] = f"{self.python_bin}{os.pathsep}{env.get('PATH', '')}"
        return env

    def start(self) -> None:
        self.tmp.mkdir(parents=True, exist_ok=True)
        write_properties(self.config_path, self.properties)
        command = [
            str(self.python_bin / "torchserve"), "--start", "--ncs",
            "--ts-config", str(self.config_path), "--model-store", str(self.model_store),
        ]
        # TorchServe's own console output goes to a file; its logs are in logs/ as usual.
        with open(self.workdir / "console.log", "ab") as console:
            subprocess.run(command, cwd=self.workdir, env=self.env(), check=True, stdout=console, stderr=console)

    def stop(self) -> None:
        """Stop the TorchServe whose pid file is in this instance's temp dir (and only it)."""
        if (self.tmp / ".model_server.pid").exists():
            subprocess.run(
                [str(self.python_bin / "torchserve"), "--stop"], cwd=self.workdir, env=self.env(),
                check=False, stdout=subprocess.DEVNULL, timeout=120,
            )

    def wait_ready(self, models: Iterable[str], timeout: float = READY_TIMEOUT_S) -> None:
        """Wait until /ping answers and every model has a READY worker; raise with the log tail."""
        deadline = time.monotonic() + timeout
        pending = list(models)
        while time.monotonic() < deadline:
            pending = [m for m in pending if not self.model_ready(m)]
            if not pending:
                return
            time.sleep(0.5)  # polling a separate process's HTTP API: nothing to wait on instead
        raise RuntimeError(f"TorchServe models not ready after {timeout:.0f} s: {pending}\n{self.log_tail()}")

    def model_ready(self, model: str) -> bool:
        try:
            status, body = self.get(f"{self.management_url}/models/{model}", api="management")
        except OSError:
            return False
        if status != 200:
            return False
        workers = json.loads(body)[0].get("workers", [])
        return any(w.get("status") == "READY" for w in workers)

    def get(self, url: str, api: str = "inference", headers: Optional[dict] = None) -> tuple:
        request = urllib.request.Request(url, headers={**self.auth(api), **(headers or {})})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def log_tail(self, lines: int = 60) -> str:
        logs = self.workdir / "logs"
        chunks = []
        for name in ("ts_log.log", "model_log.log"):
            path = logs / name
            if path.exists():
                chunks.append(f"--- {path} ---\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(chunks)

    def clean(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)
