"""The example handlers, unchanged, on a real local Ray cluster (Ray Serve, loopback, dashboard off,
its own temp dir: the session's, tests/integration/conftest.py SharedRay): the same answers as
through TorchServe, the bad-input corpus with the same codes, an identity-checked load, and a
replica killed under load."""

from __future__ import annotations

import json
import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import yaml

from handlers.servers.ray_cluster import set_ray_environment

from ..corpus.bad_inputs import corpus
from ..good_inputs import good_request
from .helpers import background_load, concurrently
from .test_flat_detector import (assert_called_together, assert_each_request_got_its_own_boxes,
                                 assert_one_call_per_request, contract_run)

# Starting Ray and five replicas on a 2-core machine takes a few minutes: it counts in the first test.
pytestmark = [pytest.mark.integration, pytest.mark.shared_ray, pytest.mark.timeout(900)]
set_ray_environment()  # before Ray is imported: it reads these at import time
ray = pytest.importorskip("ray")

ROOT = Path(__file__).resolve().parents[2]
MODELS = ("quickstart", "tabular", "digits", "text_embedding", "image_classifier")
# Metrics reach Ray's metrics port every second here (SharedRay.METRICS_REPORT_MS): a count that
# held still this long has settled.
SETTLE_S = 3.0


@pytest.fixture(scope="module")
def ray_serve(model_store, readme_handler_config, flat_detector_declared, shared_ray):
    """The session's private Ray cluster, serving every example config at /predictions/<model>,
    as ``python -m handlers.ray_serve`` does; they stay until the cluster stops.
    (It needs the model store only for the built artefacts.)"""
    from handlers.servers.ray_serve import serve_configs

    url = shared_ray.url()
    configs = [ROOT / "archiver_configs" / f"{model}.yaml" for model in (*MODELS, "flat_detector")]
    configs.append(readme_handler_config)
    if not flat_detector_declared.refused:  # refused before issue 29's fix: its test says so
        configs.append(flat_detector_declared.config)
    started = time.monotonic()
    serve_configs(configs)
    print(f"\nRay Serve: {len(configs)} applications deployed in {time.monotonic() - started:.1f} s")
    return url


def post(base, model, body, content_type, timeout=60):
    return requests.post(f"{base}/predictions/{model}", data=body, headers={"Content-Type": content_type},
                         timeout=timeout)


def close_to(a, b, tolerance=1e-5):
    """Equal, with floats within ``tolerance`` (BLAS may sum in another order in another process)."""
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and abs(a - b) <= tolerance * max(1, abs(b))
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(close_to(x, y, tolerance) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(close_to(a[k], b[k], tolerance) for k in a)
    return a == b


@pytest.mark.parametrize("model", MODELS)
def test_each_example_answers_on_ray_serve_as_it_does_on_torchserve(ray_serve, torchserve, model):
    body, content_type, is_right = good_request(model)
    on_ray = post(ray_serve, model, body, content_type)
    on_torchserve = requests.post(f"{torchserve.inference_url}/predictions/{model}", data=body,
                                  headers={"Content-Type": content_type, **torchserve.auth()}, timeout=60)
    assert on_ray.status_code == on_torchserve.status_code == 200, on_ray.text[:300]
    assert is_right(on_ray.json())
    assert close_to(on_ray.json(), on_torchserve.json()), (on_ray.text[:300], on_torchserve.text[:300])
    assert on_ray.headers["Content-Type"].startswith("application/json")
    assert on_ray.headers["X-Batch-Size"] == "1"


def test_a_form_post_gets_the_same_415_on_both_servers(ray_serve, torchserve):
    """curl -d without a Content-Type: a form, with no body; was a 200 on Ray Serve."""
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    body = '{"id": "f", "x": [1, 2, 3, 4]}'
    on_ray = requests.post(f"{ray_serve}/predictions/quickstart", data=body, headers=form, timeout=60)
    on_torchserve = requests.post(f"{torchserve.inference_url}/predictions/quickstart", data=body,
                                  headers={**form, **torchserve.auth()}, timeout=60)
    assert on_ray.status_code == on_torchserve.status_code == 415, (on_ray.text, on_torchserve.text)
    assert on_ray.json() == on_torchserve.json()
    assert on_ray.headers["Content-Type"].startswith("application/json")
    assert on_torchserve.headers["Content-Type"].startswith("application/json")


def test_a_multipart_form_file_is_the_body_on_ray_serve_as_on_torchserve(ray_serve, torchserve):
    """``curl -F data=@file`` (multipart/form-data, as TorchServe's docs show): the form's ``data``
    file is the body, as TorchServe hands it to the handler (was a 4xx on Ray Serve)."""
    url = f"{ray_serve}/predictions/quickstart"
    body = b'{"x": [1, 2, 3, 4]}'
    raw = requests.post(url, data=body, headers={"Content-Type": "application/json"}, timeout=60)
    form = requests.post(url, files={"data": ("input.json", body, "application/json")}, timeout=60)
    assert raw.status_code == form.status_code == 200, form.text
    assert form.json() == raw.json()
    on_torchserve = requests.post(f"{torchserve.inference_url}/predictions/quickstart", headers=torchserve.auth(),
                                  files={"data": ("input.json", body, "application/json")}, timeout=60)
    assert on_torchserve.status_code == 200 and on_torchserve.json() == form.json(), on_torchserve.text
    other = requests.post(url, files={"file": ("input.json", body)}, timeout=60)
    assert other.status_code == 415, other.text  # TorchServe reads a field named body or data only


@pytest.mark.parametrize("path", ["/predictions/no_such_model", "/no/such/path"])
def test_an_unknown_model_or_path_gets_the_same_json_404_on_both_servers(ray_serve, torchserve, path):
    """Was a text/plain 404 from Ray Serve's proxy."""
    on_ray = requests.post(f"{ray_serve}{path}", data=b"{}", headers={"Content-Type": "application/json"}, timeout=60)
    on_torchserve = requests.post(f"{torchserve.inference_url}{path}", data=b"{}",
                                  headers={"Content-Type": "application/json", **torchserve.auth()}, timeout=60)
    assert on_ray.status_code == on_torchserve.status_code == 404, (on_ray.text, on_torchserve.text)
    assert on_ray.headers["Content-Type"].startswith("application/json")
    assert on_ray.json() == on_torchserve.json()


CASES = corpus()


@pytest.mark.parametrize("item", CASES, ids=[item.kind for item in CASES])
def test_the_bad_input_corpus_gets_the_same_codes_on_ray_serve_and_batch_mates_their_answers(ray_serve, item):
    good, good_type, is_right = good_request(item.model)

    def call(i):
        body, content_type = (item.body, item.content_type) if i == 2 else (good, good_type)
        return post(ray_serve, item.model, body, content_type)

    responses = concurrently(6, call)
    bad = responses[2]
    assert bad.status_code == item.status, bad.text[:300]
    if item.status != 200:
        error = bad.json()
        assert error["code"] == item.status and (item.frontend_only or item.words in error["message"])
    for i, response in enumerate(responses):
        if i != 2:
            assert response.status_code == 200, response.text[:300]
            assert is_right(response.json())


def test_an_identity_checked_load_of_2000_mixed_requests_loses_and_mixes_nothing(ray_serve):
    """Requests to three models, a tenth of them bad, at concurrency 64: every request gets an
    answer, each good one its own (its id and y = 2x + 1, or its own flower), each bad one 400."""
    rng = random.Random(7)
    flowers = {"setosa": [5.1, 3.5, 1.4, 0.2], "virginica": [6.7, 3.0, 5.2, 2.3]}

    def one(i):
        kind = (i * 7919 % 100) / 100  # a tenth bad, three tenths tabular, the rest quickstart
        if kind < 0.1:
            return "quickstart", b'{"id": "bad", "x": [1, 2]}', "application/json", 400, None
        if kind < 0.4:
            name = "setosa" if i % 2 else "virginica"
            return "tabular", json.dumps(flowers[name]).encode(), "application/json", 200, lambda a: a["species"] == name
        x = [i % 97, i % 89, 3, i % 13]
        return ("quickstart", json.dumps({"id": f"r{i}", "x": x}).encode(), "application/json", 200,
                lambda a: a == {"id": f"r{i}", "y": [2.0 * v + 1 for v in x]})

    plan = [one(i) for i in range(2000)]
    rng.shuffle(plan)
    started = time.monotonic()
    with requests.Session() as session, ThreadPoolExecutor(64) as pool:
        def send(entry):
            model, body, content_type, _, _ = entry
            try:
                return session.post(f"{ray_serve}/predictions/{model}", data=body,
                                    headers={"Content-Type": content_type}, timeout=120)
            except requests.RequestException as exc:
                return exc

        results = list(pool.map(send, plan))
    elapsed = time.monotonic() - started
    lost = [r for r in results if isinstance(r, Exception)]
    assert not lost, lost[:3]
    wrong = [(entry[0], r.status_code, r.text[:120]) for entry, r in zip(plan, results)
             if r.status_code != entry[3] or (entry[4] is not None and not entry[4](r.json()))]
    assert not wrong, wrong[:5]
    print(f"\n2000 mixed requests at concurrency 64 on Ray Serve: {elapsed:.1f} s ({2000 / elapsed:.0f} req/s), "
          "0 lost, 0 wrong")


def test_killing_a_replica_under_load_fails_only_in_flight_requests(ray_serve):
    """Clients keep sending to quickstart while its replica is killed: requests in flight when it
    dies may fail, every other one is answered correctly; the time until answers come again is
    measured. Behind HAProxy (the default) a request in flight on the dead replica gets its
    connection closed without an answer, and one that arrives before HAProxy has seen the replica
    refuse three connections (``observe layer4 error-limit 3``) a 500; the Python proxy answered
    the first with a 500 and held the second."""
    import psutil
    from ray import serve

    def send(k, i):
        body = json.dumps({"id": f"k{k}-{i}", "x": [k, i % 50, 0, 1]}).encode()
        return post(ray_serve, "quickstart", body, "application/json", timeout=60)

    def ok(result):
        return not isinstance(result, Exception) and result.status_code == 200

    [process] = [p for p in psutil.Process().children(recursive=True)
                 if p.name().startswith("ray::ServeReplica:quickstart:quickstart")]
    with background_load(8, send) as log:
        time.sleep(2)  # load running before the kill
        [replica] = [a for a in ray.util.list_named_actors(all_namespaces=True)
                     if a["name"].startswith("SERVE_REPLICA::quickstart#")]
        killed_at = time.monotonic()
        ray.kill(ray.get_actor(replica["name"], namespace=replica["namespace"]), no_restart=True)
        process.wait(timeout=30)  # ray.kill returns before the replica has ended
        died_at = time.monotonic()
        recovered = None
        while time.monotonic() - killed_at < 90 and recovered is None:
            answered = [end for sent, end, result, *_ in list(log) if sent > died_at and ok(result)]
            recovered = min(answered) - killed_at if answered else None
            time.sleep(0.1)
        time.sleep(1)  # some load after recovery
    assert recovered is not None, "no answer within 90 s of the kill"
    marked_down_by = died_at + 1.0  # three refused connections at this load: well under a second
    for sent, end, response, k, i in log:
        if ok(response):
            assert response.json() == {"id": f"k{k}-{i}", "y": [2.0 * k + 1, 2.0 * (i % 50) + 1, 1.0, 3.0]}
        else:  # only requests in flight when the replica died, or sent before HAProxy marked it down
            what = repr(response) if isinstance(response, Exception) else (response.status_code, response.text[:200])
            assert sent <= marked_down_by and end >= killed_at, (what, sent - killed_at, died_at - killed_at)
    failed = [entry[2] for entry in log if not ok(entry[2])]
    closed = sum(1 for result in failed if isinstance(result, Exception))
    print(f"\nreplica killed under load (it ended {died_at - killed_at:.2f} s after ray.kill): {len(failed)} "
          f"request(s) failed ({closed} closed without an answer, {len(failed) - closed} answered 5xx), "
          f"{len(log) - len(failed)} answered; answers again {recovered:.2f} s after the kill")
    assert serve.status().applications["quickstart"].status == "RUNNING"


def test_batch_sizes_and_stage_times_reach_ray_metrics(ray_serve):
    """The handler's batch metrics come out of Ray's metrics export port, tagged with the
    application: the batch-size histogram, model calls and stage times."""
    concurrently(8, lambda i: post(ray_serve, "quickstart", json.dumps({"id": i, "x": [i, 0, 0, 0]}).encode(),
                                   "application/json"))
    from handlers.servers.ray_cluster import metrics_url

    url = metrics_url()  # what python -m handlers.ray_serve prints at start
    wanted = ("ray_microbatch_batch_size_bucket", "ray_microbatch_model_calls_total", "ray_microbatch_stage_ms_total")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        text = requests.get(url, timeout=10).text
        lines = [line for line in text.splitlines() if 'application="quickstart"' in line]
        if all(any(line.startswith(name) for line in lines) for name in wanted):
            break
        time.sleep(1)  # Ray exports metrics every few seconds
    for name in wanted:
        assert any(line.startswith(name) for line in lines), name
    assert any('stage="inference"' in line for line in lines if line.startswith("ray_microbatch_stage_ms_total"))


def test_the_readme_handler_runs_unchanged_on_both_servers(ray_serve, torchserve):
    """The README walkthrough's MyHandler and model, as they stand: the same answers, and the
    same 400 for a body without "x", through TorchServe and through Ray Serve."""
    body = json.dumps({"x": [1, 2]}).encode()
    on_ray = post(ray_serve, "readme_handler", body, "application/json")
    on_torchserve = requests.post(f"{torchserve.inference_url}/predictions/readme_handler", data=body,
                                  headers={"Content-Type": "application/json", **torchserve.auth()}, timeout=60)
    assert on_ray.status_code == on_torchserve.status_code == 200, (on_ray.text, on_torchserve.text)
    assert on_ray.json() == on_torchserve.json() == {"y": [3.0, 5.0]}
    bad = b'{"z": 1}'
    bad_on_ray = post(ray_serve, "readme_handler", bad, "application/json")
    bad_on_torchserve = requests.post(f"{torchserve.inference_url}/predictions/readme_handler", data=bad,
                                      headers={"Content-Type": "application/json", **torchserve.auth()}, timeout=60)
    assert bad_on_ray.status_code == bad_on_torchserve.status_code == 400
    assert bad_on_ray.json() == bad_on_torchserve.json()


def test_the_private_cluster_and_its_http_proxy_are_on_loopback(ray_serve):
    assert ray._private.worker.global_worker.node.node_ip_address == "127.0.0.1"
    assert ray_serve.startswith("http://127.0.0.1:")


MIXING_HANDLER = '''import torch

from handlers import MicroBatchHandler


class BatchMixingHandler(MicroBatchHandler):
    def preprocess_one(self, request):
        return torch.tensor(request.json()["x"], dtype=torch.float32)

    def infer(self, batch):
        y = self.model(batch)
        return y - y.mean(dim=0, keepdim=True)  # a statistic over the batch
'''


def test_a_model_whose_answers_change_with_batch_mates_is_refused_at_start_up_in_one_line(ray_serve, tmp_path):
    """The start-up self-test runs in each replica, on the samples shipped with the config: a
    model that mixes the requests of a batch never serves; Ray reports the replica's one line."""
    import yaml
    from ray import serve

    from handlers.servers.ray_serve import serve_configs, startup_failures

    (tmp_path / "batch_mixing.py").write_text(MIXING_HANDLER)
    config = yaml.safe_load((ROOT / "archiver_configs" / "quickstart.yaml").read_text())
    config.update(root=str(ROOT), model_name="batch_mixing", handler=str(tmp_path / "batch_mixing.py"))
    (tmp_path / "mixing.yaml").write_text(yaml.safe_dump(config))
    started = time.monotonic()
    try:
        serve_configs([tmp_path / "mixing.yaml"])  # issue 30, part 2: the replica stays up, answering 503
        line = startup_failures(["batch_mixing"])["batch_mixing"]
        refused = requests.post(f"{ray_serve}/predictions/batch_mixing", json={"x": [1, 2, 3, 4]}, timeout=20)
        ping = requests.get(f"{ray_serve}/ping", timeout=20)
    finally:
        serve.delete("batch_mixing")
    print(f"\nrefused after {time.monotonic() - started:.1f} s: {line}")
    assert line.startswith("microbatch-handlers: model batch_mixing cannot start: self-test: sample ")
    assert "answers differently beside other requests" in line
    assert refused.status_code == 503 and refused.json() == {"code": 503, "type": "ModelCannotStart", "message": line}
    assert ping.status_code == 500 and ping.json()["status"] == "Unhealthy"
    assert requests.post(f"{ray_serve}/predictions/quickstart", json={"id": "q", "x": [1, 2, 3, 4]},
                         timeout=60).json() == {"id": "q", "y": [3.0, 5.0, 7.0, 9.0]}


def test_a_replica_runs_torch_on_the_cpus_it_reserved(ray_serve):
    """Ray gives a replica 1 CPU unless told otherwise (OMP_NUM_THREADS=1): the image classifier
    ran ResNet-18 on one thread, at half TorchServe's speed. Its config reserves 2 CPUs now, and
    torch's threads follow."""
    from ray import serve

    def runtime(name):
        return serve.get_deployment_handle(name, app_name=name).runtime.remote().result(timeout_s=60)

    # 2 CPUs, shared by its 2 micro-batches on the model at once (inference_workers: 2)
    assert {k: v for k, v in runtime("image_classifier").items() if k != "model_dir"} == {
        "device": "cpu", "torch_threads": 1, "compiled": None}
    assert runtime("quickstart")["torch_threads"] == 1  # Ray's default reservation


def test_a_replica_removes_its_copy_of_the_model_files_when_it_stops(ray_serve, tmp_path):
    """Each replica writes the model files to a folder of its own; they were never removed, so
    each replacement left another copy of the weights behind."""
    from ray import serve

    from handlers.servers.ray_serve import serve_configs

    config = yaml.safe_load((ROOT / "archiver_configs" / "quickstart.yaml").read_text())
    config.update(model_name="quickstart_copy", root=str(ROOT))
    path = tmp_path / "quickstart_copy.yaml"
    path.write_text(yaml.safe_dump(config))
    assert serve_configs([path]) == ["quickstart_copy"]
    handle = serve.get_deployment_handle("quickstart_copy", app_name="quickstart_copy")
    model_dir = Path(handle.runtime.remote().result(timeout_s=60)["model_dir"])
    assert (model_dir / "weights.pt").is_file()
    serve.delete("quickstart_copy")
    deadline = time.monotonic() + 30
    while model_dir.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not model_dir.exists()


def test_with_an_inference_key_a_request_needs_it(ray_serve, tmp_path):
    """Token authorisation as TorchServe users had it: no key or a wrong one is a JSON 401 (the
    model never sees the request), the key gets the answer."""
    from ray import serve

    from handlers.servers.ray_serve import serve_configs

    config = yaml.safe_load((ROOT / "archiver_configs" / "quickstart.yaml").read_text())
    config.update(model_name="quickstart_keyed", root=str(ROOT))
    path = tmp_path / "quickstart_keyed.yaml"
    path.write_text(yaml.safe_dump(config))
    assert serve_configs([path], api_key="s3cret-key") == ["quickstart_keyed"]
    try:
        url = f"{ray_serve}/predictions/quickstart_keyed"
        body = json.dumps({"id": "k", "x": [1, 2, 3, 4]})
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            refused = requests.post(url, data=body, headers={"Content-Type": "application/json", **headers}, timeout=60)
            assert refused.status_code == 401 and refused.json()["code"] == 401, refused.text
        answered = requests.post(url, data=body, timeout=60, headers={"Content-Type": "application/json",
                                                                       "Authorization": "Bearer s3cret-key"})
        assert answered.status_code == 200 and answered.json() == {"id": "k", "y": [3.0, 5.0, 7.0, 9.0]}
    finally:
        serve.delete("quickstart_keyed")


def test_requests_whose_client_stops_waiting_while_the_model_is_busy_are_shed_without_model_time(ray_serve, tmp_path):
    """Overload on Ray Serve: one request per model call, a second each, a budget of 1.2 s per
    request (request_budget_s; a client's x-request-timeout-seconds is also honoured by Ray's
    proxy, which would answer its own 408 first). What the replica can start in time is
    answered; the rest get a 408 (deadline passed, unstarted) or, once the replica has measured
    its rate, a 503 on arrival; a request whose budget passed before the model reached it gets a
    503 too (the server dropped it: its client still waits, and may send it again)."""
    from ray import serve

    from handlers.servers.ray_serve import serve_configs

    config = yaml.safe_load((ROOT / "archiver_configs" / "quickstart.yaml").read_text())
    config.update(root=str(ROOT), model_name="busy_model", handler=str(Path(__file__).parent / "fault_handler.py"),
                  model_config={"batchSize": 8, "maxBatchDelay": 200,
                                "handler": {"micro_batch_size": 1, "request_budget_s": 1.2}})
    (tmp_path / "busy.yaml").write_text(yaml.safe_dump(config))
    serve_configs([tmp_path / "busy.yaml"])
    try:
        def call(i):
            return requests.post(f"{ray_serve}/predictions/busy_model", timeout=60,
                                 json={"id": f"d{i}", "x": [i, i, i, i], "fault": "slow_model"})

        waves = [concurrently(6, call) for _ in range(2)]  # the second wave meets a measured rate
        for wave, responses in enumerate(waves):
            statuses = [r.status_code for r in responses]
            print(f"\nwave {wave}: statuses {statuses}")
            assert set(statuses) <= {200, 408, 503} and 200 in statuses and statuses.count(200) <= 4, statuses
            for i, response in enumerate(responses):
                body = response.json()
                if response.status_code == 200:
                    assert body == {"id": f"d{i}", "y": [-41.0] * 4, "sum": -164.0}
                elif response.status_code == 408:
                    assert body["type"] == "RequestTimeout" and "no model time was spent" in body["message"]
                else:
                    assert body["type"] == "ServiceUnavailable" and (
                        body["message"].startswith("overloaded:") or "request_budget_s" in body["message"]), body
                    assert response.headers.get("Retry-After"), response.headers
    finally:
        serve.delete("busy_model")


def test_without_a_declaration_each_request_gets_its_own_boxes_on_ray_serve(ray_serve):
    """Issue 29 on Ray Serve (test_flat_detector.py has the TorchServe side)."""
    from bench.detector_contract import ray_calls

    tally, calls = contract_run(f"{ray_serve}/predictions/flat_detector", {}, ray_calls("flat_detector"), settle_s=SETTLE_S)
    assert_each_request_got_its_own_boxes(tally)
    assert_one_call_per_request(calls)


def test_with_the_declaration_micro_batches_are_called_together_on_ray_serve(ray_serve, flat_detector_declared):
    from bench.detector_contract import ray_calls

    if flat_detector_declared.refused:
        pytest.fail(f"the declared config was refused: {flat_detector_declared.refused}")
    name = flat_detector_declared.name
    tally, calls = contract_run(f"{ray_serve}/predictions/{name}", {}, ray_calls(name), settle_s=SETTLE_S)
    assert_each_request_got_its_own_boxes(tally)
    assert_called_together(calls)
