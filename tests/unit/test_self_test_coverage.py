"""Issue 29: the self-test says what its samples could not cover, and derives what it can. On
0442939 samples of one length passed a model whose padding leaks ("answers batch-invariant"),
and `--check` printed OK for a self-test it never ran."""

from __future__ import annotations

import pytest
import torch

from handlers import MicroBatchHandler, Request
from handlers.core.self_test import Sample, SelfTestFailed
from handlers.testing import LocalServer

JSON = {"Content-Type": "application/json"}
SAME_LENGTH = [Sample(f"len4-{i}.json", Request([float(i), 2.0, 3.0, 4.0], JSON)) for i in range(1, 4)]


class MeanOfPadded(MicroBatchHandler):
    """A mean over each request's numbers, padded with zeros to the longest in the micro-batch;
    ``masked`` divides by the request's own length, else by the padded one (the leak)."""

    masked = False

    def load_model(self, model_dir, device):
        return torch.nn.Identity()

    def collate(self, items):
        longest = max(len(item) for item in items)
        padded = torch.zeros(len(items), longest)
        for row, item in enumerate(items):
            padded[row, : len(item)] = item
        lengths = torch.tensor([float(len(item)) for item in items])
        return padded, lengths

    def infer(self, batch):
        padded, lengths = batch
        return padded.sum(dim=1) / (lengths if self.masked else padded.shape[1])

    def postprocess_one(self, output, item):
        return round(float(output), 6)


class MaskedMean(MeanOfPadded):
    masked = True


def test_samples_of_one_length_no_longer_pass_a_model_whose_padding_leaks():
    with pytest.raises(SelfTestFailed) as refused:
        LocalServer.start(MeanOfPadded, handler_config={"micro_batch_size": 4}, samples=SAME_LENGTH)
    assert "a shorter input derived from sample len4-1.json" in str(refused.value)
    assert "padding that leaks" in str(refused.value)


def test_a_model_that_masks_its_padding_passes_and_the_summary_says_padding_was_exercised():
    with LocalServer.start(MaskedMean, handler_config={"micro_batch_size": 4}, samples=SAME_LENGTH) as server:
        summary = server.handler.self_test.summary()
        answers = server.send([[1.0, 2.0], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    assert "padding exercised with a shorter input derived from sample len4-1.json" in summary
    assert [a.body for a in answers] == [1.5, 3.5]


class Strings(MicroBatchHandler):
    def load_model(self, model_dir, device):
        return torch.nn.Identity()

    def preprocess_one(self, request):
        return request.json()["word"]

    def collate(self, items):
        return torch.tensor([[float(len(word))] for word in items])


def test_where_no_shorter_input_can_be_made_the_summary_says_padding_was_not_exercised():
    samples = [Sample(f"{w}.json", Request({"word": w}, JSON)) for w in ("ab", "cd", "ef")]
    with LocalServer.start(Strings, handler_config={"micro_batch_size": 4}, samples=samples) as server:
        summary = server.handler.self_test.summary()
    assert "padding to a longer batch-mate was NOT exercised" in summary


def test_check_exits_3_not_0_when_the_self_test_could_not_run(tmp_path, capsys):
    """Regression: with no samples (or a file not built yet) --check printed 'OK' and exited 0."""
    from handlers.archive import main
    from tests.unit.test_archive_configs import ROOT, write_config

    path = write_config(tmp_path, samples=None)
    assert main(["--check", "--root", str(ROOT), str(path)]) == 3
    output = capsys.readouterr().out
    assert "self-test NOT run" in output and "config(s) OK" not in output
    assert main(["--check", "--configs-only", "--root", str(ROOT), str(path)]) == 0
