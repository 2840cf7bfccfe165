"""The base handler on a real TorchServe: REST calls, batching, isolation, identity, auth."""

import json
import subprocess
import sys

import pytest
import requests

from .helpers import concurrently

pytestmark = pytest.mark.integration


def predict(server, body, auth=True, content_type="application/json"):
    headers = {"Content-Type": content_type, **(server.auth() if auth else {})}
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return requests.post(f"{server.inference_url}/predictions/quickstart", data=data, headers=headers, timeout=60)


def test_a_request_gets_its_answer_and_the_batch_size_header(torchserve):
    response = predict(torchserve, {"id": "one", "x": [1, 2, 3, 4]})
    assert response.status_code == 200
    assert response.json() == {"id": "one", "y": [3.0, 5.0, 7.0, 9.0]}
    assert int(response.headers["X-Batch-Size"]) >= 1


def test_a_call_without_the_token_is_refused_and_with_it_succeeds(torchserve):
    refused = predict(torchserve, {"id": "x", "x": [0, 0, 0, 0]}, auth=False)
    assert refused.status_code in (400, 401, 403)
    assert "Token Authorization failed" in refused.text
    assert predict(torchserve, {"id": "x", "x": [0, 0, 0, 0]}).status_code == 200


def test_64_concurrent_requests_are_batched_and_each_answer_is_its_own(torchserve, unique):
    ids = [unique() for _ in range(64)]

    def call(i):
        return predict(torchserve, {"id": ids[i], "x": [i, -i, 0.5 * i, 1]})

    responses = concurrently(64, call)
    assert [r.status_code for r in responses] == [200] * 64
    for i, response in enumerate(responses):
        assert response.json() == {"id": ids[i], "y": [2 * i + 1, -2 * i + 1, i + 1.0, 3.0]}
    batch_sizes = [int(r.headers["X-Batch-Size"]) for r in responses]
    assert max(batch_sizes) > 1, f"no batching seen: {batch_sizes}"
    assert max(batch_sizes) <= 16  # batchSize in archiver_configs/quickstart.yaml


@pytest.mark.parametrize("bad_body, words", [
    (b'{"id": "bad", "x": [1, 2', "not valid JSON"),
    ({"id": "bad", "x": [1, 2]}, '"x" must be a list of 4 numbers'),
    ({"id": "bad", "x": ["a", "b", "c", "d"]}, '"x" must be a list of 4 numbers'),
    ([1, 2, 3, 4], "expected a JSON object"),
])
def test_a_malformed_request_among_good_ones_gets_its_400_and_the_others_their_answers(
    torchserve, unique, bad_body, words
):
    ids = [unique() for _ in range(24)]
    bad_positions = {5, 17}

    def call(i):
        if i in bad_positions:
            return predict(torchserve, bad_body)
        return predict(torchserve, {"id": ids[i], "x": [i, i, i, i]})

    responses = concurrently(24, call)
    for i, response in enumerate(responses):
        if i in bad_positions:
            assert response.status_code == 400, response.text
            error = response.json()
            assert error["code"] == 400 and error["type"] == "BadRequest"
            assert words in error["message"]
        else:
            assert response.status_code == 200, response.text
            assert response.json() == {"id": ids[i], "y": [2.0 * i + 1] * 4}
    # Batched together (not one by one), and the worker was not restarted by the bad ones.
    assert max(int(r.headers["X-Batch-Size"]) for r in responses) > 1


def test_the_archive_is_self_contained_the_servers_python_lacks_the_project(torchserve, tmp_path):
    # The TorchServe above runs on this Python with the checkout off its path: prove the
    # handlers package it ran came from the .mar alone.
    probe = subprocess.run(
        [sys.executable, "-c", "import handlers"], cwd=tmp_path, env=torchserve.env(), capture_output=True, text=True
    )
    assert probe.returncode != 0 and "No module named 'handlers'" in probe.stderr
