"""Issue 29's suspicions, confirmed: a model step that changes its input in place (a retry then
sees another input), and a model that returns the same output buffer on every call (the next
call overwrites a part while the pool still reads it). Both gave wrong 200s on 0442939."""

from __future__ import annotations

import time

import torch

from handlers import MicroBatchHandler
from handlers.testing import LocalServer

from .models import affine_model


class DoublesItsInputInPlace(MicroBatchHandler):
    """collate doubles each item in place; 13 poisons a micro-batch, so its mates are retried."""

    def load_model(self, model_dir, device):
        return affine_model()

    def collate(self, items):
        for item in items:
            item.mul_(2)
        return torch.stack(items)

    def infer(self, batch):
        if bool((batch == 26.0).any()):
            raise RuntimeError("poison")
        return super().infer(batch)


def test_a_collate_that_changes_its_input_in_place_is_a_500_not_a_retry_on_a_changed_input():
    """On 0442939 the retry of [1, 1, 1, 1]'s half doubled it twice: 200 with 2 * 4 + 1 = 9, not 5."""
    with LocalServer.start(DoublesItsInputInPlace, handler_config={"micro_batch_size": 2}) as server:
        responses = server.send([[1.0] * 4, [13.0] * 4])
    assert [r.status for r in responses] == [500, 500]
    assert all("changed a request's preprocessed tensor in place" in r.body["message"] for r in responses)


class KeepsItsOutputBuffer(MicroBatchHandler):
    """Writes each micro-batch's answer into one buffer it keeps, and returns a view of it."""

    def load_model(self, model_dir, device):
        self.buffer = torch.zeros(8, 4)
        return affine_model()

    def infer(self, batch):
        out = self.buffer[: batch.shape[0]]
        out.copy_(self.model(batch))
        return out

    def postprocess_one(self, output, item):
        time.sleep(0.02)  # the next micro-batch's call runs meanwhile
        return output.tolist()


def test_a_model_that_reuses_its_output_buffer_gets_each_part_copied():
    rows = [[float(i)] * 4 for i in range(8)]
    with LocalServer.start(KeepsItsOutputBuffer, handler_config={"micro_batch_size": 2, "pool_size": 4}) as server:
        responses = server.send(rows)
        reused = getattr(server.handler, "_output_buffers", None)
    assert [r.body for r in responses] == [[2 * row[0] + 1] * 4 for row in rows]
    assert reused is not None and reused.reused
