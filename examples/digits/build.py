"""Train the digits CNN on scikit-learn's handwritten digits (seconds on a CPU) and write its
weights, labels and held-out set to OUT_DIR.

Training images go through the same preprocessing the server applies to a request (PNG bytes →
handlers.decode_image with this model's settings), so that served answers match training.

Usage: python examples/digits/build.py OUT_DIR
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[:0] = [str(HERE), str(ROOT)]
from digits_data import digit_png, split  # noqa: E402
from model import DigitsCNN  # noqa: E402

from handlers import ImageGeometry, decode_image  # noqa: E402
from handlers.ready_made.image_input import ImageLimits  # noqa: E402

EPOCHS = 30


def preprocessing():
    handler = yaml.safe_load((ROOT / "archiver_configs" / "digits.yaml").read_text())["model_config"]["handler"]
    geometry = ImageGeometry(resize=handler["resize"], crop=handler["crop"])
    mean = torch.tensor(handler["mean"]).view(1, 3, 1, 1) * 255
    std = torch.tensor(handler["std"]).view(1, 3, 1, 1) * 255

    def to_batch(images):
        pixels = np.stack([decode_image(digit_png(image), geometry, ImageLimits()) for image in images])
        return (torch.from_numpy(pixels).permute(0, 3, 1, 2).float() - mean) / std

    return to_batch


def main(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    train_x, train_y, held_x, held_y = split()
    to_batch = preprocessing()
    inputs, targets = to_batch(train_x), torch.from_numpy(train_y).long()
    model = DigitsCNN()
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)
    for epoch in range(EPOCHS):
        model.train()
        for index in torch.randperm(len(targets)).split(64):
            optimiser.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(inputs[index]), targets[index])
            loss.backward()
            optimiser.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(to_batch(held_x)).argmax(1).numpy() == held_y).mean()
    print(f"digits CNN: held-out accuracy in-process {accuracy:.3f} ({len(held_y)} images)")
    torch.save(model.state_dict(), out_dir / "digits_cnn.pt")
    (out_dir / "index_to_name.json").write_text(json.dumps({str(i): str(i) for i in range(10)}))
    np.savez(out_dir / "held_out.npz", images=held_x, labels=held_y)
    (out_dir / "sample.png").write_bytes(digit_png(held_x[0]))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "build/digits"))
