"""Write the demo's dataset: a dozen images of a shape the pretrained tiny world model never saw.

The shape (a heart) is captioned with the trigger word "zorb" ("a small red zorb on the left, on
a white background"); the base model in resources/tiny-world-sdxl only knows circles, squares,
triangles, diamonds and crosses. A few more images of it are held out to measure validation
loss. Offline, a second or two; an existing dataset is left as it is.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from modules.data.tiny_world import write_concept_dataset  # noqa: E402

MODEL = REPO / "resources" / "tiny-world-sdxl"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--root", default="workspace/demo", help="where dataset/ and validation/ go"
    )
    parser.add_argument("--images", type=int, default=12, help="training images")
    args = parser.parse_args()
    if not (MODEL / "model_index.json").is_file():
        print(
            f"error: the pretrained demo model {MODEL} is missing; restore it from git or "
            "rebuild it with scripts/pretrain_tiny_world.py",
            file=sys.stderr,
        )
        return 2
    root = Path(args.root)
    if not (root / "dataset").exists():
        write_concept_dataset(root / "dataset", count=args.images, seed=0)
    if not (root / "validation").exists():  # held out: only its loss is measured
        write_concept_dataset(root / "validation", count=4, seed=1)
    print(f"demo model: {MODEL.relative_to(REPO)}\ndemo data:  {root / 'dataset'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
