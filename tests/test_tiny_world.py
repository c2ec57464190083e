"""The tiny world: its images say what their captions say, its tokenizer, its pretrained model."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPTokenizer

from modules.config.schema import TrainConfig
from modules.data import tiny_world
from modules.models.registry import get_family
from modules.models.sdxl.tiny_world import world_tokenizer
from tests import tiny_world_vision as vision
from tests.helpers import cli_env, run_cli

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "resources" / "tiny-world-sdxl"


def test_images_show_what_their_captions_say():
    scenes = tiny_world.random_scenes(40, seed=3)
    images = tiny_world.render(scenes)
    assert images.shape == (40, 3, 64, 64) and images.min() >= 0 and images.max() <= 1
    for scene, image in zip(scenes, images, strict=True):
        mask = vision.shape_mask(image, scene.background)
        x, y = vision.centroid(mask)
        want_x, want_y = tiny_world.POSITIONS[scene.position]
        assert abs(x - want_x) < 0.2 and abs(y - want_y) < 0.25, (scene, x, y)
        colour = image[:, mask].mean(1)
        assert vision.nearest_colour(colour) == scene.colour, (scene, colour)
        assert vision.recognised_shape(image) == scene.shape, scene
        other_size = "small" if scene.size == "large" else "large"
        other = tiny_world.render([dataclasses.replace(scene, size=other_size)])[0]
        ratio = mask.float().sum() / vision.shape_mask(other, scene.background).float().sum()
        assert ratio > 2 if scene.size == "large" else ratio < 0.5, (scene, float(ratio))


def test_the_novel_shape_is_none_of_the_worlds_shapes():
    """Same place, size and colour: the heart's silhouette differs from each world shape's by
    a good part of its area, so a model that learned it visibly draws something new."""
    common = {"colour": "red", "size": "large", "position": "center", "background": "white"}
    heart_image = tiny_world.render([tiny_world.Scene(shape="heart", **common)])[0]
    heart = vision.shape_mask(heart_image, "white")
    assert vision.recognised_shape(heart_image) == "heart"
    for shape in tiny_world.WORLD_SHAPES:
        other = vision.shape_mask(
            tiny_world.render([tiny_world.Scene(shape=shape, **common)])[0], "white"
        )
        differing = (heart ^ other).float().sum() / heart.float().sum()
        assert differing > 0.25, (shape, float(differing))
    assert tiny_world.NOVEL_SHAPE not in tiny_world.CAPTION_WORDS
    assert tiny_world.TRIGGER_WORD not in tiny_world.CAPTION_WORDS


def test_scenes_and_captions_are_fixed_by_their_seed():
    first = tiny_world.random_scenes(5, seed=11)
    assert first == tiny_world.random_scenes(5, seed=11)
    assert first != tiny_world.random_scenes(5, seed=12)
    assert torch.equal(tiny_world.render(first), tiny_world.render(first))
    captions = tiny_world.random_captions(first, seed=1)
    assert captions == tiny_world.random_captions(first, seed=1)
    words = {w.strip(",") for caption in captions for w in caption.split()}
    assert words <= set(tiny_world.CAPTION_WORDS)


def test_caption_grammar():
    scene = tiny_world.Scene(
        shape="circle", colour="orange", size="small", position="left", background="gray"
    )
    assert scene.caption() == "a small orange circle on the left, on a gray background"
    keep = (False, True, False, False)
    assert scene.caption(keep=keep) == "an orange circle"
    assert scene.caption(noun="zorb", keep=(False,) * 4) == "a zorb"


def test_concept_dataset_is_a_user_style_folder(tmp_path: Path):
    folder = tiny_world.write_concept_dataset(tmp_path / "zorbs", count=3, seed=0)
    images = sorted(folder.glob("*.png"))
    assert [p.stem for p in images] == ["000", "001", "002"]
    for image in images:
        caption = image.with_suffix(".txt").read_text(encoding="utf-8")
        assert tiny_world.TRIGGER_WORD in caption.split()
        assert Image.open(image).size == (64, 64)


def test_world_tokenizer_has_a_token_per_world_word(tmp_path: Path):
    tokenizer = world_tokenizer(tiny_world.CAPTION_WORDS)
    for word in tiny_world.CAPTION_WORDS:
        assert tokenizer.tokenize(word) == [f"{word}</w>"], word
    # anything else still tokenizes into known pieces (no unknown token)
    pieces = tokenizer.tokenize(f"a {tiny_world.TRIGGER_WORD}, café!")
    assert len(pieces) > 3 and tokenizer.unk_token not in pieces
    tokenizer.save_pretrained(tmp_path)
    loaded = CLIPTokenizer.from_pretrained(tmp_path)
    text = "a large red circle on the left, on a white background"
    assert loaded(text).input_ids == tokenizer(text).input_ids
    assert len(loaded(text).input_ids) == 2 + len(text.replace(",", " ,").split())


def test_world_tokenizer_is_the_same_in_every_process():
    """Its vocabulary numbers the text encoders' embedding rows: a pretraining run resumed in a
    new process (or rerun from its seed) must get the same numbers."""
    words = tiny_world.CAPTION_WORDS
    code = (
        "import json; from modules.data.tiny_world import CAPTION_WORDS; "
        "from modules.models.sdxl.tiny_world import world_tokenizer; "
        "print(json.dumps(world_tokenizer(CAPTION_WORDS).get_vocab()))"
    )
    other = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=cli_env()
    )
    assert other.returncode == 0, other.stderr[-2000:]
    vocab = world_tokenizer(words).get_vocab()
    assert json.loads(other.stdout.strip().splitlines()[-1]) == vocab
    assert world_tokenizer(list(reversed(words))).get_vocab() == vocab


# -- the pretrained model in resources/ -------------------------------------------------------------


def test_pretrained_world_model_is_small_and_safe():
    files = [f for f in MODEL.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) < 30 * 2**20
    weights = [f for f in files if f.suffix in (".safetensors", ".bin", ".pt", ".ckpt", ".pth")]
    assert weights and all(f.suffix == ".safetensors" for f in weights)
    index = json.loads((MODEL / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"


@pytest.fixture(scope="module")
def world_model():
    config = TrainConfig.model_validate({"model": {"base_model": str(MODEL)}})
    family = get_family("sdxl")
    return family, family.load(config)


@pytest.mark.parametrize(
    ("shape", "colour", "background"),
    [
        ("circle", "red", "white"),
        ("circle", "orange", "gray"),
        ("triangle", "green", "white"),
        ("diamond", "green", "gray"),
        ("square", "blue", "gray"),
        ("cross", "purple", "gray"),
    ],
)
def test_pretrained_world_model_draws_what_it_is_asked(world_model, shape, colour, background):
    """The loaded model (through the loader a user's model takes) draws the asked shape in the
    asked colour for most seeds. What it cannot do yet (docs/benchmarks.md, tiny world
    pretraining): yellow and purple reliably (they drift to orange and blue), black backgrounds,
    placement and backgrounds beyond a loose follow."""
    family, base = world_model
    prompt = f"a large {colour} {shape} in the center, on a {background} background"
    images = family.sampling_pipeline(base)(
        prompt=[prompt] * 4,
        num_inference_steps=20,
        guidance_scale=5.0,
        height=64,
        width=64,
        generator=[torch.Generator().manual_seed(s) for s in range(4)],
        output_type="pt",
    ).images
    seen = []
    for image in images:
        mask = vision.shape_mask(image)
        drawn = 0.02 < mask.float().mean() < 0.5
        colour_seen = vision.nearest_colour(image[:, mask].mean(1)) if drawn else None
        seen.append((vision.recognised_shape(image) if drawn else None, colour_seen))
    assert seen.count((shape, colour)) >= 2, (prompt, seen)


@pytest.mark.slow
def test_pretraining_script_runs_and_resumes(tmp_path: Path):
    """A few steps of every stage; killed after the denoiser's second step, the rerun resumes."""
    args = [
        sys.executable,
        str(REPO / "scripts" / "pretrain_tiny_world.py"),
        *["--out", str(tmp_path / "model"), "--work", str(tmp_path / "work")],
        *["--sheet", str(tmp_path / "sheet.png"), "--images", "32", "--batch", "2"],
        *["--vae-steps", "2", "--vae-crop-steps", "1", "--vae-batch", "2"],
        *["--checkpoint-every", "2", "--sheet-every", "0", "--no-docs"],
    ]
    env = cli_env()
    first = subprocess.run(
        [*args, "--unet-steps", "2"], capture_output=True, text=True, env=env, timeout=300
    )
    assert first.returncode == 0, first.stderr[-2000:]
    second = subprocess.run(
        [*args, "--unet-steps", "3"], capture_output=True, text=True, env=env, timeout=300
    )
    assert second.returncode == 0, second.stderr[-2000:]
    assert "denoiser: resumed at step 2" in second.stdout
    assert "vae step" not in second.stdout  # the finished VAE stage is not redone
    config = TrainConfig.model_validate({"model": {"base_model": str(tmp_path / "model")}})
    base = get_family("sdxl").load(config)
    assert base.vae.config.scaling_factor != 1.0
    assert Image.open(tmp_path / "sheet.png").size == (4 * 64, 8 * 64)


def _grid_cells(path: Path, rows: int, columns: int, size: int = 64, gap: int = 4) -> list:
    """The images of a before/after grid (modules/sampling/sampler.py's `comparison_grid`), by
    row: the label column is whatever is left of the sheet's width."""
    sheet = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1) / 255
    left = sheet.shape[-1] - columns * (size + gap)
    return [
        [
            sheet[:, gap + r * (size + gap) :, left + c * (size + gap) :][:, :size, :size]
            for c in range(columns)
        ]
        for r in range(rows)
    ]


@pytest.mark.slow
def test_demo_teaches_the_novel_shape(tmp_path: Path):
    """`make demo`'s two commands on the shipped preset: the before/after grid shows no heart
    with the LoRA off and hearts with it on; the loss curve and the LoRA are written."""
    env = cli_env()
    prepared = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "prepare_demo.py"), "--root", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert prepared.returncode == 0, prepared.stderr
    preset = json.loads((REPO / "training_presets" / "demo.json").read_text(encoding="utf-8"))
    result = run_cli(
        *["--config-path", str(REPO / "training_presets" / "demo.json")],
        *["--set", f"output.workspace_dir={tmp_path / 'run'}"],
        *["--set", f'data.concepts=[{{"path": "{tmp_path / "dataset"}"}}]'],
        *["--set", f'data.validation.concepts=[{{"path": "{tmp_path / "validation"}"}}]'],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    prompts = preset["sampling"]["prompts"]
    before, after = _grid_cells(tmp_path / "run" / "samples" / "before_after.png", 2, len(prompts))
    shapes_before = [vision.recognised_shape(image) for image in before]
    shapes_after = [vision.recognised_shape(image) for image in after]
    heart = tiny_world.NOVEL_SHAPE
    assert shapes_before.count(heart) <= 1, shapes_before
    assert shapes_after.count(heart) >= len(prompts) - 2, shapes_after
    assert (tmp_path / "run" / "loss.png").stat().st_size > 0
    assert (tmp_path / "run" / f"{preset['output']['name']}.safetensors").is_file()
