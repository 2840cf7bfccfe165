"""Test kit: a local server adapter, a fake TorchServe context, and checks of the batch contract,
for unit tests of handlers with pytest and no server.

:class:`LocalServer` is one more implementation of the project's own server boundary (requests
in, :class:`~handlers.Response` out), beside the TorchServe and Ray Serve adapters: it runs the
handler core in this process. :class:`FakeContext` stands in for TorchServe's context, to test the
TorchServe adapter's behaviour (statuses, headers, metrics) without Java.

Example::

    from handlers.testing import LocalServer

    def test_my_handler_answers_each_request():
        with LocalServer.start(MyHandler, handler_config={"micro_batch_size": 4}) as server:
            responses = server.send([{"x": [1, 2]}, b"not json"])
        assert [r.status for r in responses] == [200, 400]

or, through the TorchServe adapter::

    from handlers.testing import FakeContext, start_handler, assert_isolates_bad_request

    def test_my_handler_answers_in_order():
        handler = start_handler(MyHandler, model_dir=tmp_path, handler_config={"micro_batch_size": 4})
        context = FakeContext.for_batch(3)
        responses = handler.handle([{"body": b"[1, 2]"}] * 3, context)  # each answer's bytes
        assert context.statuses() == [200, 200, 200]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

from handlers.servers.local import LocalServer

__all__ = [
    "LocalServer",
    "FakeContext",
    "FakeMetrics",
    "RecordedMetric",
    "start_handler",
    "start_archived_handler",
    "run_batch",
    "as_client_reads",
    "assert_batch_contract",
    "assert_matches_alone",
    "assert_isolates_bad_request",
]


@dataclass
class RecordedMetric:
    """One metric a handler reported: name, value, unit, dimension values and kind."""

    name: str
    value: float
    unit: str
    dimensions: dict
    kind: str


class FakeMetrics:
    """Records what a handler reports through ``context.metrics`` (TorchServe's metric cache API)."""

    def __init__(self):
        self.records: list[RecordedMetric] = []

    def add_metric(self, name, value, unit, idx=None, dimensions=None, metric_type=None):
        self._record(name, value, unit, dimensions, metric_type or "COUNTER")

    def add_counter(self, name, value, idx=None, dimensions=None):
        self._record(name, value, "count", dimensions, "COUNTER")

    def add_time(self, name, value, idx=None, unit="ms", dimensions=None, metric_type=None):
        self._record(name, value, unit, dimensions, metric_type or "GAUGE")

    def add_size(self, name, value, idx=None, unit="MB", dimensions=None, metric_type=None):
        self._record(name, value, unit, dimensions, metric_type or "GAUGE")

    def add_percent(self, name, value, idx=None, dimensions=None, metric_type=None):
        self._record(name, value, "percent", dimensions, metric_type or "GAUGE")

    def named(self, name: str) -> list[RecordedMetric]:
        """Every record of the metric called ``name``, oldest first."""
        return [record for record in self.records if record.name == name]

    def _record(self, name, value, unit, dimensions, kind):
        dims = {getattr(d, "name", str(d)): getattr(d, "value", d) for d in (dimensions or [])}
        self.records.append(RecordedMetric(name, value, unit, dims, getattr(kind, "name", str(kind))))


class FakeContext:
    """Stands in for ``ts.context.Context``: what a handler reads (manifest, system properties,
    model config, request headers) and what it writes (per-request status, headers, metrics).

    Args:
        model_yaml_config: the model config; its ``handler:`` section holds handler settings.
        system_properties: e.g. ``{"model_dir": ..., "gpu_id": None, "batch_size": 8}``.
        manifest: the archive manifest, e.g. ``{"model": {"serializedFile": "model.pt"}}``.
        request_headers: one header mapping per request of the batch.
    """

    def __init__(
        self,
        model_yaml_config: Optional[Mapping[str, Any]] = None,
        system_properties: Optional[Mapping[str, Any]] = None,
        manifest: Optional[Mapping[str, Any]] = None,
        request_headers: Sequence[Mapping[str, str]] = (),
        model_name: str = "test_model",
    ):
        self.model_name = model_name
        self.model_yaml_config = dict(model_yaml_config or {})
        self.manifest = dict(manifest or {"model": {"modelName": model_name}})
        self._system_properties = {"model_dir": ".", "gpu_id": None, "batch_size": 1, "server_name": "MMS"}
        self._system_properties.update(system_properties or {})
        self.metrics = FakeMetrics()
        self.request_ids = {idx: f"request-{idx}" for idx in range(len(request_headers))}
        self._request_headers = [dict(h) for h in request_headers]
        self._statuses: dict[int, tuple[int, str]] = {}
        self._response_headers: dict[int, dict] = {}

    @classmethod
    def for_batch(cls, size: int, headers: Optional[Mapping[str, str]] = None, **kwargs) -> "FakeContext":
        """A context for a batch of ``size`` requests that all carry ``headers``."""
        return cls(request_headers=[dict(headers or {}) for _ in range(size)], **kwargs)

    @property
    def system_properties(self) -> dict:
        return self._system_properties

    @property
    def request_processor(self) -> list:
        """One entry per request of the batch, as TorchServe's context has."""
        return [{"headers": headers} for headers in self._request_headers]

    # -- what a handler reads --

    def get_request_id(self, idx: int = 0) -> Optional[str]:
        return self.request_ids.get(idx)

    def get_request_header(self, idx: int, key: str) -> Optional[str]:
        return self._request_headers[idx].get(key) if idx < len(self._request_headers) else None

    def get_all_request_header(self, idx: int) -> dict:
        return dict(self._request_headers[idx]) if idx < len(self._request_headers) else {}

    # -- what a handler writes --

    def set_response_status(self, code: int = 200, phrase: str = "", idx: int = 0) -> None:
        self._statuses[idx] = (code, phrase)

    def get_response_status(self, idx: int) -> tuple[int, str]:
        return self._statuses.get(idx, (200, None))

    def set_response_header(self, idx: int, key: str, value: str) -> None:
        self._response_headers.setdefault(idx, {})[key] = value

    def get_response_headers(self, idx: int) -> dict:
        return dict(self._response_headers.get(idx, {}))

    def set_response_content_type(self, idx: int, value: str) -> None:
        self.set_response_header(idx, "content-type", value)

    def get_response_content_type(self, idx: int) -> Optional[str]:
        return self.get_response_headers(idx).get("content-type")

    def statuses(self, count: Optional[int] = None) -> list[int]:
        """The status code of each request of the batch (200 where none was set)."""
        count = len(self._request_headers) if count is None else count
        return [self.get_response_status(idx)[0] for idx in range(count)]


def start_handler(
    handler_class: type,
    model_dir: str = ".",
    handler_config: Optional[Mapping[str, Any]] = None,
    model_config: Optional[Mapping[str, Any]] = None,
    manifest: Optional[Mapping[str, Any]] = None,
    model_file: Optional[str] = None,
    serialized_file: Optional[str] = None,
    **system_properties,
):
    """Create and initialize a handler as TorchServe would, with ``handler_config`` as the
    ``handler:`` section of its model config and ``model_file``/``serialized_file`` (in
    ``model_dir``) as its archive's ``--model-file``/``--serialized-file``. Remember to
    ``close()`` it."""
    if manifest is None and (model_file or serialized_file):
        manifest = {"model": {"modelName": "model", "modelFile": model_file, "serializedFile": serialized_file}}
    config = dict(model_config or {})
    if handler_config is not None:
        config["handler"] = dict(handler_config)
    context = FakeContext(
        model_yaml_config=config,
        system_properties={"model_dir": str(model_dir), **system_properties},
        manifest=manifest,
    )
    handler = handler_class()
    handler.initialize(context)
    return handler


def as_torchserve_delivers(body: Any, content_type: Optional[str]) -> Any:
    """A body as TorchServe's worker hands it to a handler (see ``handlers.core.request.decoded_body``)."""
    from handlers.core.request import decoded_body

    return decoded_body(body, content_type)


def as_client_reads(payload: Any, content_type: Optional[str]) -> Any:
    """An answer's bytes as a client reads them: JSON decoded, text as ``str``, binary as bytes.
    (The TorchServe adapter returns each answer encoded, as it goes out; a KServe envelope's
    answers are values, returned unchanged.)"""
    import json

    if not isinstance(payload, (bytes, bytearray)) or not content_type:
        return payload
    if content_type.startswith("application/json"):
        return json.loads(payload)
    if content_type.startswith("text/"):
        return bytes(payload).decode("utf-8")
    return payload


def run_batch(handler, bodies: Sequence[Any], headers: Optional[Sequence[Mapping[str, str]]] = None):
    """Send ``bodies`` as one TorchServe batch; returns ``(responses, context)``, each response
    as a client reads it (:func:`as_client_reads`). A body in bytes is decoded as TorchServe
    would for its request's ``Content-Type`` header."""
    headers = list(headers) if headers is not None else [{} for _ in bodies]
    context = FakeContext(request_headers=headers)
    rows = [
        {"body": as_torchserve_delivers(body, next((v for k, v in h.items() if k.lower() == "content-type"), None))}
        for body, h in zip(bodies, headers)
    ]
    sent = handler.handle(rows, context)
    if not isinstance(sent, list) or len(sent) != len(bodies):
        raise AssertionError(f"expected a list of {len(bodies)} responses, got {sent!r:.200}")
    responses = [as_client_reads(body, context.get_response_content_type(idx)) for idx, body in enumerate(sent)]
    assert_batch_contract(responses, context, len(bodies))
    return responses, context


def assert_batch_contract(responses: Sequence[Any], context: FakeContext, batch_size: int) -> None:
    """One response per request; every failed request has a JSON error body with its code."""
    if not isinstance(responses, list) or len(responses) != batch_size:
        raise AssertionError(f"expected a list of {batch_size} responses, got {responses!r:.200}")
    for idx, response in enumerate(responses):
        code, _ = context.get_response_status(idx)
        if code != 200:
            if not (isinstance(response, dict) and response.get("code") == code and response.get("message")):
                raise AssertionError(f"request {idx} failed with {code} but its body is {response!r:.200}")


def _within_tolerance(handler) -> Callable[[Any, Any], bool]:
    """Whether two answers agree as the start-up self-test compares them: numbers within the
    handler's ``invariance_rtol``/``invariance_atol`` (wider on a GPU in half precision or TF32),
    everything else exactly. A batch computes in other kernels than one request alone, so float
    answers may differ in their last bits (about 1e-7 in float32)."""
    from handlers.core.self_test import first_difference, tolerance

    rtol, atol = tolerance(handler)
    return lambda a, b: first_difference(a, b, rtol, atol) is None


def assert_matches_alone(
    handler,
    bodies: Sequence[Any],
    same: Optional[Callable[[Any, Any], bool]] = None,
) -> list:
    """Each request's response in one batch equals its response when sent alone (order and
    batch invariance), within the self-test's tolerance unless ``same`` says how to compare
    (``operator.eq``: exactly). Returns the batch's responses."""
    same = same or _within_tolerance(handler)
    batched, context = run_batch(handler, bodies)
    for idx, body in enumerate(bodies):
        alone, alone_context = run_batch(handler, [body])
        if context.get_response_status(idx)[0] != alone_context.get_response_status(0)[0]:
            raise AssertionError(f"request {idx}: status differs in a batch and alone")
        if not same(batched[idx], alone[0]):
            raise AssertionError(f"request {idx}: {batched[idx]!r:.200} in a batch, {alone[0]!r:.200} alone")
    return batched


def assert_isolates_bad_request(
    handler,
    good_bodies: Sequence[Any],
    bad_body: Any,
    expected_status: int,
    same: Optional[Callable[[Any, Any], bool]] = None,
) -> dict:
    """A bad request in every position among good ones gets ``expected_status`` and a JSON error;
    the good ones get 200 and the answer they get without it, within the self-test's tolerance
    (``invariance_rtol``/``invariance_atol``) unless ``same`` says how to compare (``operator.eq``: exactly).
    Returns the bad one's error body."""
    same = same or _within_tolerance(handler)
    expected, _ = run_batch(handler, good_bodies)
    error = None
    for position in range(len(good_bodies) + 1):
        bodies = list(good_bodies)
        bodies.insert(position, bad_body)
        responses, context = run_batch(handler, bodies)
        statuses = context.statuses(len(bodies))
        wanted = [200] * len(bodies)
        wanted[position] = expected_status
        if statuses != wanted:
            raise AssertionError(f"bad request at {position}: statuses {statuses}, expected {wanted}")
        others = responses[:position] + responses[position + 1 :]
        for idx, (got, want) in enumerate(zip(others, expected)):
            if not same(got, want):
                raise AssertionError(f"good request {idx} changed next to a bad one: {got!r:.200} != {want!r:.200}")
        error = responses[position]
    return error


def start_archived_handler(mar_path, workdir, **system_properties):
    """Unpack a ``.mar`` into ``workdir`` and start its handler as a TorchServe worker would:
    the archive's own handler file, manifest and model config, with ``workdir`` as model_dir.
    Returns the initialized handler; remember to ``close()`` it."""
    import json
    import zipfile
    from pathlib import Path

    import yaml

    from handlers.core.handler_file import load_handler_class
    from handlers.engine.settings import ConfigError

    workdir = Path(workdir)
    with zipfile.ZipFile(mar_path) as archive:
        archive.extractall(workdir)
    manifest = json.loads((workdir / "MAR-INF" / "MANIFEST.json").read_text())
    config_file = manifest["model"].get("configFile")
    model_config = yaml.safe_load((workdir / config_file).read_text()) if config_file else {}
    try:
        handler_class = load_handler_class(str(workdir / manifest["model"]["handler"]))
    except ConfigError as exc:
        raise AssertionError(str(exc)) from None
    context = FakeContext(
        model_yaml_config=model_config,
        system_properties={"model_dir": str(workdir), **system_properties},
        manifest=manifest,
        model_name=manifest["model"]["modelName"],
    )
    handler = handler_class()
    handler.initialize(context)
    return handler
