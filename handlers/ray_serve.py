"""Serve archiver configs on Ray Serve: the same handlers as in the ``.mar`` archives, on a private
local Ray cluster (loopback only, dashboard off), at the same URLs as TorchServe's
(``/predictions/<model_name>``), with HAProxy in front of the replicas (``--python-proxy``: Ray's
Python proxy instead).

Usage::

    python -m handlers.ray_serve [CONFIG ...] [--port 8000] [--root DIR] [--python-proxy]

or, on a Ray cluster you run yourself (``ray start``), one application per config::

    serve run handlers.ray_serve:app config=archiver_configs/quickstart.yaml --working-dir . [api_key_file=PATH]

Token authorisation is on, as in this project's TorchServe configs: a new inference key is
written to ``./ray_serve_key.json`` (``--key-file``; removed at stop) and every request needs
``Authorization: Bearer <key>``. ``--no-token-auth`` turns it off, for a gateway that
authenticates in front (docs/ray_serve.md). Ray's own ``/-/healthz`` stays open; ``/-/routes``
(which names every model) needs the key too, behind HAProxy (Ray's Python proxy answers it itself).
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Optional

from handlers.packaging.archive import ArchiveConfigError, load_spec
from handlers.servers.ray_cluster import (NoHAProxy, PortInUse, metrics_url, set_ray_environment,
                                          start_local_cluster, stop_local_cluster)
from handlers.servers.ray_serve import (ModelCannotStart, build_app, ray_missing, reserved_cpus, serve_specs,
                                       startup_failures)


def app(args: dict):
    """Application builder for ``serve run handlers.ray_serve:app config=PATH [root=DIR]
    [api_key_file=PATH]``: with an inference key, requests need ``Authorization: Bearer KEY``.
    The key comes from ``api_key_file`` (the key alone, or the JSON key file this command writes),
    else from the :data:`API_KEY_ENV` environment variable; ``api_key=KEY`` still works, with a
    warning: the command line is shown by ``ps`` to every user of the machine."""
    if "config" not in args:
        raise ValueError("pass config=<archiver config>, e.g. config=archiver_configs/quickstart.yaml")
    return build_app(args["config"], args.get("root"), api_key_of(args))


API_KEY_ENV = "MICROBATCH_API_KEY"


def api_key_of(args: dict) -> Optional[str]:
    """The inference key ``serve run`` was given (see :func:`app`); None: token authorisation off."""
    import json
    import warnings

    if args.get("api_key_file"):
        text = Path(args["api_key_file"]).read_text().strip()
        try:
            key = json.loads(text)["inference"]["key"]  # the key file python -m handlers.ray_serve writes
        except (ValueError, KeyError, TypeError):
            key = text
        if not key:
            raise ValueError(f"api_key_file={args['api_key_file']} holds no key")
        return key
    if os.environ.get(API_KEY_ENV):
        return os.environ[API_KEY_ENV]
    if args.get("api_key"):
        warnings.warn(f"api_key=KEY puts the inference key in the command line, which ps shows to every user of "
                      f"the machine: pass api_key_file=PATH or set {API_KEY_ENV} instead", FutureWarning, stacklevel=2)
        return args["api_key"]
    return None


KEY_FILE = "ray_serve_key.json"


def write_key_file(path: Path) -> str:
    """A new inference key, written to ``path`` for this user only (as TorchServe's
    key_file.json: ``{"inference": {"key": ...}}``); returns it."""
    import json
    import secrets

    key = secrets.token_urlsafe(24)
    path.unlink(missing_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as file:
        json.dump({"inference": {"key": key}}, file)
    return key


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m handlers.ray_serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("configs", nargs="*", type=Path, help="archiver configs (default: archiver_configs/*.yaml)")
    parser.add_argument("--root", type=Path, default=None,
                        help="where every config's paths start (default: each config's root: key, else its folder)")
    parser.add_argument("--port", type=_port, default=8000,
                        help="HTTP port on 127.0.0.1 (0: a free one, picked and printed)")
    parser.add_argument("--key-file", type=Path, default=Path(KEY_FILE),
                        help=f"where the inference key is written (default: ./{KEY_FILE}); removed at stop")
    parser.add_argument("--no-token-auth", action="store_true",
                        help="serve without token authorisation (only behind a gateway that authenticates)")
    parser.add_argument("--python-proxy", action="store_true",
                        help="receive HTTP with Ray Serve's Python proxy instead of HAProxy (where HAProxy is "
                             "missing, or to compare; also the default with RAY_SERVE_ENABLE_HA_PROXY=0)")
    parser.add_argument("--num-cpus", type=int, default=None,
                        help="logical CPUs of the node; each replica reserves one unless its ray_actor_options "
                             "say otherwise, and runs torch on that many threads (default: the cores, or what "
                             "the configs' replicas reserve, plus one)")
    args = parser.parse_args(argv)
    set_ray_environment()  # before ray_missing() first imports Ray, which reads it then
    missing = ray_missing()
    if missing:
        print(f"error: {missing}", file=sys.stderr)
        return 1
    configs = args.configs or sorted(((args.root or Path(".")) / "archiver_configs").glob("*.yaml"))
    stop, serving = threading.Event(), threading.Event()
    try:  # checked once: what the replicas reserve sizes the local node, then they are served
        specs = [load_spec(Path(config), args.root) for config in configs]
    except ArchiveConfigError as exc:
        for line in str(exc).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return 2
    num_cpus = args.num_cpus or max(os.cpu_count() or 1, math.ceil(reserved_cpus(specs)) + 1)
    api_key = None if args.no_token_auth else write_key_file(args.key_file)
    auth = f"-H 'Authorization: Bearer {api_key}' " if api_key else ""
    failed = {}
    try:
        with tempfile.TemporaryDirectory(prefix="ray-", dir="/tmp") as temp_dir:
            try:
                proxy, port = start_local_cluster(temp_dir, args.port, num_cpus,
                                                  "python" if args.python_proxy else None, api_key=api_key)
            except (NoHAProxy, PortInUse) as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 1
            # After Ray starts: its own SIGTERM handler would end this process before the clean-up.
            signal.signal(signal.SIGTERM, lambda *_: _on_sigterm(stop, serving))
            try:
                names = serve_specs(specs, api_key)
                failed = startup_failures(names)
                for line in failed.values():  # each replica answers 503 with it; said once here
                    print(f"error: {line}", file=sys.stderr, flush=True)
                if len(failed) == len(names):
                    return 1
                names = [name for name in names if name not in failed]
                if api_key:
                    print(f"token authorisation on: the inference key is in {args.key_file}", flush=True)
                for name in names:
                    print(f"{name}: curl {auth}-X POST http://127.0.0.1:{port}/predictions/{name} -T <input> -w '\\n'",
                          flush=True)
                metrics = metrics_url()
                if metrics:
                    print(f"metrics (Prometheus): {metrics}", flush=True)
                ingress = {"haproxy": "HAProxy", "python": "Ray's Python proxy"}[proxy]
                if failed:
                    print(f"not serving {', '.join(failed)} (cannot start, see above; its requests get 503 "
                          f"with the reason)", flush=True)
                print(f"serving on Ray Serve at http://127.0.0.1:{port}, {ingress} in front; Ctrl-C stops it",
                      flush=True)
                serving.set()
                stop.wait()
            except ModelCannotStart as exc:
                print(f"error: {exc}", file=sys.stderr, flush=True)
                return 1
            except KeyboardInterrupt:
                pass
            finally:
                stop_local_cluster(temp_dir)
    finally:
        if api_key:
            args.key_file.unlink(missing_ok=True)  # as torchserve --stop removes its key file
    if failed:
        print(f"error: {', '.join(failed)} could not start (exit status 1)", file=sys.stderr)
        return 1
    return 0


def _port(text: str) -> int:
    """``--port``: 1-65535, or 0 for a free one (refused in one line otherwise, before anything starts)."""
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port, 1-65535, or 0 for a free one; got {text!r}")
    return port


def _on_sigterm(stop: threading.Event, serving: threading.Event) -> None:
    """SIGTERM stops as Ctrl-C does: while the models are still being deployed (``serve.run``
    waits for each), it interrupts the deployment, once (a second one does not cut the clean-up
    short); the clean-up follows either way."""
    first = not stop.is_set()
    stop.set()
    if first and not serving.is_set():
        raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
