"""A test-only handler with faults on request: the quickstart model, plus
- ``"fault": "poison"``: inference raises on any micro-batch holding this request;
- ``"fault": "slow"``: preprocessing takes 3× the batch deadline (then finishes);
- ``"fault": "hang_model"``: inference of a micro-batch holding this request hangs for a
  minute (far past the deadline): the worker answers its batch, then ends itself to be replaced;
- ``"fault": "slow_model"``: inference of a micro-batch holding this request takes a second
  longer (a busy model, for deadlines: the requests behind it wait);
- ``"fault": "device_assert"``: inference raises a CUDA device-side assert, and every later call
  in this worker raises it too (a CUDA context left broken, as an out-of-range index leaves it);
- ``"fault": "status_499"``: preprocessing raises a RequestError whose status HTTP does not name;
- ``"fault": "message_not_a_string"``: preprocessing raises ``BadRequest(exc)``;
- ``"answer_bytes": n``: the answer is a text of n bytes (past max_response_size, for instance);
- out of memory on every micro-batch larger than 2 (as a too-small GPU would).

The model answers a structure, ``(y, y.sum(dim=1))``, scattered by the default ``split``.
"""

import threading

import torch

from handlers import BadRequest, MicroBatchHandler, RequestError

POISON = 13.0
HANG = -7.0
DEVICE_ASSERT = -13.0
SLOW_MODEL = -21.0
FITS_IN_MEMORY = 2
DEVICE_ASSERT_MESSAGE = ("CUDA error: device-side assert triggered\nCUDA kernel errors might be asynchronously "
                         "reported at some other API call, so the stacktrace below might be incorrect.")
_device_broken = []  # once set, this worker's (simulated) CUDA context is unusable



class FaultyHandler(MicroBatchHandler):
    def preprocess_one(self, request):
        payload = request.json()
        if not isinstance(payload, dict) or "x" not in payload:
            raise BadRequest('expected {"id": ..., "x": [4 numbers], "fault": ...}')
        if payload.get("fault") == "status_499":
            error = RequestError("the client went away")  # one class per handler file: set on the instance
            error.status, error.kind = 499, "ClientClosedRequest"  # nginx's 499, not in http.HTTPStatus
            raise error
        if payload.get("fault") == "message_not_a_string":
            try:
                int("x")
            except ValueError as exc:
                raise BadRequest(exc) from None
        if payload.get("fault") == "slow":
            threading.Event().wait(3 * self.settings.deadline_s)  # slow, not forever
        x = torch.tensor(payload["x"], dtype=torch.float32)
        if payload.get("fault") == "poison":
            x = torch.full_like(x, POISON)
        if payload.get("fault") == "hang_model":
            x = torch.full_like(x, HANG)
        if payload.get("fault") == "device_assert":
            x = torch.full_like(x, DEVICE_ASSERT)
        if payload.get("fault") == "slow_model":
            x = torch.full_like(x, SLOW_MODEL)
        return {"id": payload.get("id"), "x": x, "answer_bytes": payload.get("answer_bytes", 0)}

    def collate(self, items):
        return super().collate([item["x"] for item in items])

    def infer(self, batch):
        if _device_broken or (batch == DEVICE_ASSERT).all(dim=1).any():
            _device_broken.append(True)
            raise RuntimeError(DEVICE_ASSERT_MESSAGE)
        if batch.shape[0] > FITS_IN_MEMORY:
            raise MemoryError(f"CUDA out of memory (simulated) on a micro-batch of {batch.shape[0]}")
        if (batch == POISON).all(dim=1).any():
            raise RuntimeError("the model cannot handle the poison value")
        if (batch == SLOW_MODEL).all(dim=1).any():
            threading.Event().wait(1.0)
        if (batch == HANG).all(dim=1).any():
            threading.Event().wait(60)  # a stuck model call (a hung kernel, a deadlock)
        y = super().infer(batch)
        return y, y.sum(dim=1)

    def postprocess_one(self, output, item):
        y, total = output
        if item["answer_bytes"]:
            return "a" * item["answer_bytes"]
        return {"id": item["id"], "y": y.tolist(), "sum": total.item()}
