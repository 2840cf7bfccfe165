"""SageMaker's two routes in front of one model served by :mod:`handlers.servers.ray_serve`, for
the Ray Serve package (``python -m handlers.export_ray``): ``GET /ping`` (200 while the model
serves, else 500 with its one start-up failure line) and ``POST /invocations`` (the body and
headers handed to the model's replica, which answers as over HTTP: per-request status and JSON
errors). An application at route prefix ``/``, beside the model's ``/predictions/<name>``;
anything else gets TorchServe's JSON 404. Ray is imported only when used."""

from __future__ import annotations

import asyncio
import json

from handlers.core.responses import JSON
from typing import Optional

from handlers.servers.ray_serve import not_found_body, ping_answer, startup_failures, unauthorized

PING, INVOCATIONS = "/ping", "/invocations"


def sagemaker_app(model_name: str, api_key: Optional[str] = None):
    """The application: one replica, no CPU reserved (it only forwards). With ``api_key``,
    ``/invocations`` needs ``Authorization: Bearer <api_key>`` as the model's own route does;
    ``/ping`` stays open, as TorchServe's."""
    from ray import serve
    from starlette.responses import Response as HTTPResponse

    @serve.deployment(name="sagemaker", num_replicas=1, ray_actor_options={"num_cpus": 0})
    class SageMaker:
        def __init__(self, model_name: str, api_key: Optional[str]):
            from handlers.servers.ray_cluster import keep_replica_grpc_on_loopback

            keep_replica_grpc_on_loopback()
            self.model_name = model_name
            self.api_key = api_key

        async def __call__(self, http_request) -> HTTPResponse:
            path, method = http_request.url.path, http_request.method
            if path == PING and method == "GET":
                failures = await asyncio.to_thread(startup_failures, [self.model_name])
                status, body = ping_answer(failures, detailed=True)
                return HTTPResponse(body, status_code=status, media_type=JSON)
            refused = unauthorized(http_request.headers, self.api_key)
            if refused:
                return HTTPResponse(json.dumps(refused), status_code=401, media_type=JSON)
            if path == INVOCATIONS and method == "POST":
                body = await http_request.body()
                model = serve.get_app_handle(self.model_name)
                status, payload, headers = await model.invoke.remote(body, dict(http_request.headers))
                return HTTPResponse(payload, status_code=status, headers=headers)
            return HTTPResponse(not_found_body(path), status_code=404, media_type=JSON)

    return SageMaker.bind(model_name, api_key)
