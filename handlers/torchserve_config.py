"""Print a TorchServe ``config.properties`` with this project's safe defaults, pointing
``metrics_config`` at the ``metrics.yaml`` installed with the package (so the handlers' metrics
reach Prometheus without copying files from the repository).

Usage::

    python -m handlers.torchserve_config > config.properties
    torchserve --start --ncs --ts-config config.properties --model-store model_store --models my_model.mar

Every port TorchServe opens, and the numbers its worker sockets are named after, come from
``--port``: the defaults are this repository's ``config.properties`` (HTTP 8080-8082, gRPC
7070-7071, workers from 9500), and another ``--port`` moves them all by the same amount, so
``--port 8180`` gives HTTP 8180-8182, gRPC 7170-7171 and workers from 9600: a second TorchServe
on the same machine (docs/operating.md says what else it needs: its own ``TMPDIR``, ``TEMP`` and
folder).
``--grpc-port`` and ``--worker-port`` set those two apart from ``--port``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

METRICS_YAML = Path(__file__).resolve().parent / "metrics.yaml"

DEFAULT_PORT = 8080
# Where the gRPC ports and the worker sockets sit when the inference port is DEFAULT_PORT: this
# repository's config.properties (gRPC: TorchServe's own defaults; workers: clear of TorchServe's
# default 9000, which any other TorchServe on the machine uses).
DEFAULT_GRPC_PORT = 7070
DEFAULT_WORKER_PORT = 9500


def torchserve_ports(port: int = DEFAULT_PORT, grpc_port: Optional[int] = None,
                     worker_port: Optional[int] = None) -> dict:
    """Every port of one TorchServe, ``{name: number}``, checked.

    Args:
        port: the inference port; management is ``port + 1``, metrics ``port + 2``.
        grpc_port: the gRPC inference port; gRPC management is the next one. None: moved from
            7070 by as much as ``port`` is from 8080.
        worker_port: the first worker's number; TorchServe names its workers' sockets
            ``<java temp dir>/.ts.sock.<number>``, counting up by one per worker. None: moved
            from 9500 by as much as ``port`` is from 8080.

    Raises:
        ValueError: a port outside 1-65535, or two of them equal (the message names both).
    """
    shift = port - DEFAULT_PORT
    grpc = DEFAULT_GRPC_PORT + shift if grpc_port is None else grpc_port
    worker = DEFAULT_WORKER_PORT + shift if worker_port is None else worker_port
    # name: (number, how to move it)
    grpc_fix = "choose another --grpc-port" if grpc_port is not None else "give --grpc-port, or another --port"
    worker_fix = "choose another --worker-port" if worker_port is not None else "give --worker-port, or another --port"
    ports = {
        "inference": (port, "choose another --port"),
        "management": (port + 1, "choose another --port"),
        "metrics": (port + 2, "choose another --port"),
        "gRPC inference": (grpc, grpc_fix),
        "gRPC management": (grpc + 1, grpc_fix),
        "first worker": (worker, worker_fix),
    }
    seen = {}
    for name, (number, fix) in ports.items():
        if not 1 <= number <= 65535:
            raise ValueError(f"the {name} port must be within 1-65535, got {number}: {fix}")
        if number in seen:
            raise ValueError(f"the {name} port and the {seen[number]} port are both {number}: {fix}")
        seen[number] = name
    return {name: number for name, (number, _) in ports.items()}


def torchserve_properties(port: int = DEFAULT_PORT, grpc_port: Optional[int] = None,
                          worker_port: Optional[int] = None) -> dict:
    """Loopback addresses on the ports of :func:`torchserve_ports` (inference ``port``,
    management ``port + 1``, metrics ``port + 2``, gRPC, the worker sockets' first number), token
    authorisation on, no model registration over the API, bodies decoded by the handler (on
    its pool, not the worker's main thread), bounded requests and queue, Prometheus metrics
    including the handlers'.

    Example: ``torchserve_properties(8180)["grpc_inference_port"] == "7170"``.

    Raises:
        ValueError: as :func:`torchserve_ports`.
    """
    ports = torchserve_ports(port, grpc_port, worker_port)
    return {
        "inference_address": f"http://127.0.0.1:{ports['inference']}",
        "management_address": f"http://127.0.0.1:{ports['management']}",
        "metrics_address": f"http://127.0.0.1:{ports['metrics']}",
        "grpc_inference_address": "127.0.0.1",
        "grpc_management_address": "127.0.0.1",
        "grpc_inference_port": str(ports["gRPC inference"]),
        "grpc_management_port": str(ports["gRPC management"]),
        "initial_worker_port": str(ports["first worker"]),
        "enable_model_api": "false",
        # The handler decodes JSON and text on its pool, not the worker's main thread.
        "decode_input_request": "false",
        "disable_token_authorization": "false",
        "max_request_size": "16777216",
        "max_response_size": "16777216",
        "job_queue_size": "64",  # why 64: docs/queueing.md
        "install_py_dep_per_model": "false",
        "metrics_mode": "prometheus",
        "metrics_config": str(METRICS_YAML),
    }


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m handlers.torchserve_config", description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help="inference port; management is the next one, metrics the one after; the gRPC ports and "
                             f"the worker sockets move with it (default {DEFAULT_PORT}: gRPC {DEFAULT_GRPC_PORT}-"
                             f"{DEFAULT_GRPC_PORT + 1}, workers from {DEFAULT_WORKER_PORT})")
    parser.add_argument("--grpc-port", type=int, default=None,
                        help="gRPC inference port; gRPC management is the next one (default: moved from "
                             f"{DEFAULT_GRPC_PORT} as --port is from {DEFAULT_PORT})")
    parser.add_argument("--worker-port", type=int, default=None,
                        help="first worker socket number (<java temp dir>/.ts.sock.N, one more per worker; "
                             f"default: moved from {DEFAULT_WORKER_PORT} as --port is from {DEFAULT_PORT})")
    args = parser.parse_args(argv)
    try:
        properties = torchserve_properties(args.port, args.grpc_port, args.worker_port)
    except ValueError as error:
        parser.error(str(error))
    sys.stdout.write("".join(f"{key}={value}\n" for key, value in properties.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
