"""Take a PNG of each tab of the trainer window into docs/images/ (gui-<tab>.png, and
gui-model-flux.png: the Model tab with the Flux family chosen).

    python scripts/screenshots.py [--steps 30] [--appearance dark]

Runs under a private Xvfb when there is no desktop. It first trains the demo preset (with
Riemannian preconditioning ticked) on the tiny built-in model for a few steps, so the run panel
shows a real loss curve and samples, then scans the dataset for the Data tab's report. The demo
model and data are made under workspace/demo as `make demo` does; the run goes to
workspace/screenshots.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from modules.config.loading import load_config  # noqa: E402
from modules.ui.ctk.display import virtual_display  # noqa: E402
from modules.ui.trainer_app import TABS, TrainerApp  # noqa: E402

IMAGES = ROOT / "docs" / "images"


def pump(window: Any, until: Callable[[], object], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not until():
        if time.monotonic() > deadline:
            raise SystemExit("timed out waiting for the window")
        window.update()
        time.sleep(0.03)
    for _ in range(10):  # let redraws settle
        window.update()
        time.sleep(0.03)


def grab(window: Any, path: Path, display: str) -> None:
    from PIL import ImageGrab

    window.update()
    x, y = window.winfo_rootx(), window.winfo_rooty()
    box = (x, y, x + window.winfo_width(), y + window.winfo_height())
    ImageGrab.grab(bbox=box, xdisplay=display).save(path, optimize=True)
    print(f"wrote {path.relative_to(ROOT)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="demo training steps first")
    parser.add_argument("--appearance", choices=["light", "dark"], default="dark")
    args = parser.parse_args()
    os.chdir(ROOT)  # the demo preset's folders are relative to the project
    from scripts.prepare_demo import main as prepare_demo

    sys.argv = [sys.argv[0]]
    prepare_demo()
    config = load_config(
        ROOT / "training_presets" / "demo.json",
        overrides=[
            f"training.max_steps={args.steps}",
            f"sampling.every_n_steps={max(1, args.steps // 2)}",
            "lora.preconditioner=riemannian",
            "data.workers=0",
            "output.workspace_dir=workspace/screenshots",
        ],
    )
    with virtual_display() as display:
        from modules.ui.ctk.launch import open_window

        window = open_window(app=TrainerApp(config=config), appearance=args.appearance)
        window.geometry("1400x900")
        window.build_all()
        window.start()
        pump(window, lambda: not window.app.run.running, timeout=900)
        if window.messages:
            raise SystemExit(f"the run failed: {window.messages[0].message}")
        window.scan()
        pump(window, lambda: not window.app.scan.running, timeout=300)
        IMAGES.mkdir(parents=True, exist_ok=True)
        for tab in TABS:
            window.show_tab(tab)
            window.update()
            tooltip = None
            if tab == "lora":  # the headline switch, with its help shown as on hover
                tooltip = window.tabs["lora"].inputs["lora.preconditioner"].tooltips[0]
                tooltip.show()
            pump(window, lambda: True, timeout=5)
            grab(window, IMAGES / f"gui-{tab}.png", display)
            if tooltip is not None:
                tooltip.hide()
        # the Model tab as Flux shows it: choosing the family rebuilds it with Flux's parts
        window.app.form.set("model.family", "flux")
        window.show_tab("model")
        pump(window, lambda: True, timeout=5)
        grab(window, IMAGES / "gui-model-flux.png", display)
        window.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
