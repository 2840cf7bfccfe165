"""The bad-input corpus through the real TorchServe, each bad request sent together with good
ones to the same model: its own status and message, the good ones right, no worker restarted."""

import pytest
import requests

from ..corpus.bad_inputs import corpus
from ..good_inputs import good_request
from .helpers import concurrently, worker_pids

pytestmark = pytest.mark.integration
CASES = corpus()


@pytest.fixture(scope="module")
def pids_at_start(torchserve):
    return {model: worker_pids(torchserve, model) for model in {item.model for item in CASES}}


@pytest.mark.parametrize("item", CASES, ids=[item.kind for item in CASES])
def test_a_bad_input_among_good_ones_on_the_real_server(torchserve, pids_at_start, item):
    url = f"{torchserve.inference_url}/predictions/{item.model}"
    good, good_type, is_right = good_request(item.model)

    def call(i):
        body, content_type = (item.body, item.content_type) if i == 2 else (good, good_type)
        return requests.post(url, data=body, headers={"Content-Type": content_type, **torchserve.auth()}, timeout=60)

    responses = concurrently(6, call)
    bad = responses[2]
    assert bad.status_code == item.status, bad.text[:300]
    if item.status != 200 and not item.frontend_only:
        error = bad.json()
        assert error["code"] == item.status and item.words in error["message"]
    for i, response in enumerate(responses):
        if i != 2:
            assert response.status_code == 200, response.text[:300]
            assert is_right(response.json())


def test_no_worker_was_restarted_by_the_corpus(torchserve, pids_at_start):
    for model, pids in pids_at_start.items():
        assert worker_pids(torchserve, model) == pids, model
