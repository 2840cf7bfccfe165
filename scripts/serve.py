"""Serve every archive in model_store/ with config.properties, print a working curl command per
model, and stop TorchServe on Ctrl-C (or SIGTERM). Run through ``make serve``.

A model whose worker dies at start-up (weights that do not load, a ``load_model`` that raises, a
handler file that does not import, a module missing in the worker's Python) is reported within
seconds, on stderr, in one line from its worker, with no traceback::

    error: model broken cannot start: RuntimeError: weights.pt was saved for 8 features ...
    (tracebacks in .serve/logs/model_log.log)

Its worker stays up in a "cannot start" state (handlers.servers.torchserve.initialize): each
request to the model is answered at once with a 503 ``ModelCannotStart`` whose message is that
line. A worker that died before our code ran (no such line) is stopped instead (scaled to none:
TorchServe would restart it over and over, logging the traceback each time); its requests get
TorchServe's own 503. Then:

- every model failed: TorchServe is stopped and the exit status is 1, at once;
- some failed: the others are served as usual, with their curl commands, and when stopped the
  command says again which failed and exits with status 1;
- none failed: exit status 0 when stopped.

A model neither ready nor failed after ``READY_TIMEOUT_S`` (or a TorchServe that exits while
starting) ends the command with status 1 and the tail of TorchServe's log.

``--model-store``, ``--workdir`` and ``--free-ports`` serve other archives from another folder on
free ports (two instances side by side, tests); the defaults are ``make serve``'s, and ``make serve
SERVE_ARGS="--free-ports"`` passes them.
"""

from __future__ import annotations

import argparse
import mimetypes
import signal
import sys
import threading
from pathlib import Path
from typing import Optional

from scripts.torchserve_instance import Ports, TorchServe, read_properties

ROOT = Path(__file__).resolve().parent.parent


def sample_request(model: str):
    """The example's sample request (examples/<model>/sample.* or build/<model>/sample.*)."""
    samples = sorted((ROOT / "examples" / model).glob("sample.*")) + sorted((ROOT / "build" / model).glob("sample.*"))
    return samples[0] if samples else None


def archived_sample(mar: Path, folder: Path):
    """The first sample request an archive carries (``samples:`` of its config, see
    handlers.core.self_test), copied into ``folder``: ``(path, content type)``, or None."""
    import json
    import zipfile

    from handlers.core.self_test import SAMPLES_DIR, SAMPLES_INDEX

    try:
        with zipfile.ZipFile(mar) as archive:
            entry = json.loads(archive.read(f"{SAMPLES_DIR}/{SAMPLES_INDEX}"))[0]
            path = folder / Path(entry["file"]).name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(archive.read(f"{SAMPLES_DIR}/{entry['file']}"))
    except (KeyError, IndexError, TypeError, ValueError, OSError, zipfile.BadZipFile):  # none, or unreadable
        return None
    return path, entry.get("content_type")


def curl_for(server: TorchServe, model: str) -> str:
    """A curl command that sends the model a sample request: the example's, else the first the
    archive carries, else YOUR_INPUT. It always names a Content-Type: without one curl posts a
    form, and TorchServe answers a binary body (PNG, .npy) with a 500."""
    key = server.keys().get("inference", "<inference key from .serve/key_file.json>")
    url = f"{server.inference_url}/predictions/{model}"
    sample, content_type = sample_request(model), None
    if sample is None:
        sample, content_type = archived_sample(server.model_store / f"{model}.mar", server.workdir / "samples" / model) \
            or (None, None)
    if sample is None:
        return (f"curl -H 'Authorization: Bearer {key}' -H 'Content-Type: application/octet-stream' "
                f"--data-binary @YOUR_INPUT {url} -w '\\n'")
    content_type = content_type or mimetypes.guess_type(sample.name)[0] or "application/octet-stream"
    return (
        f"curl -H 'Authorization: Bearer {key}' -H 'Content-Type: {content_type}' "
        f"--data-binary @{shown(sample)} {url} -w '\\n'"  # -w: the answer ends its line
    )


def shown(path: Path) -> str:
    """``path`` relative to the checkout when inside it (as a user of ``make serve`` types it)."""
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


def failure_reporter(server: TorchServe):
    """``on_failure`` for :meth:`TorchServe.wait_started`: print the model's line; stop its
    workers at once where they died (TorchServe would restart them, logging the traceback each
    time), not where the worker stays up answering 503 with the line."""

    def report(model: str, reason: str) -> None:
        print(f"error: model {model} cannot start: {reason}", file=sys.stderr, flush=True)
        if server.worker_stays_up(model):
            return
        try:
            server.stop_model(model)
        except (RuntimeError, OSError) as exc:
            print(f"warning: TorchServe keeps restarting {model}'s worker: {exc}", file=sys.stderr, flush=True)

    return report


def parse_args(argv: Optional[list]) -> argparse.Namespace:
    config = ROOT / "config.properties"
    parser = argparse.ArgumentParser(prog="python -m scripts.serve", description=__doc__.split("\n\n")[0])
    default_store = ROOT / read_properties(config).get("model_store", "model_store")
    parser.add_argument("--model-store", type=Path, default=default_store,
                        help="the folder of .mar files to serve (default: config.properties' model_store)")
    parser.add_argument("--workdir", type=Path, default=ROOT / ".serve",
                        help="TorchServe's folder: logs, key file, temp dirs (default: .serve)")
    parser.add_argument("--free-ports", action="store_true", help="free ports instead of config.properties' ones")
    args = parser.parse_args(argv)
    args.config = config
    return args


def main(argv: Optional[list] = None) -> int:
    args = parse_args(argv)
    models = sorted(p.stem for p in args.model_store.glob("*.mar"))
    if not models:
        print(f"no archives in {args.model_store}: run `make archives` first", file=sys.stderr)
        return 1
    server = TorchServe(args.workdir, args.model_store, args.config, ports=Ports.free() if args.free_ports else None)
    server.stop()  # a TorchServe left by an earlier run in this workdir, if any
    # SIGTERM stops us as Ctrl-C does, at any point (while waiting for the models too). SIGINT is
    # set too: a shell starts a background job (`make serve &`) with it ignored, and Python then
    # leaves it ignored, so `kill -INT` would not stop the server.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.default_int_handler)
    failed = {}
    try:
        print(f"starting TorchServe with {args.config.name}: {', '.join(models)}", flush=True)
        server.start()
        try:
            failed = server.wait_started(models, on_failure=failure_reporter(server))
        except RuntimeError as exc:  # timed out, or TorchServe exited: the log's tail is all there is
            print(f"error: {exc}", file=sys.stderr, flush=True)
            return 1
        if failed:
            print(f"(tracebacks in {shown(server.model_log_path)})", file=sys.stderr, flush=True)
        serving = [m for m in models if m not in failed]
        if not serving:
            return 1
        print(f"\nready: inference {server.inference_url}, metrics {server.metrics_url}/metrics")
        print(f"tokens are in {shown(server.workdir / 'key_file.json')}\n")
        for model in serving:
            print(f"# {model}\n{curl_for(server, model)}\n")
        if failed:
            print(f"not serving {', '.join(failed)} (cannot start, see above)")
        print("Ctrl-C stops TorchServe.", flush=True)
        threading.Event().wait()  # until Ctrl-C or SIGTERM
    except KeyboardInterrupt:
        pass
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C does not cut the stop short
            signal.signal(sig, signal.SIG_IGN)
        print("stopping TorchServe", flush=True)
        server.stop()
    if failed:
        print(f"error: {', '.join(failed)} could not start (exit status 1)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
