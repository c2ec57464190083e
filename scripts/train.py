"""Train a LoRA from a preset JSON: `python scripts/train.py --config-path training_presets/sdxl_lora.json`.

Multi-GPU: `accelerate launch scripts/train.py --config-path ...` (accelerate's DDP).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modules.errors import RunError, UserError
from modules.util.library_notices import quiet_library_notices


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="train.py",
        description="Train an SDXL LoRA from a preset JSON file merged over Geodesic's defaults.",
    )
    parser.add_argument("--config-path", required=True, help="preset or saved config (.json)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set training.batch_size=2 (repeatable; values are JSON)",
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config and exit"
    )
    parser.add_argument(
        "--resume",
        nargs="?",
        const="",
        default=None,
        metavar="BACKUP_DIR",
        help="continue from a backup folder, or from the newest backup in the workspace",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for stream in (sys.stdout, sys.stderr):  # a file name that is not UTF-8 never crashes output
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:
        return _run(args)
    except KeyboardInterrupt:  # before training started (or Ctrl-C twice): no traceback
        print(
            "\nerror: interrupted (Ctrl-C); nothing was saved since the last backup",
            file=sys.stderr,
        )
        return 130


def _run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    quiet_library_notices()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from modules.config.loading import config_to_json, load_config

        config = load_config(args.config_path, overrides=args.overrides)
        if args.print_config:
            sys.stdout.write(config_to_json(config))
            return 0
        from tqdm.contrib.logging import logging_redirect_tqdm

        from modules.training.trainer import train

        # log lines go above an open progress bar instead of being glued to it
        with logging_redirect_tqdm():
            result = train(config, resume=args.resume or None, resume_latest=args.resume == "")
    except (UserError, RunError) as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    if result.interrupted:
        where = result.last_backup or "nowhere (backup.on_interrupt is off)"
        print(f"interrupted at step {result.steps}; backup: {where}")
        print(f"resume with: python scripts/train.py --config-path {args.config_path} --resume")
        return 130
    print(f"LoRA:    {result.paths.output}")
    print(f"samples: {result.paths.samples}")
    if result.comparison:
        print(f"before/after: {result.comparison}")
    if result.loss_curve:
        print(f"loss curve: {result.loss_curve}")
    print(f"logs:    {result.paths.logs}  (tensorboard --logdir {result.paths.logs})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
