"""Build the demo's tiny SDXL base model and dataset under workspace/demo (offline, seconds)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from modules.data.demo_dataset import write_demo_dataset
from modules.models.sdxl.tiny import build_tiny_sdxl


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--root", default="workspace/demo", help="where to put tiny-sdxl/ and dataset/"
    )
    args = parser.parse_args()
    root = Path(args.root)
    if not (root / "tiny-sdxl" / "model_index.json").exists():
        build_tiny_sdxl(root / "tiny-sdxl")
    if not (root / "dataset").exists():
        write_demo_dataset(root / "dataset", count=8, size=64)
    if not (root / "validation").exists():  # held out: only its loss is measured
        write_demo_dataset(root / "validation", count=2, size=64, seed=1)
    print(f"demo model: {root / 'tiny-sdxl'}\ndemo data:  {root / 'dataset'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
