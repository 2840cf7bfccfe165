"""Loading the archive's model: errors name the file and the fix; torch.export programs load;
TorchScript loads without torch's deprecation noise."""

import pickle
import warnings

import pytest
import torch

from handlers import MicroBatchHandler, ModelFiles
from handlers.testing import LocalServer

from .models import affine_model

MODEL_FILE = '''import torch


class Affine(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.linear(x)
'''


def serve(tmp_path, files):
    """The base handler, whose default load_model loads the files named."""
    return LocalServer.start(MicroBatchHandler, model_dir=str(tmp_path), handler_config={"pool_size": 2},
                             model_files=files)


def weights(tmp_path):
    (tmp_path / "model.py").write_text(MODEL_FILE)
    torch.save({f"linear.{k}": v for k, v in affine_model().state_dict().items()}, tmp_path / "weights.pt")


def test_truncated_weights_name_the_file_and_the_fix(tmp_path):
    weights(tmp_path)
    data = (tmp_path / "weights.pt").read_bytes()
    (tmp_path / "weights.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(RuntimeError) as raised:
        serve(tmp_path, ModelFiles("model.py", "weights.pt"))
    assert str(tmp_path / "weights.pt") in str(raised.value) and "torch.save(model.state_dict()" in str(raised.value)


def test_a_whole_pickled_model_is_refused_with_what_to_do_instead(tmp_path):
    (tmp_path / "model.py").write_text(MODEL_FILE)
    torch.save(affine_model(), tmp_path / "weights.pt")
    with pytest.raises(pickle.UnpicklingError) as raised:
        serve(tmp_path, ModelFiles("model.py", "weights.pt"))
    message = str(raised.value)
    assert "weights.pt holds more than weights" in message and "torch.export" in message


@pytest.mark.parametrize("content, words", [
    (b"not a checkpoint", "it is not a file torch.save wrote (neither a zip archive nor a pickle)"),
    (b"", "EOFError (the file is empty or cut short)"),
])
def test_a_file_that_is_not_weights_at_all_says_so(tmp_path, content, words):
    """From the new-user trial: garbage was 'a whole model saved with torch.save(model)?', an
    empty file 'cannot read the weights ...: .' (nothing after the colon)."""
    (tmp_path / "model.py").write_text(MODEL_FILE)
    (tmp_path / "weights.pt").write_bytes(content)
    with pytest.raises(RuntimeError) as raised:
        serve(tmp_path, ModelFiles("model.py", "weights.pt"))
    assert str(tmp_path / "weights.pt") in str(raised.value) and words in str(raised.value)


def test_a_torch_export_program_loads_and_answers(tmp_path):
    program = torch.export.export(affine_model(), (torch.zeros(2, 4),),
                                  dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    torch.export.save(program, tmp_path / "model.pt2")
    with serve(tmp_path, ModelFiles(serialized_file="model.pt2")) as server:
        responses = server.send([[1, 1, 1, 1], [2, 2, 2, 2], [0, 0, 0, 0]])
    assert [r.body for r in responses] == [[3.0] * 4, [5.0] * 4, [1.0] * 4]


def test_torchscript_loads_without_deprecation_noise(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(affine_model()), tmp_path / "model.ts")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        server = serve(tmp_path, ModelFiles(serialized_file="model.ts"))
    try:
        assert server.send([[1, 1, 1, 1]])[0].body == [3.0] * 4
    finally:
        server.close()
    assert not [w for w in caught if "torch.jit" in str(w.message)]
