"""Start, wait for and stop one TorchServe of our own, without touching any other.

TorchServe keeps its pid file in Python's temp dir (``TMPDIR``), worker sockets in Java's
(``TEMP`` → ``-Djava.io.tmpdir``), and writes ``key_file.json`` and ``logs/`` where it starts.
An instance gets its own directory for all of them, so ``torchserve --stop`` here stops exactly
the TorchServe started here.

Waiting for the models (:meth:`TorchServe.wait_started`, :meth:`TorchServe.wait_ready`) reads
TorchServe's log as it grows: a model whose worker dies at start-up is reported within seconds
with one line saying why, instead of after ``READY_TIMEOUT_S`` (TorchServe itself keeps
restarting that worker, with backoff, and logging its traceback each time). The line is the handler's own
``microbatch-handlers: model <name> cannot start: <message>`` (handlers.servers.torchserve), or, when
the worker died before our code ran (the handler file does not import, a module is missing in
the worker's Python), the last error line of the worker's traceback.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

READY_TIMEOUT_S = 240
POLL_S = 0.25  # how often to look at a separate process's HTTP API and log: nothing to wait on instead
READY_LOG_GRACE_S = 1.0  # how long after a worker is READY its worker's last lines may reach the log
# After TorchServe logs a worker's death, how long its last stdout lines may still take to arrive.
DEATH_GRACE_S = 1.0
WORKER_EXIT_S = 10  # how long stopped workers may take to end before they are killed


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


class StartupFailed(RuntimeError):
    """Models whose worker died at start-up.

    Attributes:
        failures: ``{model: reason}``, the reason in one line (e.g. ``handler.precision must be
            one of float32, float16, bfloat16, got 'fp8'``).
        log: the workers' log, where their tracebacks are.
    """

    def __init__(self, failures: dict, log: Path):
        self.failures = dict(failures)
        self.log = log
        lines = [f"model {model} cannot start: {reason}" for model, reason in sorted(self.failures.items())]
        super().__init__("\n".join(lines + [f"(tracebacks in {log})"]))


# TorchServe's log: each line of a worker's output as "W-<port>-<model>_<version>-stdout MODEL_LOG - <text>";
# a worker's death as "W-<port>-<model>_<version> org.pytorch.serve.wlm.WorkerThread - Retry worker: ...".
_WORKER_OUTPUT = re.compile(r" W-\d+-(?P<model>\S+)_[^_\s]*-(?P<stream>stdout|stderr) MODEL_LOG - (?P<text>.*)$")
_WORKER_DIED = re.compile(r" W-\d+-(?P<model>\S+)_[^_\s]* org\.pytorch\.serve\.wlm\.WorkerThread - Retry worker: ")
_MARKED = re.compile(r"microbatch-handlers: model (?P<model>\S+) cannot start: (?P<reason>.+)$")  # handlers.servers.torchserve
# TorchServe's own follow-ups of a worker's real error: its re-raise of a load failure ("500 -
# Unknown exception") and its fallback lookup of a handler file that did not import.
_NOISE = re.compile(r"^RuntimeError: \d{3} - |No module named 'ts\.torch_handler\.")


class StartupWatch:
    """Reads TorchServe's log from where it stood at start and finds the models whose worker
    died at start-up, each with one line saying why."""

    def __init__(self, log: Path, from_end: bool = True):
        self.log = log
        self._offset = log.stat().st_size if from_end and log.exists() else 0
        self._partial = b""
        self._marked = {}  # model -> the reason in our own line: final as soon as logged
        self._reason = {}  # model -> the last error line of its worker's traceback
        self._deaths = {}  # model -> {TorchServe's line for each death of its worker: when it was read}
        self._in_traceback = set()  # (model, stream) inside a traceback

    def failures(self, models: Iterable[str]) -> dict:
        """``{model: reason}`` for those of ``models`` whose worker has died at start-up so far."""
        self._read()
        now = time.monotonic()
        failed = {}
        for model in models:
            deaths = sorted(self._deaths.get(model, {}).values())
            if model in self._marked:
                failed[model] = self._marked[model]
            elif deaths and model in self._reason and now - deaths[0] >= DEATH_GRACE_S:
                failed[model] = self._reason[model]
            elif len(deaths) >= 2 and now - deaths[0] >= DEATH_GRACE_S:
                # No error line: killed, or past TorchServe's startupTimeout. Once may be load on
                # the machine: it gets the retry TorchServe gives it.
                failed[model] = f"its worker stopped twice during start-up without an error line (see {self.log})"
        return failed

    def stays_up(self, model: str) -> bool:
        """Whether ``model``'s failure came with our own line: its worker stays up and answers
        every request with a 503 carrying that line (handlers.servers.torchserve.initialize),
        rather than dying and being restarted by TorchServe."""
        return model in self._marked

    def _read(self) -> None:
        try:
            with open(self.log, "rb") as f:
                if f.seek(0, os.SEEK_END) < self._offset:  # a new log (rolled over): read it whole
                    self._offset, self._partial = 0, b""
                f.seek(self._offset)
                chunk = f.read()
        except FileNotFoundError:
            return
        self._offset += len(chunk)
        *lines, self._partial = (self._partial + chunk).split(b"\n")
        for line in lines:
            self._line(line.decode("utf-8", errors="replace").rstrip("\r"))

    def _line(self, line: str) -> None:
        output = _WORKER_OUTPUT.search(line)
        if output is None:
            died = _WORKER_DIED.search(line)
            if died is not None:  # TorchServe logs each line twice: keyed by the line, each counts once
                self._deaths.setdefault(died["model"], {}).setdefault(line, time.monotonic())
            return
        model, text, key = output["model"], output["text"], (output["model"], output["stream"])
        marked = _MARKED.search(text)
        if marked is not None:
            self._marked.setdefault(marked["model"], marked["reason"])
        elif text.startswith("Traceback (most recent call last):"):
            self._in_traceback.add(key)
        elif key in self._in_traceback and not text.startswith(" "):  # the error, after the frames
            self._in_traceback.discard(key)
            if text.strip() and not _NOISE.search(text):
                self._reason[model] = text.strip()


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
        self._watch: Optional[StartupWatch] = None

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
        self._watch = StartupWatch(self.log_path)  # this start's lines only, not an earlier run's
        command = [
            str(self.python_bin / "torchserve"), "--start", "--ncs",
            "--ts-config", str(self.config_path), "--model-store", str(self.model_store),
        ]
        # TorchServe's own console output goes to a file; its logs are in logs/ as usual.
        with open(self.workdir / "console.log", "ab") as console:
            subprocess.run(command, cwd=self.workdir, env=self.env(), check=True, stdout=console, stderr=console)

    def stop(self) -> None:
        """Stop the TorchServe whose pid file is in this instance's temp dir (and only it), and
        wait until it and its workers have ended."""
        if (self.tmp / ".model_server.pid").exists():
            subprocess.run(
                [str(self.python_bin / "torchserve"), "--stop", "--foreground"], cwd=self.workdir, env=self.env(),
                check=False, stdout=subprocess.DEVNULL, timeout=120,
            )
        # TorchServe's frontend ends its workers as it goes, but may end before they have.
        deadline = time.monotonic() + WORKER_EXIT_S
        while self.processes() and time.monotonic() < deadline:
            time.sleep(POLL_S)  # processes we did not start as children: nothing to wait on
        for pid in self.processes():  # a worker whose frontend is gone serves no one
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass

    def processes(self) -> list:
        """Pids of the processes of this instance: its Java frontend (``-Djava.io.tmpdir=`` its
        temp dir) and its workers (a socket in that dir). Linux only; [] elsewhere."""
        frontend, worker = f"-Djava.io.tmpdir={self.tmp}", f"{self.tmp}{os.sep}.ts.sock."
        found = []
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                args = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
            except OSError:  # ended meanwhile, or not ours to read
                continue
            if frontend in args or any(arg.startswith(worker) for arg in args):
                found.append(int(proc.name))
        return found

    def pid(self) -> Optional[int]:
        """The pid of this instance's TorchServe (its Java frontend), or None when not started."""
        try:
            return int((self.tmp / ".model_server.pid").read_text().split()[0])
        except (FileNotFoundError, ValueError, IndexError):
            return None

    def running(self) -> bool:
        pid = self.pid()
        if pid is None:
            return False
        try:
            os.kill(pid, 0)
        except (ProcessLookupError, PermissionError):  # gone (PermissionError: the pid is another user's now)
            return False
        return True

    @property
    def log_path(self) -> Path:
        """TorchServe's log: its own lines and every worker's output."""
        return self.workdir / "logs" / "ts_log.log"

    @property
    def model_log_path(self) -> Path:
        """The workers' output alone (their tracebacks)."""
        return self.workdir / "logs" / "model_log.log"

    def wait_started(self, models: Iterable[str], timeout: float = READY_TIMEOUT_S,
                     on_failure: Optional[Callable[[str, str], None]] = None) -> dict:
        """Wait until every model has a READY worker or a worker that died at start-up; return
        ``{model: reason}`` for the latter (empty when all are ready). ``on_failure(model,
        reason)`` is called as each is found, before the others are ready. Raises RuntimeError,
        with the log's tail, when TorchServe exits or a model is neither after ``timeout``."""
        if self._watch is None:  # started elsewhere: its whole log
            self._watch = StartupWatch(self.log_path, from_end=False)
        watch = self._watch
        deadline = time.monotonic() + timeout
        pending, failed = list(models), {}
        while True:
            for model, reason in watch.failures(pending).items():
                failed[model] = reason
                if on_failure is not None:
                    on_failure(model, reason)
            ready = [m for m in pending if m not in failed and self.model_ready(m)]
            if ready:
                # A worker that cannot start stays up: READY just after logging its line, which
                # TorchServe writes from another thread. The log is read again after READY is seen.
                time.sleep(READY_LOG_GRACE_S)
                for model, reason in watch.failures(ready).items():
                    failed[model] = reason
                    if on_failure is not None:
                        on_failure(model, reason)
            pending = [m for m in pending if m not in failed and m not in ready]
            if not pending:
                return failed
            if not self.running():
                raise RuntimeError(f"TorchServe exited while starting {pending}\n{self.log_tail()}")
            if time.monotonic() >= deadline:
                raise RuntimeError(f"TorchServe models not ready after {timeout:.0f} s: {pending}\n{self.log_tail()}")
            time.sleep(POLL_S)  # polling a separate process's HTTP API and log: nothing to wait on instead

    def wait_ready(self, models: Iterable[str], timeout: float = READY_TIMEOUT_S) -> None:
        """Wait until /ping answers and every model has a READY worker. Raises
        :class:`StartupFailed` (one line per model) as soon as every model is ready or failed
        and some failed; RuntimeError with the log tail as :meth:`wait_started` does."""
        failed = self.wait_started(models, timeout)
        if failed:
            raise StartupFailed(failed, self.model_log_path)

    def worker_stays_up(self, model: str) -> bool:
        """Whether a model reported by :meth:`wait_started` keeps a worker that answers its
        requests with a 503 and the reason (see :meth:`StartupWatch.stays_up`)."""
        return self._watch is not None and self._watch.stays_up(model)

    def stop_model(self, model: str) -> None:
        """Scale ``model`` to no workers, so that TorchServe stops restarting a worker that cannot
        start (and filling its log). Its requests then get 503. Allowed with
        ``enable_model_api=false``, unlike unregistering."""
        status, body = self.get(f"{self.management_url}/models/{model}?min_worker=0&max_worker=0", api="management",
                                method="PUT")
        if status >= 300:
            raise RuntimeError(f"could not stop {model}'s workers: {status} {body[:200]!r}")

    def model_ready(self, model: str) -> bool:
        try:
            status, body = self.get(f"{self.management_url}/models/{model}", api="management")
        except OSError:
            return False
        if status != 200:
            return False
        workers = json.loads(body)[0].get("workers", [])
        return any(w.get("status") == "READY" for w in workers)

    def get(self, url: str, api: str = "inference", headers: Optional[dict] = None, method: str = "GET") -> tuple:
        """``(status, body)`` of ``url``, with this instance's token for ``api``."""
        request = urllib.request.Request(url, method=method, headers={**self.auth(api), **(headers or {})})
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
