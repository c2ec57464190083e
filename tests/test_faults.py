"""Bad input and faults as a user meets them: one clear error, never a traceback or a bad file.

Values the schema used to let through, a disk that fills while writing, optimizer arguments
that fail only at the first step, NaN that used to be blamed on the learning rate, files a
killed run leaves behind, and file permissions. The CLI's side of the same faults (exit codes,
the single stderr line) is in test_cli.py.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from modules.config.loading import ConfigError, load_config, save_config
from modules.config.schema import TrainConfig
from modules.errors import RunError, UserError
from modules.training.backup import open_backup
from modules.training.trainer import TrainingRun, train
from modules.util.atomic import WriteError
from tests.fault_helpers import file_size_limit
from tests.helpers import TinyModel, tiny_config

# -- values that passed the schema and failed later ---------------------------------------------

FIELD_ERRORS = {
    "optimizer.learning_rate=Infinity": "optimizer.learning_rate = Infinity is not a finite "
    "number; allowed: > 0",
    "lora.alpha=1e999": "lora.alpha = Infinity is not a finite number; allowed: > 0",
    "optimizer.weight_decay=NaN": "optimizer.weight_decay = NaN is not a finite number; "
    "allowed: >= 0",
    'data.concepts=[{"path": "d", "repeats": 1e999}]': "data.concepts.0.repeats = Infinity is "
    "not a finite number; allowed: > 0",
    "training.seed=36893488147419103232": "training.seed = 36893488147419103232 is out of "
    "range; allowed: >= 0 and <= 4294967295",
    'data.concepts=[{"path": "d", "caption_extension": "txt"}]': "data.concepts.0."
    'caption_extension = "txt": must be a file extension starting with a dot, e.g. ".txt"',
    "output.name=../elsewhere": 'output.name = "../elsewhere": must be a plain file name, '
    "without folders; put the folder in output.workspace_dir or output.output_path",
    "output.name=/abs/lora": 'output.name = "/abs/lora": must be a plain file name, without '
    "folders; put the folder in output.workspace_dir or output.output_path",
    "output.name=..": 'output.name = "..": must be a plain file name, without folders; put the '
    "folder in output.workspace_dir or output.output_path",
    'output.name="   "': 'output.name = "   ": must not be blank; e.g. "my_lora"',
    'output.name="a\\u0000b"': 'output.name = "a\\u0000b": contains a NUL byte (\\x00); remove it',
    'output.workspace_dir="ws\\u0000"': 'output.workspace_dir = "ws\\u0000": contains a NUL '
    "byte (\\x00); remove it",
    'output.name="a\\nb"': 'output.name = "a\\nb": contains a control character; use a plain '
    "file name",
}


@pytest.mark.parametrize("override", FIELD_ERRORS, ids=list(FIELD_ERRORS))
def test_values_that_failed_after_loading_are_config_errors(override: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(raw={}, overrides=[override])
    assert str(caught.value) == f"config: {FIELD_ERRORS[override]}"


def test_deeply_nested_json_is_one_line(tmp_path: Path) -> None:
    """100,000 levels used to end in a RecursionError; 500 in an error when saving the config."""
    for depth in (500, 100_000):
        path = tmp_path / f"deep{depth}.json"
        nested = '{"a": ' * depth + "1" + "}" * depth
        path.write_text('{"optimizer": {"extra_kwargs": ' + nested + "}}", encoding="utf-8")
        with pytest.raises(ConfigError) as caught:
            load_config(path)
        assert str(caught.value) == (
            f"{path}: JSON nested deeper than 32 levels; no config field takes that"
        )
    with pytest.raises(ConfigError, match=r"^--set optimizer\.extra_kwargs: JSON nested deeper"):
        load_config(raw={}, overrides=["optimizer.extra_kwargs=" + "[" * 5000 + "]" * 5000])


@pytest.mark.parametrize(
    "optimizer, expected",
    [
        (
            {"name": "sgd", "nesterov": True, "extra_kwargs": {"dampening": 0.5}},
            'optimizer.extra_kwargs {"dampening": 0.5} rejected by sgd: Nesterov momentum '
            "requires a momentum and zero dampening; fix or remove it",
        ),
        (
            {"name": "sgd", "extra_kwargs": {"dampening": "x"}},
            'optimizer.extra_kwargs {"dampening": "x"} rejected by sgd: unsupported operand '
            "type(s) for -: 'int' and 'str'; fix or remove it",
        ),
        (
            {"name": "adamw", "extra_kwargs": {"lr": 1}},
            "optimizer.extra_kwargs sets 'lr', which the config already passes; set "
            "optimizer.learning_rate instead",
        ),
        (
            {"name": "adafactor", "extra_kwargs": {"relative_step": True}},
            "optimizer.extra_kwargs sets 'relative_step', which the config already passes; "
            "Geodesic fixes it for adafactor",
        ),
    ],
    ids=["invalid-at-construction", "invalid-at-the-second-step", "lr", "fixed-argument"],
)
def test_optimizer_arguments_it_rejects_fail_before_the_model_loads(
    optimizer: dict, expected: str, tiny_dataset_path: Path, tmp_path: Path
) -> None:
    """SGD reads `dampening` only from its second step on: that was a traceback mid-run; an
    `lr` in extra_kwargs was silently overridden by each part's learning rate."""
    raw = tiny_config(tmp_path / "no-model", tiny_dataset_path, tmp_path, optimizer=optimizer)
    with pytest.raises(UserError) as caught:
        TrainingRun(load_config(raw=raw))
    assert str(caught.value) == expected


def test_a_batch_larger_than_the_dataset_fails_before_the_model_loads(
    tiny_dataset_path: Path, tmp_path: Path
) -> None:
    raw = tiny_config(
        tmp_path / "no-model", tiny_dataset_path, tmp_path, training={"batch_size": 10**9}
    )
    with pytest.raises(UserError) as caught:
        TrainingRun(load_config(raw=raw))
    assert str(caught.value) == (
        "training.batch_size = 1000000000 is larger than the dataset (4 images per epoch); "
        "lower it to 4 or less"
    )


# -- a full disk --------------------------------------------------------------------------------


def test_saving_a_config_to_a_full_disk_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    save_config(TrainConfig(), path)
    before = path.read_bytes()
    big = load_config(raw={"sampling": {"prompts": ["a long prompt " * 50] * 20}})
    with file_size_limit(len(before) + 100), pytest.raises(WriteError) as caught:
        save_config(big, path)
    assert str(caught.value) == (
        f"cannot write {path}: File too large; nothing was replaced; free space on that disk "
        "(or choose another folder) and run again"
    )
    assert isinstance(caught.value, OSError) and isinstance(caught.value, RunError)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"], "temporary file left behind"


def test_a_full_disk_while_caching_names_the_entry(
    tiny_sdxl_path: Path, tiny_dataset_path: Path, tmp_path: Path
) -> None:
    """Cache entries (~30 kB here) fail; the scan index (< 1 kB) is written before."""
    raw = tiny_config(tiny_sdxl_path, tiny_dataset_path, tmp_path, data={"workers": 0})
    with file_size_limit(8_000), pytest.raises(WriteError) as caught:
        TrainingRun(load_config(raw=raw))
    message = str(caught.value)
    assert message.startswith(f"cannot write {tmp_path / 'cache'}/")
    assert message.endswith(
        ".safetensors: File too large; nothing was replaced; free space on that disk (or "
        "choose another folder) and run again"
    )
    assert not [p for p in (tmp_path / "cache").rglob("*.tmp")]


def test_a_full_disk_while_backing_up_keeps_the_older_backups(
    tiny_sdxl_path: Path, tiny_dataset_path: Path, tmp_path: Path
) -> None:
    sections = {
        "training": {"max_steps": 1},
        "backup": {"every_n_steps": 1, "keep_last": 5},
        "data": {"workers": 0},
    }
    raw = tiny_config(tiny_sdxl_path, tiny_dataset_path, tmp_path, **sections)
    train(load_config(raw=raw))
    first = tmp_path / "backups" / "step-000001"
    backup_bytes = (first / "lora.safetensors").stat().st_size  # the backup's smallest tensor file
    config = load_config(raw=raw, overrides=["training.max_steps=2"])
    run = TrainingRun(config, resume_latest=True)
    with file_size_limit(backup_bytes // 2), pytest.raises(WriteError) as caught:
        run.run()
    failed = tmp_path / "backups" / "step-000002" / "lora.safetensors"
    assert str(caught.value).startswith(f"cannot write {failed}: File too large; nothing was ")
    assert [p.name for p in (tmp_path / "backups").iterdir()] == ["step-000001"]
    open_backup(first)  # still whole: checksums match


def test_a_full_disk_while_sampling_names_the_image(
    tiny_sdxl_path: Path, tiny_dataset_path: Path, tmp_path: Path
) -> None:
    raw = tiny_config(
        tiny_sdxl_path,
        tiny_dataset_path,
        tmp_path,
        training={"max_steps": 2},
        sampling={"prompts": ["a red circle"], "every_n_steps": 1, "steps": 2},
        data={"workers": 0, "cache_latents": False, "cache_text_embeddings": False},
    )
    run = TrainingRun(load_config(raw=raw))
    with file_size_limit(6_000), pytest.raises(WriteError) as caught:  # a sample is ~12 kB
        run.run()
    image = tmp_path / "samples" / "000001" / "00.png"
    assert str(caught.value).startswith(f"cannot write {image}: File too large; ")


# -- non-finite values --------------------------------------------------------------------------


def test_skip_mode_never_writes_a_lora_that_overflows_its_save_dtype(
    tiny_model: TinyModel, tiny_dataset_path: Path, tmp_path: Path
) -> None:
    """on_nonfinite=skip used to finish with exit 0 and inf in a third of the tensors: the
    weights had grown past float16's range. The check looks at the tensors as saved, in the
    family's layout (Flux's kohya file fuses q, k and v)."""
    raw = tiny_model.config(
        tiny_dataset_path,
        tmp_path,
        optimizer={"learning_rate": 1e5},
        training={"on_nonfinite": "skip", "max_steps": 2},
        data={"workers": 0},
    )
    with pytest.raises(RunError) as caught:
        train(load_config(raw=raw))
    message = str(caught.value)
    output = tmp_path / "test-lora.safetensors"
    assert message.startswith(f"not saving {output} at step 2: ")
    assert "tensors would hold inf/NaN in output.save_dtype float16" in message
    assert (
        "beyond float16's range" in message and "lower optimizer.learning_rate (100000)" in message
    )
    assert not output.exists()


def test_nan_before_any_update_is_not_blamed_on_the_learning_rate(
    tiny_model: TinyModel, tiny_dataset_path: Path, tmp_path: Path
) -> None:
    raw = tiny_model.config(tiny_dataset_path, tmp_path, lora={"rank": 4, "alpha": 1e30})
    with pytest.raises(RunError) as caught:
        train(load_config(raw=raw))
    message = str(caught.value)
    assert message.startswith("non-finite gradient at step 1 (")
    assert "not the learning rate (no update has been applied yet): lora.alpha / lora.rank = " in (
        message
    )
    assert "lower lora.alpha" in message and "optimizer.learning_rate" not in message


def test_a_continued_files_own_alpha_is_named_not_the_configs(
    tiny_model: TinyModel, tiny_dataset_path: Path, tmp_path: Path
) -> None:
    """A file continued with lora.init_from brings its alphas; lowering lora.alpha would not
    change them, so the message points at the file."""
    first = tiny_model.config(tiny_dataset_path, tmp_path / "a", training={"max_steps": 1})
    saved = train(load_config(raw=first)).paths.output
    tensors = load_file(saved)
    alphas = [key for key in tensors if key.endswith(".alpha")]
    assert alphas
    save_file({**tensors, **{key: torch.tensor(1e30) for key in alphas}}, saved)
    second = tiny_model.config(tiny_dataset_path, tmp_path / "b", lora={"init_from": str(saved)})
    with pytest.raises(RunError) as caught:
        train(load_config(raw=second))
    message = str(caught.value)
    assert "not the learning rate" in message
    assert "alpha / rank of the lora.init_from file = " in message
    assert "a file with a lower alpha" in message and "lora.alpha /" not in message


def test_the_last_good_backup_named_is_finite(
    tiny_sdxl_path: Path, tiny_dataset_path: Path, tmp_path: Path
) -> None:
    """Weights that went non-finite are never backed up, so the backup a stop names is one
    training can go on from."""
    raw = tiny_config(
        tiny_sdxl_path,
        tiny_dataset_path,
        tmp_path,
        training={"max_steps": 4},
        backup={"every_n_steps": 1, "keep_last": 5},
        data={"workers": 0},
    )
    run = TrainingRun(load_config(raw=raw))
    step = run.pipeline.step

    def overflowing_step():  # an update that overflows the weights at step 2
        outcome = step()
        if run.state.progress.step == 1:
            with torch.no_grad():
                next(iter(run.network.parameters())).fill_(float("inf"))
        return outcome

    run.pipeline.step = overflowing_step
    with pytest.raises(RunError) as caught:
        run.run()
    good = tmp_path / "backups" / "step-000001"
    assert str(caught.value) == (
        "the LoRA weights hold inf/NaN at step 2, so no backup is written: the updates grew too "
        f"large (lower optimizer.learning_rate, 0.001); last good backup: {good}"
    )
    assert [p.name for p in (tmp_path / "backups").iterdir()] == ["step-000001"]
    open_backup(good)


# -- what a killed run leaves, and file permissions ---------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_leftovers_of_a_killed_run_go_and_files_follow_the_umask(
    tiny_sdxl_path: Path, tiny_dataset_path: Path, tmp_path: Path
) -> None:
    """A kill mid-write leaves temporary files (large at SDXL scale); the next start removes
    them, except the cache's recent ones, which another run sharing the cache may be writing.
    Saved files used to be 0600 (mkstemp); they follow the umask like any other file."""
    workspace, cache = tmp_path / "ws", tmp_path / "ws" / "cache"
    leftovers = [
        workspace / "backups" / ".tmp-ab12cd34" / "optimizer.pt",
        workspace / ".test-lora.safetensors.k3x_9qz1.tmp",  # from mkstemp, before this change
        workspace / ".config.json.0123abcd.tmp",
        workspace / "saves" / ".test-lora-step000002.safetensors.89abcdef.tmp",
        workspace / "samples" / "000002" / ".00.png.fedcba98.tmp",
        cache / "latents" / "ab" / ".abcd.safetensors.01234567.tmp",
    ]
    kept = [
        workspace / ".keep",
        workspace / "backups" / ".tmp-notours" / "x",
        cache / "text" / "cd" / ".cdef.safetensors.76543210.tmp",  # fresh: maybe being written
    ]
    for path in leftovers + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"partial")
    hour_ago = os.path.getmtime(leftovers[-1]) - 3700
    os.utime(leftovers[-1], (hour_ago, hour_ago))
    raw = tiny_config(
        tiny_sdxl_path,
        tiny_dataset_path,
        workspace,
        training={"max_steps": 1},
        backup={"every_n_steps": 1},
        data={"workers": 0, "cache_dir": str(cache)},
    )
    previous = os.umask(0o022)
    try:
        result = train(load_config(raw=raw))
    finally:
        os.umask(previous)
    assert not [p for p in leftovers if p.exists()]
    assert not (workspace / "backups" / ".tmp-ab12cd34").exists()
    assert all(p.exists() for p in kept)
    backup = workspace / "backups" / "step-000001"
    for path in (result.paths.output, workspace / "config.json", backup / "optimizer.pt"):
        assert _mode(path) == 0o644, path
    assert _mode(backup) == 0o755
    entry = next(p for p in (cache / "latents").rglob("*.safetensors"))
    assert _mode(entry) == 0o644


def test_a_private_umask_gives_private_files(tmp_path: Path) -> None:
    previous = os.umask(0o077)
    try:
        save_config(TrainConfig(), tmp_path / "config.json")
    finally:
        os.umask(previous)
    assert _mode(tmp_path / "config.json") == 0o600
