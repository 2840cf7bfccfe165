"""Train a small MLP on scikit-learn's iris data (4 numeric features → 3 species) and write its
weights and held-out set to OUT_DIR.

Usage: python examples/tabular/build.py OUT_DIR
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model import IrisMLP  # noqa: E402


def main(out_dir: Path) -> None:
    from sklearn.datasets import load_iris

    out_dir.mkdir(parents=True, exist_ok=True)
    iris = load_iris()
    order = np.random.default_rng(0).permutation(len(iris.target))
    train, held = order[:120], order[120:]
    x = torch.tensor(iris.data, dtype=torch.float32)
    y = torch.tensor(iris.target)
    torch.manual_seed(0)
    model = IrisMLP()
    optimiser = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(300):
        optimiser.zero_grad()
        loss = torch.nn.functional.nll_loss(torch.log(model(x[train])), y[train])
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        accuracy = (model(x[held]).argmax(1) == y[held]).float().mean().item()
    print(f"iris MLP: held-out accuracy {accuracy:.3f}")
    torch.save(model.state_dict(), out_dir / "iris_mlp.pt")
    (out_dir / "index_to_name.json").write_text(json.dumps({str(i): n for i, n in enumerate(iris.target_names)}))
    np.savez(out_dir / "held_out.npz", features=iris.data[held].astype(np.float32), labels=iris.target[held])
    (out_dir / "sample.json").write_text(json.dumps(iris.data[held][0].tolist()))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "build/tabular"))
