"""Serve archiver configs on Ray Serve: the same handlers as in the ``.mar`` archives, on a private
local Ray cluster (loopback only, dashboard off), at the same URLs as TorchServe's
(``/predictions/<model_name>``).

Usage::

    python -m handlers.ray_serve [CONFIG ...] [--port 8000] [--root DIR]

or, on a Ray cluster you run yourself (``ray start``), one application per config::

    serve run handlers.ray_serve:app config=archiver_configs/quickstart.yaml --working-dir .

Ray Serve's HTTP endpoint has no authentication of its own: keep it on loopback, or put an
authenticating proxy in front (docs/ray_serve.md).
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

from ._rayserve import (ModelCannotStart, build_app, metrics_url, ray_missing, reserved_cpus, serve_configs,
                        start_local_cluster, stop_local_cluster)
from .archive import ArchiveConfigError, load_spec


def app(args: dict):
    """Application builder for ``serve run handlers.ray_serve:app config=PATH [root=DIR]``."""
    if "config" not in args:
        raise ValueError("pass config=<archiver config>, e.g. config=archiver_configs/quickstart.yaml")
    return build_app(args["config"], args.get("root"))


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m handlers.ray_serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("configs", nargs="*", type=Path, help="archiver configs (default: archiver_configs/*.yaml)")
    parser.add_argument("--root", type=Path, default=None,
                        help="where every config's paths start (default: each config's root: key, else its folder)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port on 127.0.0.1")
    parser.add_argument("--num-cpus", type=int, default=None,
                        help="logical CPUs of the node; each replica reserves one unless its ray_actor_options "
                             "say otherwise, and runs torch on that many threads (default: the cores, or what "
                             "the configs' replicas reserve, plus one)")
    args = parser.parse_args(argv)
    missing = ray_missing()
    if missing:
        print(f"error: {missing}", file=sys.stderr)
        return 1
    configs = args.configs or sorted(((args.root or Path(".")) / "archiver_configs").glob("*.yaml"))
    stop = threading.Event()
    try:  # what the replicas reserve: the local node must hold them all
        reserved = reserved_cpus([load_spec(Path(config), args.root) for config in configs])
    except ArchiveConfigError as exc:
        for line in str(exc).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return 2
    num_cpus = args.num_cpus or max(os.cpu_count() or 1, math.ceil(reserved) + 1)
    with tempfile.TemporaryDirectory(prefix="ray-", dir="/tmp") as temp_dir:
        start_local_cluster(temp_dir, args.port, num_cpus)
        # After Ray starts: its own SIGTERM handler would end this process before the clean-up.
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        try:
            names = serve_configs(configs, args.root)
            for name in names:
                print(f"{name}: curl -X POST http://127.0.0.1:{args.port}/predictions/{name} -T <input>", flush=True)
            if metrics_url():
                print(f"metrics (Prometheus): {metrics_url()}", flush=True)
            print("serving on Ray Serve; Ctrl-C stops it", flush=True)
            stop.wait()
        except ModelCannotStart as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            return 1
        except KeyboardInterrupt:
            pass
        finally:
            stop_local_cluster(temp_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
