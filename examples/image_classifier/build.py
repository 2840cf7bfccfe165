"""Build the image classifier's artefacts in OUT_DIR: weights, labels and sample photos.

The weights are RANDOM (seeded) unless you pass --checkpoint with a ResNet-18 state_dict (for
example torchvision's ImageNet weights, which you download yourself); the labels are
"class_000".."class_999" unless you pass --labels with an index_to_name.json. With random
weights the answers are well-formed but meaningless: this example shows the serving path.

The sample photos are the two that scikit-learn ships (sklearn.datasets.load_sample_images).

Usage: python examples/image_classifier/build.py OUT_DIR [--checkpoint PATH] [--labels PATH]
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model import ResNet18  # noqa: E402


def sample_photo_paths():
    import sklearn.datasets

    folder = Path(sklearn.datasets.__file__).parent / "images"
    return sorted(folder.glob("*.jpg"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--checkpoint", type=Path, help="a ResNet-18 state_dict (.pth)")
    parser.add_argument("--labels", type=Path, help="an index_to_name.json")
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(0)
    model = ResNet18()
    if args.checkpoint:
        model.load_state_dict(torch.load(args.checkpoint, map_location="cpu", weights_only=True))
    else:
        print("weights: RANDOM (seed 0); pass --checkpoint for real ones")
    torch.save(model.state_dict(), args.out_dir / "resnet18.pt")

    if args.labels:
        shutil.copy(args.labels, args.out_dir / "index_to_name.json")
    else:
        labels = {str(i): f"class_{i:03d}" for i in range(1000)}
        (args.out_dir / "index_to_name.json").write_text(json.dumps(labels))

    for photo in sample_photo_paths():
        shutil.copy(photo, args.out_dir / f"sample_{photo.name}")
    shutil.copy(sample_photo_paths()[0], args.out_dir / "sample.jpg")
    print(f"wrote {args.out_dir}/resnet18.pt, index_to_name.json and sample photos")


if __name__ == "__main__":
    main()
