"""How busy the GPU was while a benchmark ran: NVML's utilisation (the share of time one or more
kernels was running, what ``nvidia-smi`` shows), sampled on a thread and averaged."""

from __future__ import annotations

import statistics
import threading
from typing import Optional


class GpuBusy:
    """``with GpuBusy(0) as busy: ...`` then ``busy.share`` (0..1), or None without NVML.

    NVML averages over its own sample period (up to a second), so measure for several seconds.
    """

    def __init__(self, index: int = 0, every_s: float = 0.05):
        self.index = index
        self.every_s = every_s
        self.samples: list = []
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._handle = None

    def __enter__(self) -> "GpuBusy":
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(self.index)
        except Exception:  # noqa: BLE001 - no NVML (no GPU, or no pynvml): report None
            return self
        self._thread = threading.Thread(target=self._sample, name="gpu-busy", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    @property
    def share(self) -> Optional[float]:
        return statistics.mean(self.samples) / 100 if self.samples else None

    def _sample(self) -> None:
        import pynvml

        while not self._stop.wait(self.every_s):
            self.samples.append(pynvml.nvmlDeviceGetUtilizationRates(self._handle).gpu)
