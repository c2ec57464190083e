"""scripts/train.py as a user runs it: exit codes, one-line errors, Ctrl-C, --resume."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL

from modules.config.loading import load_config
from modules.config.schema import CONFIG_VERSION
from modules.util.library_notices import quiet_library_notices
from tests.fault_helpers import file_size_limit_for_child
from tests.helpers import REPO, cli_env, default_sigint, free_port, run_cli, tiny_config


def _write(path: Path, raw: dict) -> Path:
    path.write_text(json.dumps(raw), encoding="utf-8")
    return path


def test_print_config_shows_the_resolved_config(tmp_path: Path) -> None:
    preset = _write(tmp_path / "p.json", {"lora": {"rank": 8}})
    result = run_cli(
        "--config-path", str(preset), "--set", "training.batch_size=3", "--print-config"
    )
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["lora"]["rank"] == 8 and shown["training"]["batch_size"] == 3
    assert shown["config_version"] == CONFIG_VERSION and shown["optimizer"]["name"] == "adamw"


def test_bad_config_is_one_line_and_exit_code_2(tmp_path: Path) -> None:
    preset = _write(tmp_path / "p.json", {"training": {"batchsize": 2}})
    result = run_cli("--config-path", str(preset), "--print-config")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == [
        f"error: {preset}: unknown key 'training.batchsize' (did you mean 'training.batch_size'?)"
    ]
    assert "Traceback" not in result.stderr


def test_bad_override_value_exit_code_2(tmp_path: Path) -> None:
    preset = _write(tmp_path / "p.json", {})
    result = run_cli("--config-path", str(preset), "--set", "lora.rank=0", "--print-config")
    assert result.returncode == 2
    assert "lora.rank = 0 is out of range; allowed: >= 1 and <= 1024" in result.stderr


def test_missing_dataset_exit_code_2(tmp_path: Path, tiny_sdxl_path: Path) -> None:
    raw = tiny_config(tiny_sdxl_path, tmp_path / "nowhere", tmp_path / "ws")
    result = run_cli("--config-path", str(_write(tmp_path / "p.json", raw)))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: data.concepts.0.path: folder")


def test_ctrl_c_writes_a_backup_and_resume_finishes(
    tmp_path: Path, tiny_sdxl_path: Path, tiny_dataset_path: Path
) -> None:
    workspace = tmp_path / "ws"
    raw = tiny_config(tiny_sdxl_path, tiny_dataset_path, workspace, training={"max_steps": 10_000})
    preset = _write(tmp_path / "p.json", raw)
    process = subprocess.Popen(
        [sys.executable, str(REPO / "scripts" / "train.py"), "--config-path", str(preset)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=cli_env(),
        cwd=REPO,
        preexec_fn=default_sigint,
    )
    assert process.stdout is not None
    deadline = time.monotonic() + 180
    for line in process.stdout:
        if line.startswith("training ") and "LoRA layers" in line:
            break
        assert time.monotonic() < deadline, "training never started"
    time.sleep(2)  # let it take a few steps
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 130, output
    assert "interrupted at step" in output and "Traceback" not in output
    backups = sorted((workspace / "backups").iterdir())
    assert len(backups) == 1 and (backups[0] / "state.pt").is_file()
    stopped_at = int(backups[0].name.removeprefix("step-"))
    assert stopped_at >= 1

    result = run_cli(
        "--config-path", str(preset), "--set", f"training.max_steps={stopped_at + 1}", "--resume"
    )
    assert result.returncode == 0, result.stderr
    assert (workspace / "test-lora.safetensors").is_file()
    assert load_config(workspace / "config.json").training.max_steps == stopped_at + 1


@pytest.mark.parametrize(
    "override, expected",
    [
        ("optimizer.learning_rate=Infinity", "optimizer.learning_rate = Infinity is not a finite"),
        ("output.name=../elsewhere", 'output.name = "../elsewhere": must be a plain file name'),
        ("optimizer.extra_kwargs=" + "[" * 3000 + "]" * 3000, "JSON nested deeper than 32"),
    ],
    ids=["infinite", "path-name", "deep-json"],
)
def test_values_that_used_to_fail_late_exit_2_with_one_line(
    override: str, expected: str, tmp_path: Path
) -> None:
    preset = _write(tmp_path / "p.json", {})
    result = run_cli("--config-path", str(preset), "--set", override, "--print-config")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines


def test_ctrl_c_before_training_exits_130_without_traceback(
    tmp_path: Path, tiny_sdxl_path: Path, tiny_dataset_path: Path
) -> None:
    """The scan report prints before the model loads: Ctrl-C right then lands in the loading."""
    raw = tiny_config(tiny_sdxl_path, tiny_dataset_path, tmp_path / "ws")
    process = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "scripts" / "train.py"),
            "--config-path",
            str(_write(tmp_path / "p.json", raw)),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(),
        cwd=REPO,
        preexec_fn=default_sigint,
    )
    assert process.stdout is not None
    for line in process.stdout:
        if line.startswith("data: "):
            break
    process.send_signal(signal.SIGINT)
    output, errors = process.communicate(timeout=120)
    assert process.returncode == 130, errors
    assert "Traceback" not in errors and "training 48 LoRA layers" not in output
    assert errors.strip().splitlines()[-1] == (
        "error: interrupted (Ctrl-C); nothing was saved since the last backup"
    )


def test_a_full_disk_at_the_final_save_exits_1_keeping_the_old_lora(
    tmp_path: Path, tiny_sdxl_path: Path, tiny_dataset_path: Path
) -> None:
    """safetensors used to report the full disk as its own error, with a traceback."""
    workspace = tmp_path / "ws"
    raw = tiny_config(
        tiny_sdxl_path,
        tiny_dataset_path,
        workspace,
        training={"max_steps": 1},
        data={"workers": 0, "cache_latents": False, "cache_text_embeddings": False},
    )
    old = workspace / "test-lora.safetensors"
    old.parent.mkdir(parents=True)
    old.write_bytes(b"the LoRA of an earlier run")
    result = run_cli(
        "--config-path",
        str(_write(tmp_path / "p.json", raw)),
        preexec_fn=file_size_limit_for_child(20_000),  # the LoRA is ~94 kB, the rest < 10 kB
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.split("\n")[-2] == (
        f"error: cannot write {old}: File too large; nothing was replaced; free space on that "
        "disk (or choose another folder) and run again"
    )
    assert old.read_bytes() == b"the LoRA of an earlier run"
    leftovers = [p for p in workspace.rglob("*") if p.name.startswith(".")]
    assert leftovers == [], "temporary files left behind"


def test_an_error_mid_run_prints_on_its_own_line(
    tmp_path: Path, tiny_sdxl_path: Path, tiny_dataset_path: Path
) -> None:
    """It used to be glued to the progress bar's line; and this LoRA (inf in float16) used to
    be written, with exit code 0."""
    raw = tiny_config(
        tiny_sdxl_path,
        tiny_dataset_path,
        tmp_path / "ws",
        optimizer={"learning_rate": 1e5},
        training={"max_steps": 2, "on_nonfinite": "skip"},
        data={"workers": 0},
    )
    result = run_cli("--config-path", str(_write(tmp_path / "p.json", raw)))
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.split("\n")[-2]  # newline-separated: \r-updated bar text stays apart
    assert last.startswith("error: not saving "), result.stderr[-600:]
    assert not (tmp_path / "ws" / "test-lora.safetensors").exists()


def test_a_file_name_that_is_not_utf8_prints_under_a_strict_stdout(
    tmp_path: Path, tiny_dataset_path: Path
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for image in tiny_dataset_path.iterdir():
        (data / image.name).write_bytes(image.read_bytes())
    (data / os.fsdecode(b"caf\xe9.gif")).write_bytes(b"GIF89a")
    raw = tiny_config(tmp_path / "no-model", data, tmp_path / "ws")
    result = run_cli(
        "--config-path", str(_write(tmp_path / "p.json", raw)), PYTHONIOENCODING="utf-8:strict"
    )
    assert result.returncode == 2, result.stderr
    assert f"  skipped {data}/caf\\xe9.gif: unsupported format (.gif)" in result.stdout
    assert "Traceback" not in result.stderr and "UnicodeEncodeError" not in result.stderr


def test_resume_without_backups_is_a_user_error(tmp_path: Path, tiny_dataset_path: Path) -> None:
    raw = tiny_config(tmp_path / "m", tiny_dataset_path, tmp_path / "ws")
    result = run_cli("--config-path", str(_write(tmp_path / "p.json", raw)), "--resume")
    assert result.returncode == 2
    assert "--resume: no backups in" in result.stderr


def test_accelerate_launch_two_processes(
    tmp_path: Path, tiny_sdxl_path: Path, tiny_dataset_path: Path
) -> None:
    """Multi-process DDP through `accelerate launch` (gloo on CPU here, NCCL on GPUs).

    Launched as multi-GPU with ACCELERATE_USE_CPU=true: `--cpu --num_processes 2` would start a
    single process (accelerate runs several CPU processes only through torchrun or mpirun).
    """
    workspace = tmp_path / "ws"
    raw = tiny_config(tiny_sdxl_path, tiny_dataset_path, workspace, training={"max_steps": 2})
    preset = _write(tmp_path / "p.json", raw)
    launcher = (sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu")
    launcher += ("--num_processes", "2", "--num_machines", "1")
    launcher += ("--main_process_port", str(free_port()))
    launcher += ("--mixed_precision", "no", "--dynamo_backend", "no")
    result = run_cli(
        "--config-path",
        str(preset),
        launcher=launcher,
        OMP_NUM_THREADS="1",
        ACCELERATE_USE_CPU="true",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("training 48 LoRA layers") == 1  # only the main process reports
    # 4 images in batches of 2 shared by two ranks: one micro-batch per rank and epoch
    assert "(4 images, 1 micro-batches/epoch)" in result.stdout
    assert (workspace / "test-lora.safetensors").is_file()


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_library_false_alarms_are_dropped_and_real_warnings_kept() -> None:
    """What `quiet_library_notices` (installed by the CLI) drops: diffusers' fp32 warning on a
    real dtype cast when nothing must stay in fp32, and transformers' torchvision advice."""
    records = _Records()
    names = ("diffusers.models.modeling_utils", "transformers.utils.import_utils")
    saved = {name: logging.getLogger(name).filters[:] for name in names}
    for name in names:
        logging.getLogger(name).filters.clear()  # as in a process that has not installed them
        logging.getLogger(name).addHandler(records)
    try:
        model = AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4)
        model.to(dtype=torch.bfloat16)
        assert any("should be kept in float32: []" in m for m in records.messages)
        records.messages.clear()

        quiet_library_notices()
        quiet_library_notices()
        assert all(len(logging.getLogger(name).filters) == 1 for name in names)  # no duplicates
        model.to(dtype=torch.float32)
        kept = "There are modules in Mixed that should be kept in float32: ['norm']. Casting"
        logging.getLogger(names[0]).warning(kept)
        logging.getLogger(names[1]).warning("`CLIPImageProcessor` requires torchvision (...)")
        logging.getLogger(names[1]).warning("an unrelated transformers warning")
        assert records.messages == [kept, "an unrelated transformers warning"]
    finally:
        for name in names:
            logging.getLogger(name).removeHandler(records)
            logging.getLogger(name).filters[:] = saved[name]
