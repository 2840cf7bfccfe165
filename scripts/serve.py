"""Serve every archive in model_store/ with config.properties, print a working curl command per
model, and stop TorchServe on Ctrl-C (or SIGTERM). Run through ``make serve``.
"""

import mimetypes
import signal
import sys
import threading
from pathlib import Path

from scripts.torchserve_instance import TorchServe, read_properties

ROOT = Path(__file__).resolve().parent.parent


def sample_request(model: str):
    """The example's sample request (examples/<model>/sample.* or build/<model>/sample.*)."""
    samples = sorted((ROOT / "examples" / model).glob("sample.*")) + sorted((ROOT / "build" / model).glob("sample.*"))
    return samples[0] if samples else None


def curl_for(server: TorchServe, model: str) -> str:
    sample = sample_request(model)
    key = server.keys().get("inference", "<inference key from .serve/key_file.json>")
    url = f"{server.inference_url}/predictions/{model}"
    if sample is None:
        return f"curl -H 'Authorization: Bearer {key}' {url} --data-binary @YOUR_INPUT"
    content_type = mimetypes.guess_type(sample.name)[0] or "application/octet-stream"
    return (
        f"curl -H 'Authorization: Bearer {key}' -H 'Content-Type: {content_type}' "
        f"--data-binary @{sample.relative_to(ROOT)} {url}"
    )


def main() -> int:
    config = ROOT / "config.properties"
    model_store = ROOT / read_properties(config).get("model_store", "model_store")
    models = sorted(p.stem for p in model_store.glob("*.mar"))
    if not models:
        print(f"no archives in {model_store}: run `make archives` first", file=sys.stderr)
        return 1
    server = TorchServe(ROOT / ".serve", model_store, config)
    server.stop()  # a TorchServe left by an earlier `make serve` of this checkout, if any
    print(f"starting TorchServe with {config.name}: {', '.join(models)}", flush=True)
    server.start()
    stopped = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopped.set())
    try:
        server.wait_ready(models)
        print(f"\nready: inference {server.inference_url}, metrics {server.metrics_url}/metrics")
        print(f"tokens are in {server.workdir / 'key_file.json'}\n")
        for model in models:
            print(f"# {model}\n{curl_for(server, model)}\n")
        print("Ctrl-C stops TorchServe.", flush=True)
        stopped.wait()
    finally:
        print("stopping TorchServe", flush=True)
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
