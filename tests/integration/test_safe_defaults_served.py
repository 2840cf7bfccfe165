"""Safe defaults of config.properties, checked on the running TorchServe."""

import psutil
import pytest
import requests

pytestmark = pytest.mark.integration


def server_pid(torchserve):
    return int((torchserve.tmp / ".model_server.pid").read_text().strip())


def test_every_listening_socket_is_on_loopback(torchserve):
    process = psutil.Process(server_pid(torchserve))
    listening = [c.laddr for c in process.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    assert len(listening) >= 5  # inference, management, metrics, two gRPC
    assert {address.ip.removeprefix("::ffff:") for address in listening} == {"127.0.0.1"}


def test_model_registration_over_the_api_is_off(torchserve):
    response = requests.post(
        f"{torchserve.management_url}/models", params={"url": "https://example.com/evil.mar"},
        headers=torchserve.auth("management"), timeout=30,
    )
    assert response.status_code in (400, 403, 405), response.text
    assert "evil" not in requests.get(f"{torchserve.management_url}/models", headers=torchserve.auth("management"),
                                      timeout=30).text


def test_the_management_api_refuses_calls_without_its_token(torchserve):
    assert requests.get(f"{torchserve.management_url}/models", timeout=30).status_code in (400, 401, 403)
    assert requests.get(f"{torchserve.management_url}/models", headers=torchserve.auth("management"),
                        timeout=30).status_code == 200


def test_a_body_over_the_request_size_limit_is_refused_and_the_worker_lives_on(torchserve):
    url = f"{torchserve.inference_url}/predictions/digits"
    too_big = requests.post(url, data=b"\xff" * (17 * 2**20), headers=torchserve.auth(), timeout=60)
    assert too_big.status_code == 413
    after = requests.post(url, data=b"not an image", headers=torchserve.auth(), timeout=60)
    assert after.status_code == 415
