"""Batches gathered when the model is free to run them (TorchServe's rule), for a server whose
requests arrive on an asyncio event loop (a Ray Serve replica). Plain asyncio, no server.

Ray Serve's ``@serve.batch`` closes a batch ``batch_wait_timeout_s`` after its first request even
while the previous batch still runs, and the closed batch then waits its turn with the requests it
has: at 32 clients and batches of 16 (bench/results/ray_vs_torchserve.md) its batches held 10-11.5
requests on average where TorchServe's held 16. Here a batch is gathered only once one of the
``concurrent_batches`` slots is free: everything that queued meanwhile, up to ``max_batch_size``;
when fewer are waiting, it waits up to ``max_wait_s`` for more, as a free TorchServe worker does.
A request whose caller has gone (its ``submit`` cancelled) before its batch is gathered costs no
model time.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any, Awaitable, Callable, Optional


class BatchQueue:
    """Requests in, one result each out, in batches of at most ``max_batch_size``.

    ``run_batch(items)`` is awaited with each batch and returns one result per item, in order;
    an exception it raises (or a wrong number of results) goes to every request of that batch,
    and only to them. Create and use it on one event loop; :meth:`configure` changes the settings
    between batches.
    """

    def __init__(self, run_batch: Callable[[list], Awaitable[list]], max_batch_size: int, max_wait_s: float,
                 concurrent_batches: int = 1):
        if concurrent_batches < 1:
            raise ValueError(f"BatchQueue needs concurrent_batches >= 1, got {concurrent_batches}")
        self.configure(max_batch_size, max_wait_s)
        self._run_batch = run_batch
        self._concurrent_batches = concurrent_batches
        self._waiting: deque = deque()  # (item, future), oldest first
        self._arrived: Optional[asyncio.Event] = None  # made on the loop, at the first request
        self._gathering: Optional[asyncio.Lock] = None  # one free slot gathers at a time
        self._slots: list = []

    def configure(self, max_batch_size: int, max_wait_s: float) -> None:
        """The batch settings, from the next batch on (a redeployment's new ``user_config``).
        Checked: a batch size of 0 would gather empty batches without end."""
        if max_batch_size < 1 or max_wait_s < 0:
            raise ValueError(f"BatchQueue needs max_batch_size >= 1 and max_wait_s >= 0, "
                             f"got {max_batch_size} and {max_wait_s}")
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s

    async def submit(self, item: Any) -> Any:
        """The result of ``item``'s batch for it; cancelling the caller takes it out of the queue."""
        if not self._slots:
            self._start()
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        self._arrived.set()
        return await future

    def close(self) -> None:
        """Stop gathering batches; requests still queued get CancelledError. Idempotent."""
        for slot in self._slots:
            slot.cancel()
        self._slots = []
        while self._waiting:
            _, future = self._waiting.popleft()
            future.cancel()

    def _start(self) -> None:
        self._arrived = asyncio.Event()
        self._gathering = asyncio.Lock()
        self._slots = [asyncio.create_task(self._serve(), name=f"batch-slot-{n}")
                       for n in range(self._concurrent_batches)]

    async def _serve(self) -> None:
        while True:
            async with self._gathering:
                batch = await self._gather()
            await self._answer(batch)

    async def _gather(self) -> list:
        """The next batch: waits for a live request, then up to ``max_wait_s`` for a full batch."""
        loop = asyncio.get_running_loop()
        while not self._drop_cancelled():
            self._arrived.clear()
            await self._arrived.wait()
        closes_at = loop.time() + self.max_wait_s
        while self._drop_cancelled() < self.max_batch_size:
            remaining = closes_at - loop.time()
            if remaining <= 0:
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except asyncio.TimeoutError:
                break
        size = min(self.max_batch_size, self._drop_cancelled())
        return [self._waiting.popleft() for _ in range(size)]

    def _drop_cancelled(self) -> int:
        """Forgets the requests whose callers have gone; returns how many wait."""
        if any(future.done() for _, future in self._waiting):
            self._waiting = deque(entry for entry in self._waiting if not entry[1].done())
        return len(self._waiting)

    async def _answer(self, batch: list) -> None:
        try:
            results = await self._run_batch([item for item, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"a batch of {len(batch)} requests got {len(results)} results")
        except asyncio.CancelledError:
            for _, future in batch:
                future.cancel()
            raise
        except Exception as exc:  # noqa: BLE001 - delivered to each request of this batch, and only to them
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), result in zip(batch, results):
            if not future.done():  # its caller may have gone while the batch ran
                future.set_result(result)
