"""Safe defaults that need no server: configuration, limits, weights loading, lifecycle."""

import gc
import pickle
import resource
import threading
from pathlib import Path

import pytest

from handlers import ImageClassifierHandler, ImageLimits, MicroBatchHandler, TensorSpec
from handlers.testing import run_batch, start_handler
from scripts.torchserve_instance import read_properties

from .models import AffineHandler

ROOT = Path(__file__).resolve().parents[2]


def test_config_properties_binds_to_loopback_keeps_auth_on_and_the_model_api_off():
    props = read_properties(ROOT / "config.properties")
    for key in ("inference_address", "management_address", "metrics_address"):
        assert props[key].startswith("http://127.0.0.1:"), key
    assert props["grpc_inference_address"] == props["grpc_management_address"] == "127.0.0.1"
    assert props.get("disable_token_authorization", "false") == "false"
    assert props["enable_model_api"] == "false"
    assert 0 < int(props["max_request_size"]) <= 64 * 2**20
    assert props["install_py_dep_per_model"] == "false"


def test_pixel_byte_and_element_limits_are_on_by_default():
    assert ImageLimits().max_pixels == ImageClassifierHandler.options["max_pixels"] == 40_000_000
    assert ImageLimits().max_bytes == ImageClassifierHandler.options["max_bytes"] == 16 * 2**20
    assert TensorSpec().max_elements == 1_000_000
    assert TensorSpec().allow_non_finite is False


class _Exploit:
    """A pickle that runs code when loaded without weights_only."""

    marker = None

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_weights_are_loaded_with_weights_only_so_a_pickle_exploit_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    _Exploit.marker = marker
    (tmp_path / "net.py").write_text(
        "import torch\nclass Net(torch.nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n        self.linear = torch.nn.Linear(4, 4)\n"
    )
    with open(tmp_path / "weights.pt", "wb") as f:
        pickle.dump({"linear.weight": _Exploit()}, f)
    with pytest.raises(pickle.UnpicklingError):
        start_handler(MicroBatchHandler, model_dir=tmp_path,
                      manifest={"model": {"modelFile": "net.py", "serializedFile": "weights.pt"}})
    assert not marker.exists()


def pool_threads():
    return [t for t in threading.enumerate() if t.name.startswith("microbatch-")]


def test_50_load_unload_cycles_leave_no_thread_and_no_memory_behind():
    before_threads = len(pool_threads())

    def cycle():
        handler = start_handler(AffineHandler, handler_config={"pool_size": 3, "micro_batch_size": 2})
        run_batch(handler, [[float(i)] * 4 for i in range(8)])
        handler.close()

    for _ in range(5):  # warm-up: allocator and import caches settle
        cycle()
    gc.collect()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(50):
        cycle()
    gc.collect()
    assert len(pool_threads()) == before_threads
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    assert grown_mib < 20, f"peak RSS grew by {grown_mib:.1f} MiB over 50 cycles"
