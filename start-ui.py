"""Open Geodesic's trainer window: `python start-ui.py [--config-path FILE]`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="start-ui.py", description="Geodesic's trainer window (customtkinter)."
    )
    parser.add_argument("--config-path", help="a preset or saved config to open (.json)")
    parser.add_argument(
        "--appearance",
        choices=["system", "dark", "light"],
        default="system",
        help="light or dark widgets (default: follow the desktop)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from modules.errors import UserError
    from modules.ui.ctk.launch import WindowError, open_window

    try:
        window = open_window(config_path=args.config_path, appearance=args.appearance)
    except (UserError, WindowError) as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    try:
        window.mainloop()
    except KeyboardInterrupt:  # Ctrl-C reached the run too: it stops at its next step
        window.app.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
