"""The test kit's server: a handler served in this process, batch by batch, at the same
Request/Response boundary as the TorchServe and Ray Serve adapters (no HTTP, no other process).
Exported as :class:`handlers.testing.LocalServer`."""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Mapping, Optional, Sequence

from handlers.core.request import Request
from handlers.core.self_test import Sample
from handlers.engine.settings import ModelFiles


class LocalServer:
    """A handler served in this process, batch by batch: the test kit's server adapter.

    Use :meth:`start` to build one; :meth:`send` answers one batch with one
    :class:`~handlers.Response` per body (status, body, Content-Type, ``X-Batch-Size``).
    """

    BATCH_SIZE_HEADER = "X-Batch-Size"

    def __init__(self, handler):
        self.handler = handler

    @classmethod
    def start(cls, handler_class: type, model_dir: str = ".", handler_config: Optional[Mapping[str, Any]] = None,
              model_files=None, device: str = "cpu", samples: Optional[Sequence[Any]] = None) -> "LocalServer":
        """Create ``handler_class`` and start it with ``handler_config`` as its ``handler:``
        section (checked as every server checks it). ``samples``: request bodies (as
        :meth:`send` takes them) for the start-up self-test, instead of those shipped in
        ``model_dir``; a failed self-test raises ``ConfigError``."""
        if samples is not None:
            samples = [s if isinstance(s, Sample) else Sample(f"#{i}", Request(s, {})) for i, s in enumerate(samples)]
        handler = handler_class()
        handler.start(model_dir=str(model_dir), section=handler_config, device=device,
                      model_files=model_files or ModelFiles(), samples=samples)
        return cls(handler)

    def send(self, bodies: Sequence[Any], headers: Optional[Sequence[Mapping[str, str]]] = None) -> list:
        """Answer ``bodies`` as one batch; ``headers``: one mapping per body (default none)."""
        headers = list(headers) if headers is not None else [{} for _ in bodies]
        arrived = time.monotonic()
        responses, _ = self.handler.respond([Request(body, dict(h), deadline=self.handler.deadline_for(h, arrived))
                                             for body, h in zip(bodies, headers)])
        size = {self.BATCH_SIZE_HEADER: str(len(responses))}
        return [dataclasses.replace(r, headers={**r.headers, **size}) for r in responses]

    def close(self) -> None:
        self.handler.close()

    def __enter__(self) -> "LocalServer":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
