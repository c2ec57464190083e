"""Geodesic's GUI entry point."""

import sys


def main() -> int:
    print(
        "The Geodesic GUI arrives in a later release; train with: python scripts/train.py --config-path training_presets/sdxl_lora.json"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
