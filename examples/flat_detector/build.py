"""Write the flat detector's weights (its two thresholds) and a sample image to OUT_DIR, and
check that each committed sample holds exactly one box (``--samples`` writes them).

Usage: python examples/flat_detector/build.py OUT_DIR
"""

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from images import detector_png, sample_pngs  # noqa: E402
from model import FlatDetector  # noqa: E402


def main(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    model = FlatDetector()
    with torch.no_grad():
        model.threshold.fill_(0.5)
        model.white.fill_(0.75)
    torch.save(model.state_dict(), out_dir / "weights.pt")
    for path in sorted((HERE / "samples").iterdir()):
        pixels = torch.from_numpy(np.array(Image.open(path).convert("L"))).float() / 255.0
        with torch.no_grad():
            boxes = model(pixels[None, None])
        if len(boxes) != 1:  # the self-test must see K == micro-batch size at every size (issue 29)
            raise SystemExit(f"{path} holds {len(boxes)} boxes; every sample must hold exactly one (python "
                             f"examples/flat_detector/build.py --samples writes them)")
    # make serve's curl command sends this one: three boxes, two white and one grey.
    (out_dir / "sample.png").write_bytes(detector_png([(0, 0, 255), (2, 5, 150), (6, 3, 200)],
                                                      np.random.default_rng(1)))
    print(f"wrote {out_dir / 'weights.pt'} and {out_dir / 'sample.png'}")


def write_samples() -> None:
    (HERE / "samples").mkdir(exist_ok=True)
    for name, png in sample_pngs().items():
        (HERE / "samples" / name).write_bytes(png)
        print(f"wrote {HERE / 'samples' / name}")


if __name__ == "__main__":
    if sys.argv[1:] == ["--samples"]:
        write_samples()
    else:
        main(Path(sys.argv[1] if len(sys.argv) > 1 else "build/flat_detector"))
