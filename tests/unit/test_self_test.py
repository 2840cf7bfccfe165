"""The start-up self-test on samples: the batch layout proven on the model, and a model whose
answers change with their batch-mates refused in one line (in-process, by the archive check and
through the TorchServe adapter)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from handlers import ConfigError, MicroBatchHandler
from handlers.core.self_test import SAMPLES_DIR, SelfTestFailed
from handlers.testing import LocalServer

from .models import AffineHandler

ROOT = Path(__file__).resolve().parents[2]
ROWS = [[1.0, 2.0, 3.0, 4.0], [-1.0, 0.5, 0.0, 8.0], [3.0, 3.0, -2.0, 1.0]]


def affine(row):
    return [2 * v + 1 for v in row]


class SequenceFirst(AffineHandler):
    """Answers (T, B, 4): a sequence-first output, T time steps of y + t."""

    options = {"steps": 2}

    def infer(self, batch):
        y = super().infer(batch)
        return torch.stack([y + t for t in range(self.config["steps"])])

    def postprocess_one(self, output, item):
        return output.tolist()


class MixesTheBatch(AffineHandler):
    """Subtracts the batch mean: every answer depends on its batch-mates."""

    def infer(self, batch):
        y = super().infer(batch)
        return y - y.mean(dim=0, keepdim=True)


def test_samples_teach_the_sequence_first_layout_even_when_steps_equal_the_micro_batch_size():
    """Regression: a (T, B, D) output with T == micro-batch size was cut along T, handing each
    request one time step of every request."""
    config = {"micro_batch_size": 2, "pool_size": 2, "steps": 2}
    with LocalServer.start(SequenceFirst, handler_config=config, samples=ROWS) as server:
        assert server.handler.self_test.layout_learned
        responses = server.send(ROWS + ROWS[:1])
        calls_before = server.handler.self_test.model_calls
    assert [r.status for r in responses] == [200] * 4
    for row, response in zip(ROWS + ROWS[:1], responses):
        assert response.body == [[v + t for v in affine(row)] for t in range(2)]
    # three samples alone, together at 2 and 3 (2 is the micro-batch size), blank and noise at 3,
    # and a shorter input (half of a row), which this model refuses: it takes one length only
    assert calls_before == 3 + 2 + 2 + 1


def test_a_model_that_mixes_the_batch_is_refused_at_start_naming_the_sample_and_the_field():
    with pytest.raises(SelfTestFailed) as refused:
        LocalServer.start(MixesTheBatch, handler_config={"micro_batch_size": 4}, samples=ROWS)
    message = str(refused.value)
    assert "\n" not in message
    assert re.search(r"^self-test: sample #\d answers differently beside other requests \(micro-batch of \d, "
                     r"position \d\): answer\[\d\] is 0\.0 alone and -?[\d.]+ together", message), message
    assert "training mode" in message


def test_a_declaration_that_samples_contradict_is_refused():
    config = {"batch_dims": {"output": 0}, "steps": 3}
    with pytest.raises(SelfTestFailed) as refused:
        LocalServer.start(SequenceFirst, handler_config=config, samples=ROWS)
    assert "output is declared with batch dimension 0" in str(refused.value)


def test_a_sample_the_handler_refuses_is_named():
    with pytest.raises(SelfTestFailed) as refused:
        LocalServer.start(AffineHandler, samples=[ROWS[0], "not numbers"])
    assert "sample #1 is refused by preprocess_one" in str(refused.value)


def test_the_tolerance_is_a_setting():
    class Jitter(AffineHandler):
        def infer(self, batch):
            return super().infer(batch) + 0.05 * (batch.shape[0] > 1)

    with pytest.raises(SelfTestFailed):
        LocalServer.start(Jitter, samples=ROWS)
    with LocalServer.start(Jitter, samples=ROWS, handler_config={"invariance_atol": 0.1}) as server:
        assert server.send([ROWS[0]])[0].status == 200
    with pytest.raises(ConfigError, match="invariance_atol must be >= 0"):
        LocalServer.start(Jitter, handler_config={"invariance_atol": -1.0})


MIXING_MODEL = '''import torch


class Centred(torch.nn.Module):
    """A layer that subtracts the batch mean (as BatchNorm in training mode does)."""

    def forward(self, x):
        return x - x.mean(dim=0, keepdim=True)
'''
MIXING_HANDLER = "from handlers import MicroBatchHandler\n\n\nclass Mixing(MicroBatchHandler):\n    pass\n"


def write_mixing_project(folder: Path) -> Path:
    """A user's project whose model mixes the batch, with samples: what the check must refuse."""
    (folder / "samples").mkdir(parents=True)
    (folder / "model.py").write_text(MIXING_MODEL)
    (folder / "handler.py").write_text(MIXING_HANDLER)
    for i, row in enumerate(ROWS):
        (folder / "samples" / f"row{i}.json").write_text(json.dumps(row))
    config = {"model_name": "mixing", "version": "1.0", "handler": "handler.py", "model_file": "model.py",
              "samples": ["samples"], "model_config": {"batchSize": 8, "handler": {"micro_batch_size": 4}}}
    path = folder / "mixing.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_the_archive_check_runs_the_self_test_and_refuses_a_batch_mixing_model(tmp_path):
    config = write_mixing_project(tmp_path / "project")
    result = subprocess.run([sys.executable, "-m", "handlers.archive", "--check", str(config)],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 2, result.stdout + result.stderr
    [line] = result.stderr.strip().splitlines()
    assert re.match(rf"error: {re.escape(str(config))}: the model cannot start: self-test: sample samples/row\d.json "
                    rf"answers differently beside other requests", line), line


def test_the_archive_check_reports_the_self_test_of_a_good_model(tmp_path):
    result = subprocess.run([sys.executable, "-m", "handlers.archive", "--check",
                             str(ROOT / "archiver_configs" / "quickstart.yaml")],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    assert "quickstart: self-test: 3 sample(s) alone and together" in result.stdout
    assert "batch layout learned (derived inputs included), answers batch-invariant" in result.stdout


def test_the_archive_carries_the_samples_and_the_worker_refuses_a_mixing_model(tmp_path):
    """Through the TorchServe adapter, from the .mar: the worker logs the one start-up line."""
    from handlers.archive import main
    from handlers.testing import start_archived_handler

    config = write_mixing_project(tmp_path / "project")
    assert main([str(config), "--model-store", str(tmp_path / "store")]) == 0
    with pytest.raises(SelfTestFailed):
        start_archived_handler(tmp_path / "store" / "mixing.mar", tmp_path / "unpacked")
    assert (tmp_path / "unpacked" / SAMPLES_DIR / "samples.json").is_file()


def test_a_sample_size_that_runs_out_of_memory_is_skipped_not_fatal():
    class Small(AffineHandler):
        def infer(self, batch):
            if batch.shape[0] > 2:
                raise MemoryError("CUDA out of memory (simulated)")
            return super().infer(batch)

    with LocalServer.start(Small, samples=ROWS, handler_config={"micro_batch_size": 2}) as server:
        assert server.handler.self_test.sizes == (1, 2)
        assert [r.body for r in server.send(ROWS[:2])] == [affine(row) for row in ROWS[:2]]


class PadsTheMicroBatch(MicroBatchHandler):
    """Variable-length requests padded to the micro-batch's longest in collate, trimmed back in
    postprocess_one: the raw output depends on the longest batch-mate, the answers do not."""

    def load_model(self, model_dir, device):
        return torch.nn.Identity()

    def preprocess_one(self, request):
        return torch.tensor(request.json()["values"], dtype=torch.float32)

    def collate(self, items):
        return torch.nn.utils.rnn.pad_sequence(items, batch_first=True)

    def infer(self, batch):
        return {"y": 3 * batch - 1, "mean": batch.mean(dim=1)}  # the mean counts the padding: leaks

    def postprocess_one(self, output, item):
        return {"y": output["y"][: len(item)].tolist()}


VARIABLE = [{"values": [1.0, 2.0, 3.0]}, {"values": [5.0]}, {"values": [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 7.0]}]


def test_answers_are_compared_as_clients_get_them_so_padding_trimmed_by_postprocess_passes():
    """From the new-user trial: padding in collate and trimming in postprocess_one is correct,
    but the self-test compared the raw split outputs (shape [3] alone, [7] together) and refused
    the model, blaming 'padding that leaks'."""
    with LocalServer.start(PadsTheMicroBatch, handler_config={"micro_batch_size": 3}, samples=VARIABLE) as server:
        responses = server.send(VARIABLE * 2)
        summary = server.handler.self_test.summary()
    assert [r.status for r in responses] == [200] * 6
    assert [r.body for r in responses] == [{"y": [3 * v - 1 for v in body["values"]]} for body in VARIABLE * 2]
    assert "answers batch-invariant" in summary


def test_padding_that_leaks_into_an_answer_is_still_refused():
    class MeanOfPadded(PadsTheMicroBatch):
        def postprocess_one(self, output, item):
            return {"y": output["y"][: len(item)].tolist(), "mean": output["mean"].item()}

    with pytest.raises(SelfTestFailed, match=r"answer\['mean'\] is [\d.]+ alone and [\d.]+ together"):
        LocalServer.start(MeanOfPadded, handler_config={"micro_batch_size": 3}, samples=VARIABLE).close()


@pytest.mark.parametrize("samples", [ROWS[:1], ROWS[:1] * 3])
def test_one_sample_or_copies_of_one_say_that_batch_invariance_was_not_tested(samples, caplog):
    """From the new-user trial: a model mixing its batch passed with one sample, or with copies
    of one (every batch-mate is the sample itself), and the summary said 'answers batch-invariant'."""
    with caplog.at_level("WARNING", logger="handlers"):
        with LocalServer.start(MixesTheBatch, samples=samples) as server:
            summary = server.handler.self_test.summary()
    assert "batch invariance NOT tested: it needs at least 2 different samples" in summary
    assert "answers batch-invariant" not in summary
    assert any(r.levelname == "WARNING" and "NOT tested" in r.getMessage() for r in caplog.records)
    with pytest.raises(SelfTestFailed):  # two different samples show it
        LocalServer.start(MixesTheBatch, samples=ROWS[:2]).close()
