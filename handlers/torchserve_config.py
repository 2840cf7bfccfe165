"""Print a TorchServe ``config.properties`` with this project's safe defaults, pointing
``metrics_config`` at the ``metrics.yaml`` installed with the package (so the handlers' metrics
reach Prometheus without copying files from the repository).

Usage::

    python -m handlers.torchserve_config > config.properties
    torchserve --start --ncs --ts-config config.properties --model-store model_store --models my_model.mar
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

METRICS_YAML = Path(__file__).resolve().parent / "metrics.yaml"


def torchserve_properties(port: int = 8080) -> dict:
    """Loopback addresses (inference ``port``, management ``port + 1``, metrics ``port + 2``),
    token authorisation on, no model registration over the API, bounded requests and queue,
    Prometheus metrics including the handlers'."""
    return {
        "inference_address": f"http://127.0.0.1:{port}",
        "management_address": f"http://127.0.0.1:{port + 1}",
        "metrics_address": f"http://127.0.0.1:{port + 2}",
        "grpc_inference_address": "127.0.0.1",
        "grpc_management_address": "127.0.0.1",
        "enable_model_api": "false",
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
    parser.add_argument("--port", type=int, default=8080,
                        help="inference port; management is the next one, metrics the one after (default 8080)")
    args = parser.parse_args(argv)
    sys.stdout.write("".join(f"{key}={value}\n" for key, value in torchserve_properties(args.port).items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
