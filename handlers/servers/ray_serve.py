"""The Ray Serve adapter: the same handler class, unchanged, served as a Ray Serve deployment
built from the same archiver config as its ``.mar``.

This is the one module that knows Ray Serve: batching (``batchSize`` → ``max_batch_size``,
``maxBatchDelay`` → ``batch_wait_timeout_s``, gathered by ``handlers.engine.batch_queue`` when
the model is free, as on TorchServe, rather than by ``@serve.batch``), starlette requests and
responses, replicas, autoscaling and GPUs from the config's ``ray_serve:`` section, health checks,
Ray's metrics, and a private local cluster on loopback with HAProxy in front (or Ray's Python
proxy). Ray is imported only when used.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Mapping, Optional

from handlers.core.compiled import with_pt2
from handlers.core.metrics import batch_metrics
from handlers.core.request import NO_BODY, Request
from handlers.core.responses import JSON, error_answer
from handlers.engine.admission import Admission
from handlers.engine.errors import ModelCannotStart as CannotStart
from handlers.engine.errors import PayloadTooLarge, startup_failure_line
from handlers.engine.settings import SECTION, ModelFiles
from handlers.packaging.server_sections import DEPLOYMENT_KEYS, response_timeout

log = logging.getLogger(__name__)

BATCH_SIZE_HEADER = "X-Batch-Size"
# Batches a replica runs at once, unless ray_serve.max_concurrent_batches says. Measured on 2 CPU
# cores (bench/ray_vs_torchserve.py --concurrent-batches 1 2; docs/ray_serve.md): with one model
# thread two gained nothing (photo-vga +5%/-6%, text -2%/-2%); with the model on the same cores as
# the decoding little is left to overlap. The image classifier example, two model threads, sets 2
# (+10%). One, until a measurement on a GPU says otherwise.
DEFAULT_MAX_CONCURRENT_BATCHES = 1
DEFAULT_MAX_REQUEST_BYTES = 16 * 1024 * 1024


def build_app(config: str, root: Optional[str] = None, api_key: Optional[str] = None):
    """A Ray Serve application for one archiver config (its paths start from the config's own
    folder or ``root:``, or from ``root`` when given), or for one ``.mar`` (see
    :func:`application_of_mar`). The replicas import the ``handlers`` package: installed on the
    nodes, or shipped with the job (:func:`start_local_cluster` does; ``serve run --working-dir``;
    the package of ``python -m handlers.export_ray`` carries it)."""
    from handlers.packaging.archive import load_spec
    from handlers.packaging.mar import is_mar, load_mar

    if is_mar(Path(config)):
        return application_of(load_mar(Path(config)), api_key)
    return application_of(load_spec(Path(config), Path(root) if root else None), api_key)


def application_of(spec, api_key: Optional[str] = None):
    """The application of a checked archiver config: its artefacts built if missing, its handler,
    model files and extra files shipped to each replica. With ``api_key``, a request without
    ``Authorization: Bearer <api_key>`` gets a 401."""
    from handlers.packaging.archive import build_artefacts, sample_files
    from handlers.packaging.mar import MarSpec

    if isinstance(spec, MarSpec):
        return application_of_mar(spec, api_key)
    build_artefacts(spec)
    options = spec.ray_serve  # checked with the rest of the config
    files = {spec.handler.name: spec.handler.read_bytes()}
    for path in (spec.model_file, spec.serialized_file, *spec.extra_files):
        if path is not None:
            files.update(_files_of(path))
    files.update(sample_files(spec))  # the start-up self-test's samples, as the .mar holds them
    model_files = ModelFiles(model_file=spec.model_file.name if spec.model_file else None,
                             serialized_file=spec.serialized_file.name if spec.serialized_file else None)
    return _application(spec.model_name, options, dict(spec.model_config), files, spec.handler.name, model_files,
                        api_key)


def application_of_mar(spec, api_key: Optional[str] = None):
    """The application of a ``.mar`` (:class:`handlers.packaging.mar.MarSpec`), ours or any other
    ``torch-model-archiver`` output: its files written to each replica's model folder, its
    manifest's handler served as TorchServe would load it (:mod:`handlers.servers.mar_handler`:
    ours as it is, a TorchServe ``BaseHandler`` subclass upgraded, a ``handle`` function refused),
    its model config's batching, ``responseTimeout``, ``handler:`` and ``ray_serve:`` sections."""
    from handlers.packaging.mar import model_files_of

    return _application(spec.model_name, spec.ray_serve, dict(spec.model_config), spec.files, spec.handler,
                        model_files_of(spec.manifest), api_key, spec.manifest)


def _application(name: str, options: Mapping[str, Any], model_config: dict, files: dict, handler_file: str,
                 model_files: ModelFiles, api_key: Optional[str], manifest: Optional[dict] = None):
    from ray import serve

    replica = replica_class(options.get("max_concurrent_batches", DEFAULT_MAX_CONCURRENT_BATCHES))
    deployment_options = {key: options[key] for key in DEPLOYMENT_KEYS if key in options}
    deployment_options.setdefault("max_ongoing_requests", default_max_ongoing_requests(model_config))
    deployment = serve.deployment(replica, name=name).options(
        user_config=batching_of(model_config), **deployment_options
    )
    return deployment.bind(files, handler_file, model_config, dataclasses.asdict(model_files),
                           options.get("max_request_bytes", DEFAULT_MAX_REQUEST_BYTES), api_key, manifest,
                           name if single_replica(deployment_options) else None)


def single_replica(deployment_options: Mapping[str, Any]) -> bool:
    """Whether the deployment always has exactly one replica (Ray's default): then the local
    cluster's HAProxy may refuse for it what it would refuse (``handlers.servers.haproxy_gate``;
    with several, one replica's value would refuse for all)."""
    return deployment_options.get("num_replicas", 1) == 1 and not deployment_options.get("autoscaling_config")


def default_max_ongoing_requests(model_config: Mapping[str, Any]) -> int:
    """Requests a replica holds at once, unless ``ray_serve.max_ongoing_requests`` says: sixteen
    batches (at least 256). Beyond it Ray queues a request before the replica's code sees it, so
    its time there is not counted against its deadline: under overload such requests were
    admitted and answered after their clients had gone (at 64 on the 2-core machine, 301 of
    731 answers came late). Deep enough that the replica, which sees when each request arrived,
    decides what to admit (``handlers.engine.admission``) and refuses the rest at once; a full batch is
    always forming while one runs."""
    return max(16 * int(model_config.get("batchSize", 1)), 256)


NOT_FOUND_APP = "microbatch-not-found"


def unauthorized(headers: Mapping[str, str], api_key: Optional[str]) -> Optional[dict]:
    """The 401 body for a request that lacks ``Authorization: Bearer <api_key>``; None when it
    has it, or when no key is set (token authorisation off)."""
    if not api_key:
        return None
    import hmac

    sent = next((value for key, value in headers.items() if key.lower() == "authorization"), "")
    if hmac.compare_digest(sent.encode(), f"Bearer {api_key}".encode()):  # constant time
        return None
    return {"code": 401, "type": "Unauthorized",
            "message": "token authorisation failed: send the inference key as 'Authorization: Bearer <key>' "
                       "(python -m handlers.ray_serve writes it to its key file)"}


def not_found_app(api_key: Optional[str] = None):
    """An application at ``/`` that answers what no model's route matched as TorchServe does: a
    JSON 404 (Ray Serve's own is ``text/plain``), behind the same token as the models (so that
    which models exist is not told to whoever asks). It reserves no CPU."""
    from ray import serve
    from starlette.responses import Response as HTTPResponse

    @serve.deployment(name="not_found", num_replicas=1, ray_actor_options={"num_cpus": 0})
    class NotFound:
        def __init__(self, api_key: Optional[str]):
            from handlers.servers.ray_cluster import keep_replica_grpc_on_loopback

            keep_replica_grpc_on_loopback()
            self.api_key = api_key

        async def __call__(self, http_request) -> HTTPResponse:
            refused = unauthorized(http_request.headers, self.api_key)
            path = http_request.url.path
            if path == "/ping":  # open, as TorchServe's; which models fail is told to key holders only
                failures = await asyncio.to_thread(startup_failures)
                status, body = ping_answer(failures, detailed=not refused)
                return HTTPResponse(body, status_code=status, media_type=JSON)
            if refused:
                return HTTPResponse(json.dumps(refused), status_code=401, media_type=JSON)
            return HTTPResponse(not_found_body(path), status_code=404, media_type=JSON)

    return NotFound.bind(api_key)


def not_found_body(path: str) -> bytes:
    """TorchServe 0.12's 404 body for ``path``, byte for byte (recorded from its frontend): an
    unknown model under ``/predictions/``, else an unknown resource; JSON indented by two, with
    a final newline."""
    model = path[len("/predictions/"):].split("/")[0] if path.startswith("/predictions/") else ""
    if model:
        body = {"code": 404, "type": "ModelNotFoundException", "message": f"Model not found: {model}"}
    else:
        body = {"code": 404, "type": "ResourceNotFoundException",
                "message": "Requested resource is not found, please refer to API document."}
    return (json.dumps(body, indent=2) + "\n").encode()


def ping_answer(failures: Mapping[str, str], detailed: bool = False) -> tuple[int, bytes]:
    """``/ping``'s status and body: 200 ``{"status": "Healthy"}`` as TorchServe's, or 500
    ``{"status": "Unhealthy"}`` while a model cannot start (with ``detailed``, its line per model)."""
    if not failures:
        return 200, (json.dumps({"status": "Healthy"}, indent=2) + "\n").encode()
    body = {"status": "Unhealthy", **({"models": dict(failures)} if detailed else {})}
    return 500, (json.dumps(body, indent=2) + "\n").encode()


def startup_failures(names: Optional[list] = None) -> dict:
    """``{model: line}`` for the deployed models (or ``names``) that cannot start, asked of each
    application's replica; an application Ray does not report RUNNING is named by its status."""
    from ray import serve

    applications = serve.status().applications
    failures = {}
    for name in names if names is not None else [n for n in applications if n != NOT_FOUND_APP]:
        status = getattr(applications.get(name), "status", None)
        if status != "RUNNING":
            failures[name] = f"microbatch-handlers: model {name} is not running (Ray Serve: {status})"
            continue
        try:
            line = serve.get_app_handle(name).startup_failure.remote().result(timeout_s=10)
        except Exception as exc:  # noqa: BLE001 - a replica that does not answer is not healthy
            line = f"microbatch-handlers: model {name} does not answer its health question: {type(exc).__name__}"
        if line:
            failures[name] = line
    return failures


def _serve_not_found(api_key: Optional[str]) -> None:
    from ray import serve

    if NOT_FOUND_APP not in serve.status().applications:
        serve.run(not_found_app(api_key), name=NOT_FOUND_APP, route_prefix="/")


class ModelCannotStart(RuntimeError):
    """A model's replicas cannot start; the message is the replica's one line (``microbatch-handlers:
    model <name> cannot start: <why>``)."""


def serve_configs(configs: list, root: Optional[Path] = None, api_key: Optional[str] = None) -> list:
    """Deploy each archiver config (see :func:`serve_specs`); returns the model names."""
    from handlers.packaging.archive import load_spec

    return serve_specs([load_spec(Path(config), root) for config in configs], api_key)


def serve_specs(specs: list, api_key: Optional[str] = None) -> list:
    """Deploy each checked archiver config as its own application at ``/predictions/<model_name>``
    (the URLs TorchServe uses) on the running Ray Serve, beside one at ``/`` that answers unknown
    models with TorchServe's JSON 404 and ``/ping``; returns the model names. With ``api_key``,
    every request needs ``Authorization: Bearer <api_key>`` (else a 401). A model that cannot
    start is deployed all the same: its replicas answer 503 with their one line
    (:func:`startup_failures` lists them).

    Raises:
        ModelCannotStart: Ray could not deploy a model and a replica left the one line.
    """
    from ray import serve

    names = []
    _serve_not_found(api_key)
    for spec in specs:
        try:
            serve.run(application_of(spec, api_key), name=spec.model_name, route_prefix=f"/predictions/{spec.model_name}")
        except RuntimeError as exc:
            line = _startup_failure_of(spec.model_name)
            if line is None:
                raise
            raise ModelCannotStart(line) from exc
        names.append(spec.model_name)
    return names


def _startup_failure_of(name: str) -> Optional[str]:
    """The one start-up failure line a replica of application ``name`` raised, from Ray's status."""
    from ray import serve

    from handlers.engine.errors import STARTUP_FAILURE_PREFIX

    application = serve.status().applications.get(name)
    messages = [application.message] + [d.message for d in application.deployments.values()] if application else []
    for message in messages:
        for line in reversed((message or "").splitlines()):
            if STARTUP_FAILURE_PREFIX in line:
                return line[line.index(STARTUP_FAILURE_PREFIX):]
    return None


def batching_of(model_config: Mapping[str, Any]) -> dict:
    """TorchServe's batching settings in Ray Serve's words (the deployment's ``user_config``)."""
    return {
        "max_batch_size": int(model_config.get("batchSize", 1)),
        "batch_wait_timeout_s": float(model_config.get("maxBatchDelay", 100)) / 1000.0,
    }


def _files_of(path: Path) -> dict:
    if path.is_dir():
        return {
            str(Path(path.name) / file.relative_to(path)): file.read_bytes()
            for file in sorted(path.rglob("*")) if file.is_file() and "__pycache__" not in file.parts
        }
    return {path.name: path.read_bytes()}


def replica_class(max_concurrent_batches: int) -> type:
    """The deployment class: one handler per replica, with this many batches in flight at once."""
    from starlette.requests import ClientDisconnect
    from starlette.responses import Response as HTTPResponse

    class MicroBatchReplica:
        """Holds one started handler; answers each HTTP request with its own status."""

        cannot_start: Optional[str] = None  # the one line, when the model cannot start
        gate = None  # the GatePublisher to HAProxy, where there is one

        def __init__(self, files: dict, handler_file: str, model_config: dict, model_files: dict,
                     max_request_bytes: int, api_key: Optional[str] = None, manifest: Optional[dict] = None,
                     gate_key: Optional[str] = None):
            # Absolute imports: this class travels to the replicas by value (it is made per app).
            from handlers.core.handler_file import load_handler_class
            from handlers.engine.batch_queue import BatchQueue
            from handlers.servers.mar_handler import attach_context, handler_class_for, manifest_for
            from handlers.servers.ray_cluster import keep_replica_grpc_on_loopback

            keep_replica_grpc_on_loopback()

            self.model_dir = new_model_dir()
            for name, content in files.items():
                target = Path(self.model_dir) / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(content)
            # Ray gives a replica 1 CPU unless told otherwise (and sets OMP_NUM_THREADS to it):
            # the handler sets torch's threads from the CPUs the replica reserved.
            cpus = replica_threads(_assigned_cpus(), (model_config.get(SECTION) or {}).get("torch_threads", 0))
            try:
                device, name = _device(), _deployment_name()
                if manifest is None:  # an archiver config's handler file
                    self.handler = load_handler_class(str(Path(self.model_dir) / handler_file))()
                    manifest = manifest_for(name, handler_file, model_files.get("model_file"),
                                            model_files.get("serialized_file"))
                else:  # a .mar's: found as TorchServe finds it
                    self.handler = handler_class_for(self.model_dir, manifest)()
                # An upgraded TorchServe handler's initialize(context) reads TorchServe's context.
                attach_context(self.handler, name, self.model_dir, manifest, model_config, device)
                section = with_pt2(model_config.get(SECTION), model_config.get("pt2"))  # TorchServe's pt2: too
                self.handler.start(model_dir=self.model_dir, section=section, device=device,
                                   model_files=ModelFiles(**model_files), cpus=cpus or None,
                                   # The same deadline as on TorchServe, inside the config's
                                   # responseTimeout (Ray has no such limit: it was 60 s whatever it said).
                                   server_timeout_s=response_timeout(model_config),
                                   server_timeout_name="responseTimeout")
            except Exception as exc:
                # The same one line as a TorchServe worker's (the self-test's refusal included),
                # with the traceback in the replica's log, once. The replica stays up in a
                # "cannot start" state: raising made Ray retry the replica (logging it each time)
                # while requests waited; now each gets a 503 with the line at once.
                self.cannot_start = startup_failure_line(_deployment_name(), exc)
                log.error("%s", self.cannot_start, exc_info=True)
                shutil.rmtree(self.model_dir, ignore_errors=True)
                self.handler, self.api_key, self.batches, self.gate = None, api_key, None, None
                return
            self.max_request_bytes = max_request_bytes
            self.api_key = api_key
            # The handler's engine is blocking: each batch runs on a thread, the event loop stays free.
            self.executor = ThreadPoolExecutor(max_concurrent_batches, thread_name_prefix="microbatch-ray-batch")
            # Under overload, a request that would be answered after its deadline is refused on arrival.
            self.admission = Admission(max_concurrent_batches)
            # What it refuses, HAProxy refuses before it (the local cluster, one replica only).
            from handlers.servers.haproxy_gate import gate_for

            self.gate = gate_for(self.admission, gate_key, self.handler.config.get("request_budget_s", 0.0))
            self.metrics = _RayMetrics()
            batching = batching_of(model_config)
            self.batches = BatchQueue(self.answer_batch, batching["max_batch_size"], batching["batch_wait_timeout_s"],
                                      max_concurrent_batches)

        def reconfigure(self, user_config: dict) -> None:
            if self.batches is None:  # cannot start: nothing to configure
                return
            self.batches.configure(int(user_config["max_batch_size"]), float(user_config["batch_wait_timeout_s"]))

        async def __call__(self, http_request) -> HTTPResponse:
            arrived = time.monotonic()
            refused = unauthorized(http_request.headers, self.api_key)
            if refused:  # before the body is read
                return HTTPResponse(json.dumps(refused), status_code=401, media_type=JSON)
            if self.cannot_start is not None:
                return _error_response(CannotStart(self.cannot_start))
            headers = dict(http_request.headers)
            deadline = self.handler.deadline_for(headers, arrived)
            try:
                overloaded = self.admission.refusal(deadline)
                if overloaded and not declared_too_large(http_request.headers, self.max_request_bytes):
                    # Decided before the body is read; the body is let through, not kept.
                    await drain_body(http_request, self.max_request_bytes)
                    return _error_response(overloaded)
                body = await read_body(http_request, self.max_request_bytes)
            except ClientDisconnect:  # gone while its body came in: nothing to run, nobody to answer
                return HTTPResponse(status_code=CLIENT_CLOSED)
            return await self._admitted(body, headers, deadline, http_request.receive)

        async def invoke(self, body: bytes, headers: dict) -> tuple:
            """One request handed over by another deployment (SageMaker's ``/invocations``,
            :mod:`handlers.servers.ray_sagemaker`), answered as over HTTP: ``(status, payload,
            headers)``."""
            if self.cannot_start is not None:
                response = _error_response(CannotStart(self.cannot_start))
            else:
                if len(body) > self.max_request_bytes:
                    body = PayloadTooLarge(f"the body is {len(body):,} bytes; the limit is {self.max_request_bytes:,}")
                response = await self._admitted(body, headers, self.handler.deadline_for(headers, time.monotonic()))
            kept = {key: value for key, value in response.headers.items() if key.lower() != "content-length"}
            return response.status_code, bytes(response.body), kept

        async def _admitted(self, body, headers: dict, deadline: Optional[float], receive=None) -> HTTPResponse:
            if isinstance(body, PayloadTooLarge):
                return _error_response(body)
            # Counted once its body is in: a slow upload holds no place ahead of the others (30
            # of them made an idle replica refuse every other request as "25 requests ahead").
            overloaded = self.admission.enter(deadline)
            if overloaded:
                return _error_response(overloaded)
            self._admission_changed()
            try:
                return await self._answer(body, headers, deadline, receive)
            finally:
                self.admission.leave()
                self._admission_changed()

        def _admission_changed(self) -> None:
            if self.gate is not None:
                self.gate.changed()

        async def _answer(self, body: bytes, headers: dict, deadline: Optional[float], receive=None) -> HTTPResponse:
            hung_up = threading.Event()
            if _media_type(headers) == MULTIPART:  # parsed in pure Python: off the event loop
                request = await asyncio.to_thread(request_from_http, body, headers, deadline, hung_up)
            else:
                request = request_from_http(body, headers, deadline=deadline, hung_up=hung_up)
            # Two ways to learn the client hung up: Ray cancels this coroutine (its proxy, or the
            # replica's own HTTP server behind HAProxy, on a disconnect or the request's
            # x-request-timeout-seconds), or the ASGI receive channel says http.disconnect (behind
            # HAProxy, and with x-request-disconnect-disabled, where Ray does not cancel). Either
            # way the request leaves the queue, or is skipped if its batch has not reached the model.
            # The watcher cancels this coroutine as Ray would: the queue then drops the request.
            this, state = asyncio.current_task(), {"settled": False, "gone": False}

            def on_gone(watch: asyncio.Task) -> None:
                if state["settled"] or watch.cancelled() or watch.exception() is not None or not watch.result():
                    return
                state["gone"] = True
                request.hung_up.set()
                this.cancel()

            gone = asyncio.ensure_future(client_gone(receive))
            gone.add_done_callback(on_gone)
            try:
                response, batch_size = await self.batches.submit(request)
            except asyncio.CancelledError:
                request.hung_up.set()
                if state["gone"] and this.uncancel() == 0:
                    return HTTPResponse(status_code=CLIENT_CLOSED)  # nobody reads it
                raise
            finally:
                state["settled"] = True
                gone.cancel()
            # Encoded on the handler's pool: the event loop only forwards the bytes.
            return HTTPResponse(response.payload, status_code=response.status, media_type=response.content_type,
                                headers={**response.headers, BATCH_SIZE_HEADER: str(batch_size)})

        async def answer_batch(self, requests: list) -> list:
            loop = asyncio.get_running_loop()
            started = time.monotonic()
            responses, report = await loop.run_in_executor(self.executor, self.handler.respond, requests)
            # The rate admission predicts with: requests the model answered, over the batch's time.
            # Not the 4xx and 503s (dropped unstarted, refused by a parser): answered in
            # microseconds, they read as throughput the model does not have.
            self.admission.finished(sum(1 for r in responses if r.status < 400), len(requests), started,
                                    time.monotonic())
            self._admission_changed()
            self.metrics.record(report)
            return [(response, len(requests)) for response in responses]

        def startup_failure(self) -> Optional[str]:
            """The one line saying why this replica's model cannot start; None when it serves."""
            return self.cannot_start

        def runtime(self) -> dict:
            """What this replica runs on (for operators and tests): its device, torch's threads,
            the folder its model files were written to, and what start-up compiled (None: eager)."""
            import torch

            compiled = self.handler.compiled
            return {"device": str(self.handler.device), "torch_threads": torch.get_num_threads(),
                    "model_dir": self.model_dir,
                    "compiled": None if compiled is None else {"sizes": list(compiled.sizes), "source": compiled.source}}

        def __del__(self):
            """Ray Serve calls this when it stops the replica (scaled down, replaced, deleted,
            shut down): the handler's threads end and its copy of the model files goes."""
            gate = getattr(self, "gate", None)
            if gate is not None:
                gate.close()
            handler = getattr(self, "handler", None)
            if handler is not None:
                handler.close()
            model_dir = getattr(self, "model_dir", None)
            if model_dir:
                shutil.rmtree(model_dir, ignore_errors=True)

        def check_health(self) -> None:
            """Ray replaces a replica whose health check raises: here, one whose model is stuck
            in a call past its deadline (it answers 503 meanwhile). Not one whose model cannot
            start: a replacement would fail the same way; it answers 503 with the reason, and
            ``/ping`` reports it (:func:`model_health`)."""
            if self.handler is None:
                return
            reason = self.handler.unhealthy_reason
            if reason is not None:
                raise RuntimeError(f"unhealthy: {reason}")

    return MicroBatchReplica


MODEL_DIR_PREFIX = "microbatch-ray-"


def new_model_dir() -> str:
    """A temporary folder for a replica's model files, named by its pid. A replica that is
    killed (SIGKILL, out of memory) never runs its clean-up: three kills left 96 MiB of model
    copies behind. So each new one first removes the folders of replicas whose pid is gone."""
    root = Path(tempfile.gettempdir())
    for folder in root.glob(MODEL_DIR_PREFIX + "*"):
        pid = folder.name[len(MODEL_DIR_PREFIX):].split("-")[0]
        if pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)  # another user's: not ours to remove, left
    return tempfile.mkdtemp(prefix=f"{MODEL_DIR_PREFIX}{os.getpid()}-", dir=root)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: running
        pass
    return True


def ray_missing() -> Optional[str]:
    """Why Ray Serve cannot be used from this Python, in one line; None when it can."""
    try:
        import ray.serve  # noqa: F401
    except ImportError as exc:
        return (f"Ray Serve is not installed in this Python ({exc}): install the [ray] extra, e.g. "
                f"pip install \"./microbatch-handlers[ray]\" from beside your clone")
    return None


FORM = "application/x-www-form-urlencoded"
MULTIPART = "multipart/form-data"


def request_from_http(body: bytes, headers: dict, deadline: Optional[float] = None,
                      hung_up: Optional[threading.Event] = None) -> Request:
    """One HTTP request as the handler core takes it, as TorchServe hands it over: the raw
    bytes (the handler decodes them on its pool, not on this event loop); a form (``curl -d``
    without a Content-Type, or ``curl -F data=@file``) is its fields, so the body is the bytes of
    a field named ``body`` or ``data``, else there is none (a 415 that says what to send, as on
    TorchServe)."""
    content_type = _media_type(headers)
    if content_type in (FORM, MULTIPART):
        fields = _form_fields(body) if content_type == FORM else _multipart_fields(body, headers)
        body = next((fields[key] for key in ("body", "data") if key in fields), NO_BODY)
    return Request(body, headers, _request_id(headers), deadline=deadline, hung_up=hung_up)


# nginx's code for "the client closed the request": logged, never read by anyone.
CLIENT_CLOSED = 499


async def client_gone(receive) -> bool:
    """True when the ASGI ``receive`` channel says ``http.disconnect`` (the body is already read:
    nothing else should come); False at once for a channel that cannot tell (None, or one that
    sends anything else). On Ray's Python proxy path the channel never says it (the replica is
    cancelled instead) and this waits until cancelled."""
    return receive is not None and (await receive()).get("type") == "http.disconnect"


async def read_body(http_request, limit: int):
    """The body of a starlette request, or the :class:`PayloadTooLarge` for one over ``limit``
    bytes: refused from its Content-Length before anything is read, else read as it streams in
    and given up as soon as it passes the limit (Content-Length absent, or lying), so that a
    200 MB upload to a 1 MB limit is never held in memory."""
    too_large = declared_too_large(http_request.headers, limit)
    if too_large:
        return too_large
    chunks, size = [], 0
    async for chunk in http_request.stream():
        size += len(chunk)
        if size > limit:
            return PayloadTooLarge(f"the body is over {limit:,} bytes, the limit")
        chunks.append(chunk)
    return b"".join(chunks)


def declared_too_large(headers: Mapping[str, str], limit: int) -> Optional[PayloadTooLarge]:
    """The 413 for a request whose Content-Length says it is over ``limit`` bytes; None otherwise."""
    declared = headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return PayloadTooLarge(f"the body is {int(declared):,} bytes (Content-Length); the limit is {limit:,}")
    return None


async def drain_body(http_request, limit: int) -> None:
    """Let a refused request's body through without keeping it, up to ``limit`` bytes. Answered
    with its body unread, the request's connection cannot carry another, and HAProxy opens a new
    one to the replica: 60,000-byte bodies refused unread cost the replica 1,209 and 1,403 refusals
    per core-second, read 1,901 and 2,181, let through 1,642 (bench/refusal_cost.py, on the
    shared 2-core machine at a load of 10 to 30: the spread is that much)."""
    size = 0
    async for chunk in http_request.stream():
        size += len(chunk)
        if size > limit:
            return


def _media_type(headers: Mapping[str, str]) -> str:
    content_type = next((value for key, value in headers.items() if key.lower() == "content-type"), "")
    return content_type.split(";")[0].strip().lower()


def _form_fields(body: bytes) -> dict:
    from urllib.parse import parse_qs

    fields = parse_qs(body.decode("latin-1"), keep_blank_values=True, encoding="latin-1")  # bytes kept as sent
    return {name: values[0].encode("latin-1") for name, values in fields.items()}


def _multipart_fields(body: bytes, headers: Mapping[str, str]) -> dict:
    """The first value of each field of a multipart/form-data body, as bytes (a file's content
    or a field's value), parsed by the standard library's MIME parser (``email``, which Python's
    docs name in place of the removed ``cgi``): Starlette's own needs python-multipart, which
    Ray Serve does not install. A body that does not parse has no fields."""
    import email.parser
    import email.policy

    content_type = next(value for key, value in headers.items() if key.lower() == "content-type")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1", "replace") + b"\r\n\r\n" + body)
    fields = {}
    for part in message.iter_parts() if message.is_multipart() else ():
        name, value = part.get_param("name", header="content-disposition"), part.get_payload(decode=True)
        if isinstance(name, str) and isinstance(value, bytes):
            fields.setdefault(name, value)
    return fields


def _error_response(error):
    """A starlette response for an error this adapter answers itself, built as the core builds
    every error (:func:`handlers.core.responses.error_answer`)."""
    from starlette.responses import Response as HTTPResponse

    answer = error_answer(error)
    return HTTPResponse(answer.encoded.payload, status_code=answer.status, media_type=JSON, headers=answer.headers)


def replica_threads(assigned_cpus: Optional[float], torch_threads: Any) -> int:
    """torch's CPU threads in a replica: the handler's ``torch_threads`` when it sets one (the
    handler applies it itself: 0 here), else the CPUs Ray assigned the replica, rounded, at
    least 1 (0: unknown, leave torch as it is)."""
    if isinstance(torch_threads, int) and torch_threads > 0:
        return 0
    if not assigned_cpus:
        return 0
    return max(1, round(assigned_cpus))


def _assigned_cpus() -> Optional[float]:
    try:
        import ray

        if not ray.is_initialized():  # outside a replica: asking the runtime context would start a Ray node
            return None
        return ray.get_runtime_context().get_assigned_resources().get("CPU")
    except Exception:  # noqa: BLE001 - outside a replica (a test): nothing assigned
        return None


def reserved_cpus(specs: list) -> float:
    """The CPUs the replicas of these configs reserve at start (Ray's default: 1 each)."""
    total = 0.0
    for spec in specs:
        section = spec.ray_serve or {}
        autoscaling = section.get("autoscaling_config") or {}
        replicas = section.get("num_replicas", autoscaling.get("min_replicas", autoscaling.get("initial_replicas", 1)))
        cpus = (section.get("ray_actor_options") or {}).get("num_cpus", 1)
        total += float(replicas if isinstance(replicas, (int, float)) else 1) * float(cpus)
    return total


def _request_id(headers: dict) -> Optional[str]:
    """Ray Serve's id of the request being answered (its proxy sends it back as x-request-id)."""
    if headers.get("x-request-id"):
        return headers["x-request-id"]
    try:
        from ray.serve.context import _get_serve_request_context

        return _get_serve_request_context().request_id or None
    except Exception:  # noqa: BLE001 - a Ray without it: the logs name positions instead
        return None


def _deployment_name() -> str:
    from ray import serve

    try:
        return serve.get_replica_context().deployment
    except Exception:  # noqa: BLE001 - outside a replica (a test): no name to give
        return "?"


def _device() -> str:
    import ray
    import torch

    return "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"


class _RayMetrics:
    """The batch metrics (``handlers.core.metrics``) as Ray metrics, exported on each node's metrics
    port with the application, deployment and replica as tags: ``microbatch_batch_size``
    (histogram), ``microbatch_model_calls``, ``microbatch_requests_answered_alone``, ``microbatch_stage_ms{stage}``,
    ``microbatch_request_errors{status_code}``."""

    BATCH_SIZES = [1, 2, 4, 8, 16, 32, 64, 128, 256]

    def __init__(self):
        from ray.serve.metrics import Counter, Histogram

        self.batch_size = Histogram("microbatch_batch_size", description="requests per batch",
                                    boundaries=self.BATCH_SIZES)
        self.model_calls = Counter("microbatch_model_calls", description="model calls (retries included)")
        self.answered_alone = Counter("microbatch_requests_answered_alone",
                                      description="requests given a model call of their own (no batch layout to cut by)")
        self.stage_ms = Counter("microbatch_stage_ms", description="summed milliseconds per stage", tag_keys=("stage",))
        self.errors = Counter("microbatch_request_errors", description="error answers per status",
                              tag_keys=("status_code",))

    def record(self, report) -> None:
        try:
            for metric in batch_metrics(report):
                if metric.name != "BatchesServed" and not metric.value > 0:
                    continue  # Ray's Counter.inc refuses 0: a batch refused before the model lost its error counts
                if metric.name == "BatchesServed":
                    self.batch_size.observe(int(metric.labels["BatchSize"]))
                elif metric.name == "ModelCalls":
                    self.model_calls.inc(metric.value)
                elif metric.name == "RequestsAnsweredAlone":
                    self.answered_alone.inc(metric.value)
                elif metric.name == "StageTimeMs":
                    self.stage_ms.inc(metric.value, tags={"stage": metric.labels["Stage"]})
                elif metric.name == "RequestErrors":
                    self.errors.inc(metric.value, tags={"status_code": metric.labels["StatusCode"]})
        except Exception:  # noqa: BLE001 - a metrics bug must not cost the batch its answers
            log.exception("could not record metrics for a batch")
