"""``.mar`` archives on Ray Serve, from the archives themselves: a legacy one (a stock TorchServe
``BaseHandler`` subclass, archived by the real torch-model-archiver; tests/legacy_mar.py) and one of
ours (quickstart). Each is served by the session's real TorchServe and by the session's real local
Ray cluster (loopback, dashboard off, its own temp dir; tests/integration/conftest.py SharedRay), on
which this module deploys them: the same inputs get the same answers; on Ray Serve a bad request in
a batch gets its own error and its batch-mates 200.
The legacy handler upgraded in an archiver config (one line) starts on Ray Serve too."""

from __future__ import annotations

import json
import time

import pytest
import requests
import yaml

from handlers.servers.ray_cluster import set_ray_environment
from tests.legacy_mar import GOOD, NAME, expected

from .helpers import concurrently

pytestmark = [pytest.mark.integration, pytest.mark.shared_ray, pytest.mark.timeout(900)]
set_ray_environment()  # before Ray is imported: it reads these at import time
ray = pytest.importorskip("ray")

QUICKSTART = [{"id": "a", "x": [1, 2, 3, 4]}, {"id": "b", "x": [0.5, -1, 2.25, 8]}, {"id": "c", "x": [0, 0, 0, 0]}]
LOADED = "loaded AOTInductor packages"


@pytest.fixture(scope="module")
def upgraded_config(legacy_archive):
    """An archiver config whose handler file upgrades the legacy handler (docs/from_torchserve.md's
    one line), with the legacy archive's own handler and TorchScript model as its files."""
    source = legacy_archive / f"{NAME}_src"  # what build_legacy_mar archived
    (source / "upgraded.py").write_text("from legacy_handler import LegacyHandler\nfrom handlers import upgrade\n\n"
                                        "LegacyHandler = upgrade(LegacyHandler)\n")
    config = source / "upgraded.yaml"
    config.write_text(yaml.safe_dump({
        "model_name": "upgraded", "version": "1.0", "handler": "upgraded.py", "serialized_file": "model.pt",
        "extra_files": ["legacy_handler.py"],
        "model_config": yaml.safe_load((source / "model-config.yaml").read_text()),
    }))
    return config


@pytest.fixture(scope="module")
def torchserve_mars(torchserve):
    """The session's TorchServe: it serves both archives (``legacy`` and ``quickstart``) beside the others."""
    return torchserve


@pytest.fixture(scope="module")
def ray_mars(model_store, legacy_archive, aot_archive, upgraded_config, shared_ray):
    """The same two archives (the files TorchServe serves) on Ray Serve, as ``python -m
    handlers.ray_serve legacy.mar quickstart.mar`` deploys them; deleted at the module's end."""
    from ray import serve

    from handlers.packaging.archive import load_spec
    from handlers.packaging.mar import load_mar
    from handlers.servers.ray_serve import serve_specs, startup_failures

    url = shared_ray.url()
    names = [NAME, "quickstart", aot_archive, "upgraded"]
    try:
        started = time.monotonic()
        names = serve_specs([load_mar(model_store / f"{name}.mar") for name in (NAME, "quickstart", aot_archive)]
                            + [load_spec(upgraded_config)])
        assert startup_failures(names) == {}
        print(f"\nRay Serve: {names} deployed from their .mar in {time.monotonic() - started:.1f} s")
        yield url
    finally:
        for name in names:
            serve.delete(name)


def on_torchserve(server, model, body, content_type="application/json"):
    return requests.post(f"{server.inference_url}/predictions/{model}", data=json.dumps(body),
                         headers={"Content-Type": content_type, **server.auth()}, timeout=60)


def on_ray(base, model, body, content_type="application/json"):
    return requests.post(f"{base}/predictions/{model}", data=json.dumps(body), headers={"Content-Type": content_type},
                         timeout=60)


@pytest.mark.parametrize("content_type", ["application/json", "application/octet-stream"])
def test_a_legacy_mar_answers_on_ray_serve_as_on_torchserve(torchserve_mars, ray_mars, content_type):
    for body in GOOD:
        theirs, ours = on_torchserve(torchserve_mars, NAME, body, content_type), on_ray(ray_mars, NAME, body,
                                                                                      content_type)
        assert theirs.status_code == ours.status_code == 200, (theirs.text, ours.text)
        assert theirs.json() == ours.json() == expected(body)
    # Together, as one batch on each server: the same answers again.
    together = concurrently(len(GOOD), lambda i: on_ray(ray_mars, NAME, GOOD[i], content_type))
    assert [r.json() for r in together] == [expected(b) for b in GOOD]


def test_our_mar_answers_on_ray_serve_as_on_torchserve(torchserve_mars, ray_mars):
    for body in QUICKSTART:
        theirs, ours = on_torchserve(torchserve_mars, "quickstart", body), on_ray(ray_mars, "quickstart", body)
        assert theirs.status_code == ours.status_code == 200, (theirs.text, ours.text)
        assert theirs.json() == ours.json() == {"id": body["id"], "y": [2 * v + 1 for v in body["x"]]}


def test_a_bad_request_to_a_legacy_mar_gets_its_own_error_and_its_batch_mates_200(ray_mars):
    bodies = [GOOD[i % len(GOOD)] for i in range(7)]
    bodies.insert(3, {"no_x": [1.0, 2.0]})
    responses = concurrently(len(bodies), lambda i: on_ray(ray_mars, NAME, bodies[i]))
    bad = responses[3]
    assert bad.status_code == 422, bad.text
    assert bad.json()["message"] == "the request has no field 'x'" and bad.json()["code"] == 422
    assert int(bad.headers["X-Batch-Size"]) > 1, "the bad request was not batched with others: nothing was shown"
    for idx, response in enumerate(responses):
        if idx != 3:
            assert response.status_code == 200 and response.json() == expected(bodies[idx]), (idx, response.text)


def test_a_handler_upgraded_in_an_archiver_config_starts_on_ray_serve(ray_mars):
    """Its initialize(context) gets the stand-in context there (it had none: the replica could not start)."""
    together = concurrently(len(GOOD), lambda i: on_ray(ray_mars, "upgraded", GOOD[i]))
    assert [(r.status_code, r.json()) for r in together] == [(200, expected(b)) for b in GOOD]


def test_a_lone_bad_request_gets_torchserves_status_and_message(torchserve_mars, ray_mars):
    """Alone, a PredictionException answers the same on both servers (in a batch, TorchServe's
    fails every batch-mate with it: the test above shows Ray Serve does not)."""
    bad = {"no_x": [1.0, 2.0]}
    theirs, ours = on_torchserve(torchserve_mars, NAME, bad), on_ray(ray_mars, NAME, bad)
    assert theirs.status_code == ours.status_code == 422, (theirs.text, ours.text)
    assert theirs.json()["message"] == ours.json()["message"] == "the request has no field 'x'"


def test_an_aot_mar_loads_its_packages_and_answers_as_eager_on_both_servers(torchserve_mars, ray_mars, aot_archive):
    """The quickstart .mar with AOTInductor packages: each server's worker loads them (TorchServe's
    log says so, nothing compiled; the Ray replica's runtime says so) and a batch of requests, a bad
    one among them, is answered as the eager archive answers it."""
    bodies = [*QUICKSTART, {"id": "bad", "x": [1, 2]}, *QUICKSTART]
    eager = [on_torchserve(torchserve_mars, "quickstart", body) for body in bodies]
    assert [r.status_code for r in eager] == [200] * 3 + [400] + [200] * 3
    aot = aot_archive
    for answer in (lambda i: on_torchserve(torchserve_mars, aot, bodies[i]), lambda i: on_ray(ray_mars, aot, bodies[i])):
        together = concurrently(len(bodies), answer)  # micro-batches of the buckets' sizes
        assert [r.status_code for r in together] == [r.status_code for r in eager]
        for ours, theirs in zip(together, eager):  # the bad one's error, each other's own y
            if theirs.status_code == 200:
                assert ours.json()["id"] == theirs.json()["id"] and ours.json()["y"] == pytest.approx(theirs.json()["y"])
            else:
                assert ours.json() == theirs.json()
    model_log = (torchserve_mars.workdir / "logs" / "model_log.log").read_text()
    assert LOADED in model_log and "compiling at start-up" not in model_log
    from ray import serve

    runtime = serve.get_deployment_handle(aot, app_name=aot).runtime.remote().result(timeout_s=60)
    assert runtime["compiled"] == {"sizes": [2, 4], "source": "aot"}
