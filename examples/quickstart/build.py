"""Write the quickstart weights: W = 2·I, b = 1, so every answer is y = 2x + 1 (checkable by hand).

Usage: python examples/quickstart/build.py OUT_DIR
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model import Affine  # noqa: E402


def main(out_dir: str) -> None:
    model = Affine()
    with torch.no_grad():
        model.linear.weight.copy_(2 * torch.eye(4))
        model.linear.bias.fill_(1.0)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out / "weights.pt")
    print(f"wrote {out / 'weights.pt'}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "build/quickstart")
