"""Regressions from a new user's trial of main (issue 31, "The journey, round 3"): each test
names what the user met."""

import subprocess

from tests.docs_blocks import ROOT


def test_make_serve_passes_serve_args_to_the_serve_script():
    """`make serve` had no way to ask for free ports: the Makefile passed no arguments through."""
    dry_run = subprocess.run(["make", "-n", "serve", "SERVE_ARGS=--free-ports --workdir /tmp/x"], cwd=ROOT,
                             capture_output=True, text=True, check=True)
    [serve] = [line for line in dry_run.stdout.splitlines() if "-m scripts.serve" in line]
    assert serve.endswith("-m scripts.serve --free-ports --workdir /tmp/x"), serve
    readme = (ROOT / "README.md").read_text()
    assert "make serve\nSERVE_ARGS=--free-ports" in readme or "make serve SERVE_ARGS=--free-ports" in readme


def test_every_torchserve_the_docs_start_or_stop_has_a_tmpdir_of_its_own():
    """The walkthrough ended with a bare `torchserve --stop`: with the default TMPDIR it stops
    whichever TorchServe's pid file is in /tmp, perhaps someone else's."""
    from tests.docs_blocks import all_blocks

    commands = []
    for block in all_blocks():
        for command in block.text.replace("\\\n", " ").splitlines():
            if "torchserve --st" in command:
                commands.append((block.where(), command))
    assert any("--stop" in command for _, command in commands)
    for where, command in commands:
        assert "TMPDIR=" in command.split("torchserve --st")[0], f"{where}: {command}"


def test_every_problem_of_an_archiver_config_is_reported_in_one_run(tmp_path):
    """`handler.Scale` was reported only after `sample:` and `batchsize` had been fixed: a wrong
    TorchServe key skipped the handler: section's check, and that check stopped at its first
    problem."""
    import pytest
    import yaml

    from handlers.packaging.archive import ArchiveConfigError, load_spec

    config = yaml.safe_load((ROOT / "archiver_configs" / "quickstart.yaml").read_text())
    config["sample"] = config.pop("samples")
    config["model_config"] = {"batchsize": 8, "responseTimeout": 60,
                              "handler": {"Scale": 2.0, "micro_batch_size": 0, "pool_size": 0, "precision": "fp8",
                                          "invariance_rtol": "small", "torch_threads": -1}}
    config["ray_serve"] = {"num_replica": 2, "max_ongoing_requests": 0}
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ArchiveConfigError) as caught:
        load_spec(path, ROOT)
    lines = str(caught.value).splitlines()
    for words in ["sample: not a known key (did you mean 'samples'?)",
                  "model_config.batchsize: not a key TorchServe reads (did you mean 'batchSize'?)",
                  "handler.Scale is not a known setting",
                  "handler.micro_batch_size must be an integer >= 1",
                  "handler.pool_size must be an integer >= 1",
                  "handler.precision must be one of",
                  "handler.invariance_rtol must be of type float",
                  "handler.torch_threads must be >= 0",
                  "ray_serve.num_replica is not a known setting",
                  "ray_serve.max_ongoing_requests must be an integer >= 1"]:
        assert sum(words in line for line in lines) == 1, (words, lines)
    assert len(lines) == 10, lines
    assert all(line.startswith(f"{path}: ") for line in lines)


def test_a_worker_that_cannot_start_names_every_problem_of_its_handler_section_on_one_line():
    from handlers.core.handler import MicroBatchHandler
    from handlers.engine.errors import startup_failure_line
    from handlers.engine.settings import ConfigError

    import pytest

    with pytest.raises(ConfigError) as caught:
        MicroBatchHandler.read_config({"pool_size": 0, "precision": "fp8"})
    line = startup_failure_line("m", caught.value)
    assert "\n" not in line and "handler.pool_size must be" in line and "; handler.precision must be" in line


def test_check_prints_the_self_tests_summary_once_with_one_sample(tmp_path, capsys, caplog):
    """With one sample the summary is a warning, and the handler's log printed it beside the
    command's own line: twice."""
    import logging

    import yaml

    from handlers.archive import main

    config = yaml.safe_load((ROOT / "archiver_configs" / "quickstart.yaml").read_text())
    config["samples"] = ["examples/quickstart/samples/a.json"]
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump(config))
    with caplog.at_level(logging.INFO):
        assert main([str(path), "--root", str(ROOT), "--check"]) == 0
    printed = capsys.readouterr()
    shown = printed.out + printed.err + caplog.text
    assert shown.count("self-test: 1 sample(s)") == 1, shown
    assert "quickstart: self-test: 1 sample(s)" in printed.out


def png_bytes(width, height):
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 20, 30)).save(buffer, "PNG")
    return buffer.getvalue()


def test_decode_image_gives_an_array_torch_takes_without_a_warning():
    """The public decode_image returned a read-only array: torch.from_numpy warned."""
    import warnings

    import torch

    from handlers import decode_image

    pixels = decode_image(png_bytes(64, 48))
    assert pixels.flags.writeable and pixels.shape == (224, 224, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.from_numpy(pixels).add_(1)


def test_decode_image_can_keep_the_full_frame_or_skip_the_crop():
    """decode_image always resized and centre-cropped: a full-frame model had to import
    internal helpers."""
    import pytest

    from handlers import ImageGeometry, decode_image

    assert decode_image(png_bytes(640, 480), ImageGeometry.full_frame()).shape == (480, 640, 3)
    assert decode_image(png_bytes(640, 480), ImageGeometry(resize=240, crop=None)).shape == (240, 320, 3)
    assert decode_image(png_bytes(640, 480), ImageGeometry(resize=None, crop=100)).shape == (100, 100, 3)
    with pytest.raises(ValueError, match="ImageGeometry.crop must be"):
        ImageGeometry(crop=0)


def test_a_model_file_that_imports_its_model_class_is_accepted(tmp_path):
    """A model_file saying `from nets import Net` was refused with "found none"."""
    import pytest

    from handlers.core.loading import build_module

    (tmp_path / "nets.py").write_text(
        "import torch\n\nclass Block(torch.nn.Module):\n    pass\n\n"
        "class Net(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n"
        "        self.linear = torch.nn.Linear(2, 2)\n")
    (tmp_path / "model.py").write_text("import torch\nfrom torch.nn import Linear\nfrom nets import Net\n")
    model = build_module(str(tmp_path / "model.py"))
    assert type(model).__name__ == "Net" and isinstance(model.linear, __import__("torch").nn.Linear)

    (tmp_path / "model_two.py").write_text("from nets import Block, Net\n")
    with pytest.raises(RuntimeError, match=r"found none \(it imports Block, Net: import only the model"):
        build_module(str(tmp_path / "model_two.py"))
    (tmp_path / "model_own.py").write_text("import torch\nfrom nets import Block\n\n"
                                           "class Own(torch.nn.Module):\n    pass\n")
    assert type(build_module(str(tmp_path / "model_own.py"))).__name__ == "Own"  # its own class first


HANDLER_WITH_A_DATACLASS = '''from dataclasses import dataclass

import torch

from handlers import MicroBatchHandler


@dataclass(frozen=True)
class Item:
    x: torch.Tensor
    scale: float


class MyHandler(MicroBatchHandler):
    def preprocess_one(self, request):
        payload = request.json()
        return Item(torch.tensor(payload["x"], dtype=torch.float32), payload.get("scale", 1.0))

    def collate(self, items):
        return super().collate([item.x for item in items])

    def postprocess_one(self, output, item):
        return {"y": (item.scale * output).tolist()}
'''


def test_a_dataclass_beside_the_handler_class_is_allowed_everywhere_the_file_is_loaded(tmp_path):
    """A @dataclass for the per-request item broke the "one class per handler file" rule: the
    check, the archive's entry (TorchServe) and the loader (Ray Serve, the test kit) now pick
    the one MicroBatchHandler subclass."""
    import shutil

    import yaml

    from handlers.core.handler_file import load_handler_class
    from handlers.packaging.archive import load_spec
    from handlers.packaging.torchserve_entry import entry_points
    from handlers.testing import run_batch, start_handler

    project = tmp_path / "project"
    project.mkdir()
    (project / "my_handler.py").write_text(HANDLER_WITH_A_DATACLASS)
    for name in ("model.py",):
        shutil.copy2(ROOT / "examples" / "quickstart" / name, project / name)
    shutil.copy2(ROOT / "build" / "quickstart" / "weights.pt", project / "weights.pt")
    config = yaml.safe_load((ROOT / "archiver_configs" / "quickstart.yaml").read_text())
    config.update(root=".", handler="my_handler.py", model_file="model.py", serialized_file="weights.pt")
    for key in ("build", "samples"):
        config.pop(key)
    (project / "model.yaml").write_text(yaml.safe_dump(config))
    assert load_spec(project / "model.yaml").handler.name == "my_handler.py"  # the check passes

    assert load_handler_class(str(project / "my_handler.py")).__name__ == "MyHandler"
    served = entry_points("my_handler_entry", str(project / "my_handler_entry.py"), "my_handler.py")
    assert list(served) == ["MyHandler"]
    served_class = served["MyHandler"]
    assert served_class.__module__ == "my_handler_entry"  # TorchServe's one class in the entry module
    handler = start_handler(served_class, model_dir=project, model_file="model.py", serialized_file="weights.pt")
    try:
        responses, _ = run_batch(handler, [b'{"x": [1, 2, 3, 4], "scale": 2}', b'{"x": [0, 0, 0, 0]}'])
    finally:
        handler.close()
    assert responses == [{"y": [6.0, 10.0, 14.0, 18.0]}, {"y": [1.0, 1.0, 1.0, 1.0]}]


def test_the_curl_line_for_a_users_own_model_names_a_content_type_and_sends_its_sample(tmp_path):
    """For a model that is not an example, scripts.serve printed a curl line without a
    Content-Type: curl posted a form, and TorchServe answered a PNG or .npy body with a 500
    ErrorDataDecoderException. Now the archive's own sample goes with its type."""
    import shlex

    from handlers.packaging.archive import archive_config
    from scripts.serve import curl_for
    from scripts.torchserve_instance import TorchServe

    store = tmp_path / "model_store"
    config = ROOT / "archiver_configs" / "quickstart.yaml"
    archive_config(config, store, model_name="my_own_model")
    archive_config(config, store, model_name="no_samples", samples=[])
    server = TorchServe(tmp_path / "serve", store, ROOT / "config.properties")

    words = shlex.split(curl_for(server, "my_own_model"))
    assert words[words.index("-H", 2) + 1] == "Content-Type: application/json", words
    sent = next(word for word in words if word.startswith("@"))[1:]  # the archive's first sample, copied out
    assert sent.startswith(str(tmp_path / "serve" / "samples" / "my_own_model"))
    assert open(sent, "rb").read() == (ROOT / "examples/quickstart/samples/a.json").read_bytes()
    assert "-H 'Content-Type: application/octet-stream' --data-binary @YOUR_INPUT" in curl_for(server, "no_samples")


def test_an_answer_can_be_bytes_of_a_content_type_of_its_own():
    """A bytes answer always went out as application/octet-stream: there was no way to answer
    with image/png."""
    import pytest

    from handlers import RawAnswer
    from handlers.testing import FakeContext, LocalServer, start_handler

    from .models import AffineHandler

    class PngHandler(AffineHandler):
        def postprocess_one(self, output, item):
            if output[0] < 0:
                return RawAnswer(b"GIF89a", "image/gif")
            return RawAnswer(b"\x89PNG\r\n\x1a\n" + bytes([int(output[0])]), "image/png")

    handler = start_handler(PngHandler)
    try:
        context = FakeContext(handler.manifest)
        sent = handler.handle([{"body": b"[1, 2, 3, 4]"}, {"body": b"[-9, 0, 0, 0]"}, {"body": b"[1, 2, 3, 4]"}],
                              context)
    finally:
        handler.close()
    assert sent == [b"\x89PNG\r\n\x1a\n\x03", b"GIF89a", b"\x89PNG\r\n\x1a\n\x03"]
    assert [context.get_response_content_type(i) for i in range(3)] == ["image/png", "image/gif", "image/png"]

    with LocalServer.start(PngHandler) as server:  # the core's Response, as Ray Serve's adapter sends it
        [response] = server.send([b"[2, 0, 0, 0]"])
    assert (response.status, response.content_type, response.payload) == (200, "image/png", b"\x89PNG\r\n\x1a\n\x05")

    with pytest.raises(ValueError, match="media type"):
        RawAnswer(b"x", "image/png\r\nSet-Cookie: a=b")
    with pytest.raises(TypeError, match="must be bytes"):
        RawAnswer("text", "text/csv")


def test_assert_isolates_bad_request_allows_the_last_bits_of_a_float_to_differ():
    """assert_isolates_bad_request compared answers exactly by default: float features that
    differ by about 1e-7 between two runs (other kernels, other batch-mates) failed it."""
    import operator

    import pytest
    import torch

    from handlers.testing import assert_isolates_bad_request, assert_matches_alone, start_handler

    from .models import AffineHandler, affine_model

    class LastBits(torch.nn.Module):
        """y = 2x + 1, give or take a float32 rounding that changes from call to call."""

        def __init__(self):
            super().__init__()
            self.affine, self.calls = affine_model(), 0

        def forward(self, x):
            self.calls += 1
            return self.affine(x) * (1 + 2e-7 * (self.calls % 2))

    class LastBitsHandler(AffineHandler):
        def load_model(self, model_dir, device):
            return LastBits()

    handler = start_handler(LastBitsHandler)
    try:
        error = assert_isolates_bad_request(handler, [[1.0, 2.0, 3.0, 4.0], [0.5, 0.0, 0.0, 1.0]], b"{not json", 400)
        assert error["code"] == 400
        assert_matches_alone(handler, [[1.0, 2.0, 3.0, 4.0], [0.5, 0.0, 0.0, 1.0]])
        with pytest.raises(AssertionError, match="changed next to a bad one"):  # exact, when asked
            assert_isolates_bad_request(handler, [[1.0, 2.0, 3.0, 4.0]], b"{not json", 400, same=operator.eq)
    finally:
        handler.close()


def test_missing_weights_do_not_hide_the_handler_sections_problems(tmp_path):
    """The handler file imports without its weights: a missing serialized_file and a wrong
    handler: key are two errors of one run."""
    import pytest
    import yaml

    from handlers.packaging.archive import ArchiveConfigError, load_spec

    config = yaml.safe_load((ROOT / "archiver_configs" / "quickstart.yaml").read_text())
    config.pop("build")
    config["serialized_file"] = "build/quickstart/weigths.pt"
    config["model_config"]["handler"]["pool_sise"] = 2
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ArchiveConfigError) as caught:
        load_spec(path, ROOT)
    lines = str(caught.value).splitlines()
    assert len(lines) == 2, lines
    assert "serialized_file: " in lines[0] and "(did you mean 'weights.pt'?)" in lines[0]
    assert "handler.pool_sise is not a known setting" in lines[1] and "(did you mean 'pool_size'?)" in lines[1]
