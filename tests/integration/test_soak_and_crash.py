"""Load, soak and a killed worker on the real TorchServe (quickstart model).

Named to run last among the integration tests: it kills a worker."""

import os
import signal
import threading
import time

import pytest
import requests

from bench.soak import request_for, soak

from .helpers import worker_pids

pytestmark = pytest.mark.integration

SOAK_REQUESTS = int(os.environ.get("SOAK_REQUESTS", "3000"))


def test_soak_with_identity_check_loses_and_mixes_nothing(torchserve):
    result = soak(torchserve, total=SOAK_REQUESTS, concurrency=64, bad_every=10)
    assert result["lost"] == 0 and result["mixed"] == 0 and result["unexpected_5xx"] == 0, result
    assert result["wrong_status"] == result["wrong_answer"] == result["wrong_error_body"] == 0, result
    assert result["ok_good"] + result["ok_bad"] == SOAK_REQUESTS
    assert result["ok_bad"] == SOAK_REQUESTS // 10
    # Flat memory: a leak of even 10 KiB per request would show as 30 MiB here.
    assert result["worker_rss_end_mib"] - result["worker_rss_start_mib"] < 30, result


@pytest.mark.timeout(240)
def test_a_killed_worker_is_restarted_only_in_flight_requests_fail_and_service_recovers(torchserve):
    [pid] = worker_pids(torchserve, "quickstart")
    url = f"{torchserve.inference_url}/predictions/quickstart"
    headers = {"Content-Type": "application/json", **torchserve.auth()}
    stop = threading.Event()
    killed_at = []
    log = []  # (sent_at, answered_at, status)
    lock = threading.Lock()

    def client(index):
        session = requests.Session()
        n = index
        while not stop.is_set():
            body, _, want = request_for(n, bad_every=0)
            n += 8
            sent = time.monotonic()
            try:
                response = session.post(url, data=body, headers=headers, timeout=60)
                status = response.status_code if response.status_code != 200 or response.json() == want else -1
            except requests.RequestException:
                status = 0
            with lock:
                log.append((sent, time.monotonic(), status))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(2)  # load running before the kill (a timed window, not a synchronisation)
        killed_at.append(time.monotonic())
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 120
        recovered = None
        while recovered is None and time.monotonic() < deadline:
            with lock:
                after = [entry for entry in log if entry[0] > killed_at[0] and entry[2] == 200]
            if after:
                recovered = min(entry[1] for entry in after)
            else:
                time.sleep(0.2)
        time.sleep(2)  # keep the load on a little after recovery
    finally:
        stop.set()
        for thread in threads:
            thread.join(90)
    assert recovered is not None, "no successful answer within 120 s of the kill"
    recovery_s = recovered - killed_at[0]
    failures = [entry for entry in log if entry[2] != 200]
    assert all(status != -1 for _, _, status in log), "a successful answer was wrong"
    # Only what was in flight (one batch, at most the 8 clients' requests) may fail.
    assert len(failures) <= 8, failures
    assert all(sent < recovered for sent, _, _ in failures)
    new_pids = worker_pids(torchserve, "quickstart")
    assert new_pids and pid not in new_pids
    print(f"\nworker killed: {len(failures)} in-flight requests failed, recovered in {recovery_s:.2f} s")
    (torchserve.workdir / "crash_recovery.txt").write_text(f"{recovery_s:.3f} s, {len(failures)} failed\n")
