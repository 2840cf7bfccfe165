"""Logs a user can act on (issue 19, item 5): each error once, naming its requests by the id the
server gave them (sent back as X-Request-Id): a 5xx at ERROR with its traceback, a 4xx at DEBUG;
in a TorchServe worker each record keeps its level."""

import io
import logging

import pytest

from handlers import BadRequest
from handlers.servers.torchserve import REQUEST_ID_HEADER, log_with_levels
from handlers.testing import run_batch, start_handler

from .models import AffineHandler


class Picky(AffineHandler):
    def preprocess_one(self, request):
        if request.json() == "bad":
            raise BadRequest("bad input")
        return super().preprocess_one(request)

    def postprocess_one(self, output, item):
        if float(item[0]) == 99.0:
            raise ZeroDivisionError("a bug in postprocessing")
        return output.tolist()


@pytest.fixture
def handler():
    handler = start_handler(Picky, handler_config={"micro_batch_size": 2, "pool_size": 2})
    yield handler
    handler.close()


def test_errors_are_logged_once_with_the_request_id_5xx_at_error_with_traceback_4xx_at_debug(handler, caplog):
    with caplog.at_level(logging.DEBUG, logger="handlers"):
        _, context = run_batch(handler, [[1, 2, 3, 4], [99, 0, 0, 0], b'"bad"'])
    assert context.statuses() == [200, 500, 400]
    records = [r for r in caplog.records if r.name == "handlers.engine.batch_engine"]
    [server_error] = [r for r in records if r.levelno == logging.ERROR]
    [client_error] = [r for r in records if r.levelno == logging.DEBUG and "400" in r.getMessage()]
    assert server_error.getMessage().startswith("request request-1 (of a batch of 3): 500 PostprocessFailed: ")
    assert "Traceback (most recent call last)" in server_error.getMessage()
    assert "ZeroDivisionError: a bug in postprocessing" in server_error.getMessage()
    assert client_error.getMessage() == "request request-2 (of a batch of 3): 400 BadRequest: bad input"
    for idx in range(3):  # the id a client quotes is the id the log names
        assert context.get_response_headers(idx)[REQUEST_ID_HEADER] == f"request-{idx}"


def test_a_clean_batch_logs_no_error(handler, caplog):
    with caplog.at_level(logging.DEBUG, logger="handlers"):
        run_batch(handler, [[1, 2, 3, 4]] * 3)
    assert not [r for r in caplog.records if r.name == "handlers.engine.batch_engine" and "request " in r.getMessage()]


def test_in_a_torchserve_worker_records_keep_their_level_errors_on_stderr(monkeypatch):
    """Regression: TorchServe's worker prints records as the bare message on stdout, filed at INFO
    in model_log.log: a handler's 500 read as INFO, with no level."""
    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setattr("sys.stdout", out)
    monkeypatch.setattr("sys.stderr", err)
    logger = logging.getLogger("handlers")
    before = (list(logger.handlers), logger.level, logger.propagate)
    # As in a fresh worker: no handler from an earlier test's start-up, loggers enabled (a
    # library's dictConfig may have disabled them).
    logger.handlers[:] = []
    for name in ("handlers.engine.batch_engine", "handlers.core.handler"):
        monkeypatch.setattr(logging.getLogger(name), "disabled", False)
    try:
        log_with_levels()
        log_with_levels()  # idempotent: one pair of handlers
        logging.getLogger("handlers.engine.batch_engine").error("request r-1 (of a batch of 1): 500 ...")
        logging.getLogger("handlers.core.handler").info("ready")
        logging.getLogger("handlers.engine.batch_engine").debug("request r-2: 400 (hidden at the default level)")
    finally:
        logger.handlers[:], logger.level, logger.propagate = before
    assert err.getvalue() == "ERROR handlers.engine.batch_engine: request r-1 (of a batch of 1): 500 ...\n"
    assert out.getvalue() == "INFO handlers.core.handler: ready\n"
