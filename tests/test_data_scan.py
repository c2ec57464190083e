"""The scan before training, as a user reads it: what was found, what was skipped and why."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image

from modules.config.loading import load_config
from modules.data.pipeline import DataPipeline
from modules.errors import UserError
from tests.data_helpers import (
    write_cmyk_jpeg,
    write_header_only_jpeg,
    write_huge_png_header,
    write_image,
    write_palette_png,
    write_rotated_jpeg,
    write_truncated_png,
)


def pipeline_for(tmp_path: Path, **data: object) -> DataPipeline:
    raw = {"data": {"resolution": 128, **data}, "output": {"workspace_dir": str(tmp_path / "ws")}}
    return DataPipeline(load_config(raw=raw), latent_multiple=64)


@pytest.fixture
def messy_folder(tmp_path: Path) -> Path:
    """Good images of several kinds next to one file of every bad kind."""
    folder = tmp_path / "messy"
    folder.mkdir()
    write_image(folder / "good.png", 128, 96)
    write_image(folder / "good-mask.png", 128, 96, caption=None)  # a mask, not an image
    write_cmyk_jpeg(folder / "cmyk.jpg")
    write_palette_png(folder / "palette.png")
    write_rotated_jpeg(folder / "rotated.jpg", (192, 96))
    write_truncated_png(folder / "truncated.png")
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "text.png").write_text("not an image at all", encoding="utf-8")
    write_huge_png_header(folder / "huge.png")
    write_image(folder / "tiny.png", 16, 16)
    Image.new("RGB", (80, 80)).save(folder / "anim.gif")
    write_image(folder / "latin1.png", 80, 80, caption=None)
    (folder / "latin1.txt").write_bytes("café au lait".encode("latin-1"))
    (folder / "notes.md").write_text("ignored", encoding="utf-8")
    return folder


def test_scan_report_names_every_skipped_file_and_reason(messy_folder: Path, tmp_path) -> None:
    pipeline = pipeline_for(tmp_path, concepts=[{"path": str(messy_folder)}])
    skipped = {s.path.name: s.reason for s in pipeline.train.skipped}
    assert skipped == {
        "anim.gif": "unsupported format (.gif); convert it to png or jpg",
        "huge.png": skipped["huge.png"],
        "latin1.png": "caption latin1.txt is not UTF-8 (byte 3); re-save it as UTF-8",
        "text.png": "unreadable: not an image file Pillow can identify",
        "tiny.png": "too small (16x16 px; data.min_image_side is 64)",
        "truncated.png": "truncated: image file is truncated",
        "zero.jpg": "empty file (0 bytes)",
    }
    assert skipped["huge.png"].startswith("too large: Image size (900000000 pixels) exceeds")
    found = sorted(s.record.path.name for s in pipeline.train.samples)
    assert found == ["cmyk.jpg", "good.png", "palette.png", "rotated.jpg"]

    lines = pipeline.report_lines()
    assert lines[0] == "data: 4 images in 1 concept, 7 files skipped"
    assert lines[1] == f"  data.concepts.0 {messy_folder}: 4 images, 4 per epoch"
    assert f"  skipped {messy_folder / 'zero.jpg'}: empty file (0 bytes)" in lines
    assert lines[-1] == "  buckets at 128 px: 64x192: 1, 128x128: 3"


def test_images_load_upright_opaque_and_in_colour(messy_folder: Path, tmp_path: Path) -> None:
    """EXIF rotation applied, transparency on the configured background, CMYK as RGB."""
    pipeline = pipeline_for(
        tmp_path,
        concepts=[{"path": str(messy_folder)}],
        alpha_background="#00ff00",
        cache_latents=False,
    )
    by_name = {s.record.path.name: i for i, s in enumerate(pipeline.train.samples)}
    loader = pipeline.train_loader
    from modules.training.data_order import Draw

    def load(name: str):
        batch = loader.load([Draw(by_name[name], (0,))])
        return batch, (batch.pixels[0] + 1) * 127.5

    rotated, _ = load("rotated.jpg")
    assert pipeline.train.samples[by_name["rotated.jpg"]].record.size == (96, 192)
    assert rotated.target_size == (192, 64)  # (height, width): a portrait bucket
    assert rotated.original_sizes.tolist() == [[192, 96]]

    _, palette = load("palette.png")
    left, right = palette[:, :, :40].mean(dim=(1, 2)), palette[:, :, 90:].mean(dim=(1, 2))
    torch.testing.assert_close(left, torch.tensor([0.0, 255.0, 0.0]), atol=3, rtol=0)
    torch.testing.assert_close(right, torch.tensor([0.0, 0.0, 255.0]), atol=3, rtol=0)

    _, cmyk = load("cmyk.jpg")
    assert cmyk[0].mean() > 240 and cmyk[1].mean() < 15 and cmyk[2].mean() < 15


def test_missing_folder_and_unusable_dataset_are_errors(tmp_path: Path) -> None:
    with pytest.raises(
        UserError, match=r"^data.concepts.0.path: folder '.*nowhere' does not exist"
    ):
        pipeline_for(tmp_path, concepts=[{"path": str(tmp_path / "nowhere")}])
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"")
    write_truncated_png(bad / "b.png")
    with pytest.raises(UserError) as caught:
        pipeline_for(tmp_path, concepts=[{"path": str(bad)}])
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("data.concepts.0.path: no usable image")
    assert "(2 skipped: a.png: empty file (0 bytes); b.png: truncated" in message
    with pytest.raises(UserError, match=r"^data.concepts is empty"):
        pipeline_for(tmp_path, concepts=[])


def test_required_captions_skip_uncaptioned_images(tmp_path: Path) -> None:
    folder = tmp_path / "c"
    write_image(folder / "with.png", 64, 64, caption="a cat")
    write_image(folder / "without.png", 64, 64, caption=None)
    lenient = pipeline_for(tmp_path, concepts=[{"path": str(folder)}])
    assert sorted(s.record.caption for s in lenient.train.samples) == ["", "a cat"]
    strict = pipeline_for(tmp_path, concepts=[{"path": str(folder), "require_caption": True}])
    assert [s.reason for s in strict.train.skipped] == [
        "missing caption without.txt (add it or set require_caption false)"
    ]


def test_recursive_concepts_and_validation_report(tmp_path: Path) -> None:
    write_image(tmp_path / "c" / "top.png", 64, 64)
    write_image(tmp_path / "c" / "sub" / "deep.png", 64, 64)
    write_image(tmp_path / "v" / "held-out.png", 64, 64)
    flat = pipeline_for(tmp_path, concepts=[{"path": str(tmp_path / "c")}])
    assert [s.record.path.name for s in flat.train.samples] == ["top.png"]
    deep = pipeline_for(
        tmp_path,
        concepts=[{"path": str(tmp_path / "c"), "recursive": True, "repeats": 3}],
        validation={"concepts": [{"path": str(tmp_path / "v")}]},
    )
    assert sorted(s.record.path.name for s in deep.train.samples) == ["deep.png", "top.png"]
    lines = deep.report_lines()
    assert f"  data.concepts.0 {tmp_path / 'c'}: 2 images, 6 per epoch" in lines
    assert "validation data: 1 images in 1 concept, 0 files skipped" in lines


def test_rescan_of_an_unchanged_dataset_decodes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "c"
    for i in range(3):
        write_image(folder / f"{i}.png", 64, 64, seed=i)
    first = pipeline_for(tmp_path, concepts=[{"path": str(folder)}])
    import modules.data.scan as scan

    probed: list[Path] = []
    real_probe = scan.probe
    monkeypatch.setattr(
        scan, "probe", lambda path, **kw: probed.append(path) or real_probe(path, **kw)
    )
    again = pipeline_for(tmp_path, concepts=[{"path": str(folder)}])
    assert probed == []
    assert [s.record for s in again.train.samples] == [s.record for s in first.train.samples]
    write_image(folder / "1.png", 64, 64, seed=99)  # replaced: probed (and hashed) again
    changed = pipeline_for(tmp_path, concepts=[{"path": str(folder)}])
    assert probed == [folder / "1.png"]
    assert changed.train.samples[1].record.sha256 != first.train.samples[1].record.sha256


@contextlib.contextmanager
def _deadline(seconds: int) -> Iterator[None]:
    """Fail instead of hanging (a FIFO read waits forever for a writer)."""

    def expire(signum: int, frame: object) -> None:
        raise TimeoutError(f"the scan hung for {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs are a POSIX thing")
def test_fifos_broken_links_and_header_only_images_are_reported(tmp_path: Path) -> None:
    """A FIFO caption used to hang the scan; a broken link was dropped without a word; a JPEG
    whose header claims 121 Mpx over 625 bytes decoded as flat grey and was trained on."""
    folder = tmp_path / "odd"
    write_image(folder / "good.png", 64, 64)
    write_image(folder / "fifo_caption.png", 64, 64, caption=None)
    os.mkfifo(folder / "fifo_caption.txt")
    write_image(folder / "linked_caption.png", 64, 64, caption=None)
    (folder / "linked_caption.txt").symlink_to(tmp_path / "gone.txt")
    (folder / "linked.png").symlink_to(tmp_path / "gone.png")
    os.mkfifo(folder / "pipe.jpg")
    write_header_only_jpeg(folder / "grey.jpg")
    write_image(folder / "masked.png", 64, 64)
    (folder / "masked-mask.png").symlink_to(tmp_path / "gone-mask.png")
    with _deadline(60):
        pipeline = pipeline_for(tmp_path, concepts=[{"path": str(folder)}], masked_training=True)
    skipped = {s.path.name: s.reason for s in pipeline.train.skipped}
    assert skipped == {
        "fifo_caption.png": "caption fifo_caption.txt unreadable: not a regular file (a FIFO, "
        "device or folder)",
        "linked_caption.png": "caption linked_caption.txt is a broken link (its target is missing)",
        "linked.png": "broken link (its target is missing)",
        "pipe.jpg": "not a regular file (a FIFO, socket or device)",
        "grey.jpg": "the header claims 11000x11000 px but the file holds only 625 bytes: "
        "truncated data or a decompression bomb; re-export it",
        "masked.png": "its mask masked-mask.png is a broken link (its target is missing)",
    }
    assert [s.record.path.name for s in pipeline.train.samples] == ["good.png"]


def test_a_file_name_that_is_not_utf8_is_reported_printably(tmp_path: Path) -> None:
    """Such names reach Python as lone surrogates, which a strict UTF-8 stdout cannot print."""
    folder = tmp_path / "c"
    write_image(folder / "ok.png", 64, 64)
    Image.new("RGB", (80, 80)).save(folder / os.fsdecode(b"caf\xe9.gif"), "GIF")
    lines = pipeline_for(tmp_path, concepts=[{"path": str(folder)}]).report_lines()
    shown = f"  skipped {folder}/caf\\xe9.gif: unsupported format (.gif); convert it to png or jpg"
    assert shown in lines
    "\n".join(lines).encode("utf-8", "strict")
