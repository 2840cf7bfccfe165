"""Regression tests for issue 30 ("The door"), the outside review's findings on how requests
come in: each named after the bug it pins."""

import asyncio
import json

from starlette.requests import Request as StarletteRequest

from handlers.engine.admission import Admission
from handlers.servers.ray_serve import replica_class

LIMIT = 1024 * 1024
CHUNK = 64 * 1024


class Upload:
    """An ASGI ``receive`` that sends ``size`` bytes in chunks, counting what was taken; with
    ``gate``, it waits on it before the last chunk (a slow upload)."""

    def __init__(self, size: int, gate: asyncio.Event = None):
        self.size, self.taken, self.gate = size, 0, gate

    async def __call__(self):
        left = self.size - self.taken
        if self.gate is not None and left <= CHUNK:
            await self.gate.wait()
        chunk = b"x" * min(CHUNK, left)
        self.taken += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": self.taken < self.size}


def http_request(receive, content_length=None, headers=()):
    raw = [(b"content-type", b"application/json"), *headers]
    if content_length is not None:
        raw.append((b"content-length", str(content_length).encode()))
    scope = {"type": "http", "method": "POST", "path": "/predictions/m", "headers": raw, "query_string": b""}
    return StarletteRequest(scope, receive)


class FakeHandler:
    def close(self):
        pass

    def deadline_for(self, headers, arrived):
        return arrived + 1.0  # every client waits 1 s


class FakeBatches:
    """Answers each request at once with a 200."""

    async def submit(self, request):
        from handlers.core.handler import Response

        return Response(200, {}), 1


def replica(admission=None):
    """A replica of the deployment class with its handler and batches faked (no Ray, no model)."""
    cls = replica_class(1)
    made = cls.__new__(cls)
    made.model_dir = None
    made.api_key, made.max_request_bytes, made.handler = None, LIMIT, FakeHandler()
    made.admission = admission or Admission(1)
    made.batches = FakeBatches()
    return made


def test_an_oversized_upload_with_its_content_length_is_refused_before_its_body_is_read():
    upload = Upload(200 * LIMIT)
    answer = asyncio.run(replica()(http_request(upload, content_length=200 * LIMIT)))
    assert answer.status_code == 413 and upload.taken == 0
    error = json.loads(answer.body)
    assert error["type"] == "PayloadTooLarge" and f"{LIMIT:,}" in error["message"]


def test_an_oversized_upload_without_content_length_or_lying_is_not_read_past_the_limit():
    for declared in (None, 100):
        upload = Upload(20 * LIMIT)
        answer = asyncio.run(replica()(http_request(upload, content_length=declared)))
        assert answer.status_code == 413, declared
        assert upload.taken <= LIMIT + CHUNK, (declared, upload.taken)  # at most the chunk that passed it


def test_slow_uploads_do_not_count_for_admission_until_their_bodies_are_in():
    """30 uploads still arriving made an idle replica refuse a small request as "30 requests ahead"."""
    async def scenario():
        admission = Admission(1)
        admission.observe(answered=16, seconds=1.0)  # 16 requests/s: 30 ahead would take ~2 s of 1 s
        door, gate = replica(admission), asyncio.Event()
        slow = [asyncio.create_task(door(http_request(Upload(2 * CHUNK, gate)))) for _ in range(30)]
        await asyncio.sleep(0.05)  # every slow upload has begun
        quick = await door(http_request(Upload(10)))
        gate.set()
        answers = await asyncio.gather(*slow)
        return quick, answers

    quick, answers = asyncio.run(scenario())
    assert quick.status_code == 200, quick.body
    assert all(answer.status_code == 200 for answer in answers)
