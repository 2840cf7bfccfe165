"""A stand-in for TorchServe's ``ts.context.Context`` where TorchServe is not the server (a Ray
Serve replica): what a TorchServe handler's ``initialize(context)`` and hooks read (model name,
manifest, system properties, model config, request headers, metrics). Built from the model folder,
its manifest and its model config; TorchServe itself is not imported.

On Ray Serve the engine answers each request itself, so the per-request parts of the contract
(headers, statuses) are those of no request: a header read through the context is None, a status
set through it is dropped (read per-request data from the row, as docs/from_torchserve.md says).
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Optional

log = logging.getLogger(__name__)

SERVER_NAME = "MMS"  # what TorchServe's own context says, for handlers that check it
SERVER_VERSION = "0.12.0"  # the TorchServe whose contract this stands in for


class StandInMetrics:
    """TorchServe's metric calls, accepted and logged at debug level (Ray Serve's metrics are the
    engine's own: ``handlers.servers.ray_serve._RayMetrics``)."""

    def _record(self, name: str, value: Any, *args, **kwargs) -> None:
        log.debug("handler metric %s = %s (not exported on this server)", name, value)

    add_metric = add_counter = add_time = add_size = add_percent = _record

    def get_metric(self, *args, **kwargs) -> "StandInMetrics":
        return self

    def add_or_update(self, *args, **kwargs) -> None:
        return None

    update = add_or_update


class StandInContext:
    """TorchServe's context for a model served elsewhere (see the module's docstring).

    Args:
        model_name: the manifest's ``modelName``.
        model_dir: the folder the archive's files were written to.
        manifest: the archive's ``MAR-INF/MANIFEST.json``.
        model_yaml_config: the archive's model config.
        gpu_id: the GPU this process uses, None on the CPU.
        batch_size: the model config's ``batchSize``.
    """

    def __init__(self, model_name: str, model_dir: str, manifest: Mapping[str, Any],
                 model_yaml_config: Mapping[str, Any], gpu_id: Optional[int] = None, batch_size: int = 1):
        self.model_name = model_name
        self.manifest = dict(manifest)
        self.model_yaml_config = dict(model_yaml_config)
        self._system_properties = {"model_dir": model_dir, "gpu_id": gpu_id, "batch_size": batch_size,
                                   "server_name": SERVER_NAME, "server_version": SERVER_VERSION,
                                   "limit_max_image_pixels": True}
        self.metrics = StandInMetrics()
        self.request_ids: dict = {}
        self.request_processor: list = []

    @property
    def system_properties(self) -> dict:
        return self._system_properties

    def get_request_id(self, idx: int = 0) -> Optional[str]:
        return None

    def get_request_header(self, idx: int, key: str) -> Optional[str]:
        return None

    def get_all_request_header(self, idx: int) -> dict:
        return {}

    def get_sequence_id(self, idx: int) -> Optional[str]:
        return None

    def set_response_status(self, code: int = 200, phrase: str = "", idx: int = 0) -> None:
        return None

    def set_all_response_status(self, code: int = 200, phrase: str = "") -> None:
        return None

    def get_response_status(self, idx: int) -> tuple:
        return 200, None

    def set_response_header(self, idx: int, key: str, value: str) -> None:
        return None

    def get_response_headers(self, idx: int) -> dict:
        return {}

    def set_response_content_type(self, idx: int, value: str) -> None:
        return None

    def get_response_content_type(self, idx: int) -> Optional[str]:
        return None
