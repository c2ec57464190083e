"""`lora.init_from` continues LoRA files of other trainers on exactly their layers.

Each file is built in its trainer's own naming: sd-scripts' from a reproduction of its network
(tests/interop_tools.py) on the test model's original (SGM) checkpoint layout; diffusers' with
the real diffusers and peft calls its DreamBooth script makes; OneTrainer's default (kohya keys
with diffusers paths) and OMI (`unet.<SGM path>`, `clip_l.`, `clip_g.`) files by their naming.
ai-toolkit writes SDXL files with sd-scripts' names. The continued network must apply exactly the
file's change to every layer: checked per layer against the file, or on the model's outputs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import safetensors.torch
import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig, get_peft_model_state_dict

from modules.config.loading import load_config
from modules.errors import UserError
from modules.lora.formats import read_lora_metadata, save_lora
from modules.lora.init_from import ContinuedNetwork, network_from_file
from modules.lora.layouts import GENERIC_LAYOUTS
from modules.lora.network import LayerCatalog
from modules.models.flux.config import FluxModelConfig
from modules.models.flux.layers import flux_lora_targets
from modules.models.flux.lora_layouts import FLUX_LORA_LAYOUTS, KOHYA_FLUX
from modules.models.sdxl.config import SDXLModelConfig
from modules.models.sdxl.keys import sdxl_lora_layouts
from modules.models.sdxl.layers import sdxl_lora_targets
from modules.training.trainer import TrainingRun, train
from tests import interop_tools as tools
from tests.helpers import tiny_config
from tests.interop_models import ALL_PARTS, make_network, sgm_modules_of
from tests.sgm_checkpoint import write_sgm_checkpoint
from tests.test_lora_formats import rel_err, text_outs, unet_out

LABELS = {spec.name: spec.label for spec in SDXLModelConfig.part_specs()}


@pytest.fixture(scope="module")
def pipe(tiny_sdxl_path: Path) -> StableDiffusionXLPipeline:
    return StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path)


@pytest.fixture(scope="module")
def checkpoint_modules(tiny_sdxl_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    file = write_sgm_checkpoint(tiny_sdxl_path, tmp_path_factory.mktemp("sgm") / "m.safetensors")
    return tools.sgm_modules(safetensors.torch.load_file(file))


@pytest.fixture
def continue_from(pipe: StableDiffusionXLPipeline) -> Iterator[Callable[..., ContinuedNetwork]]:
    """`network_from_file` as the trainer calls it, for a config training `parts`."""
    made: list[ContinuedNetwork] = []

    def run(
        file: Path, *, parts: set[str] = ALL_PARTS, preset: str = "attn", rank: int = 16
    ) -> ContinuedNetwork:
        modules = {part: getattr(pipe, part) for part in ALL_PARTS}
        targets = sdxl_lora_targets(
            modules=modules, train_parts=parts, layer_preset=preset, layer_patterns=[]
        )
        every = sdxl_lora_targets(
            modules=modules, train_parts=ALL_PARTS, layer_preset=preset, layer_patterns=[]
        )
        made.append(
            network_from_file(
                file,
                targets=targets,
                catalog=LayerCatalog(target for target, _ in every),
                layouts=sdxl_lora_layouts(pipe.unet.config),
                part_labels=LABELS,
                model_name="SDXL",
                rank=rank,
                alpha=rank,
                dropout=0.0,
            )
        )
        return made[-1]

    yield run
    for continued in made:
        continued.network.detach()


def random_file(
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]], file: Path, *, alpha: float
) -> dict[str, torch.Tensor]:
    """A kohya file with these layers (lora_name -> down, up shapes), random weights in fp16."""
    generator = torch.Generator().manual_seed(3)
    tensors = {}
    for name, (down, up) in shapes.items():
        tensors[f"{name}.lora_down.weight"] = (0.2 * torch.randn(down, generator=generator)).half()
        tensors[f"{name}.lora_up.weight"] = (0.2 * torch.randn(up, generator=generator)).half()
        tensors[f"{name}.alpha"] = torch.tensor(alpha)
    safetensors.torch.save_file(tensors, file, metadata={"ss_network_module": "networks.lora"})
    return tensors


def assert_continues_exactly(
    continued: ContinuedNetwork, tensors: dict[str, torch.Tensor], checkpoint_modules, unet
) -> None:
    """Every layer of the file has its adapter, whose delta is the file's (up @ down * alpha /
    dim on the checkpoint's module, as kohya loaders compute it, found by A1111's matching)."""
    load = tools.a1111_load(tensors, tools.a1111_layer_mapping(checkpoint_modules))
    assert load.failed == {}
    expected = {}
    for key, weights in load.matched.items():
        module = load.modules[key]
        layer = checkpoint_modules[module]
        third = "qkv".index(key.rsplit("_", 2)[1]) if layer.kind == "mha" else None
        expected[module, third] = tools.a1111_delta(weights, layer)
    network = continued.network
    modules = sgm_modules_of(network, unet)
    from_file = [name for name in network.adapters if modules[name] in expected]
    assert len(from_file) == len(expected)
    for name in from_file:
        got = network.adapters[name].merged_delta_weight().detach()
        torch.testing.assert_close(got, expected[modules[name]], rtol=1e-4, atol=1e-6)


# --- sd-scripts / ai-toolkit -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("conv_dim", "text_encoders"),
    [(None, False), (None, True), (2, True)],
    ids=["default", "with-text-encoders", "conv_dim"],
)
def test_sd_scripts_file_continues_on_its_layers_at_its_ranks(
    conv_dim: int | None,
    text_encoders: bool,
    continue_from,
    pipe: StableDiffusionXLPipeline,
    checkpoint_modules: dict,
    tmp_path: Path,
) -> None:
    """Config: preset attn at rank 16; the file decides: sd-scripts' default layers (attention,
    MLP, proj_in/out) at dim 8, with conv_dim its ResNet convolutions at rank 2 too."""
    shapes = tools.sd_scripts_network(checkpoint_modules, network_dim=8, conv_dim=conv_dim)
    if text_encoders:
        for prefix, encoder in (("lora_te1", pipe.text_encoder), ("lora_te2", pipe.text_encoder_2)):
            shapes |= tools.sd_scripts_text_encoder(encoder, prefix=prefix, network_dim=8)
    file = tmp_path / "sd_scripts.safetensors"
    tensors = random_file(shapes, file, alpha=4.0)

    continued = continue_from(file)
    assert_continues_exactly(continued, tensors, checkpoint_modules, pipe.unet)
    network = continued.network
    ranks = {a.rank for name, a in network.adapters.items() if network.part_of[name] == "unet"}
    assert ranks == ({8, 2} if conv_dim else {8})
    # the config trains the text encoders: without layers in the file they start fresh
    new = [a for name, a in network.adapters.items() if network.part_of[name] != "unet"]
    assert len(network.adapters) == len(shapes) + (0 if text_encoders else len(new))
    assert text_encoders or (
        {a.rank for a in new} == {16} and not any(a.lora_up.weight.any() for a in new)
    )
    assert continued.summary.startswith(
        f"lora.init_from: continuing the kohya file {file.name}: UNet "
    )
    assert ("new layers at lora.rank 16" in continued.summary) != text_encoders


def test_text_encoder_layers_of_a_frozen_part_are_named(
    continue_from, pipe: StableDiffusionXLPipeline, checkpoint_modules: dict, tmp_path: Path
) -> None:
    shapes = tools.sd_scripts_network(checkpoint_modules, network_dim=8, conv_dim=None)
    shapes |= tools.sd_scripts_text_encoder(pipe.text_encoder, prefix="lora_te1", network_dim=8)
    file = tmp_path / "with_te.safetensors"
    random_file(shapes, file, alpha=8.0)
    with pytest.raises(UserError) as excinfo:
        continue_from(file, parts={"unet"})
    message = str(excinfo.value)
    assert "\n" not in message and str(file) in message
    assert "LoRA layers of the CLIP-L text encoder" in message
    assert "model.text_encoder.train=true" in message
    assert "'lora_te1_text_model_encoder_layers_0_" in message


# --- diffusers' DreamBooth / text-to-image LoRA scripts --------------------------------------


@pytest.mark.parametrize("keys", ["diffusers", "peft"])
def test_diffusers_dreambooth_file_gives_its_outputs(
    keys: str, continue_from, tiny_sdxl_path: Path, pipe: StableDiffusionXLPipeline, tmp_path: Path
) -> None:
    """As train_dreambooth_lora_sdxl.py saves: PEFT adapters on the UNet's attention and the text
    encoders' attention, `convert_state_dict_to_diffusers` (old `.lora.down.weight` /
    `.lora_linear_layer.down.weight` keys) or PEFT keys with lora_alpha in the header."""
    reference = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path)
    alpha = 4 if keys == "diffusers" else 8  # the header case: scale 2
    unet_config = LoraConfig(
        r=4,
        lora_alpha=alpha,
        init_lora_weights="gaussian",
        target_modules=["to_k", "to_q", "to_v", "to_out.0"],
    )
    text_config = LoraConfig(
        r=4,
        lora_alpha=alpha,
        init_lora_weights="gaussian",
        target_modules=["q_proj", "k_proj", "v_proj", "out_proj"],
    )
    reference.unet.add_adapter(unet_config)
    reference.text_encoder.add_adapter(text_config)
    reference.text_encoder_2.add_adapter(text_config)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for model in (reference.unet, reference.text_encoder, reference.text_encoder_2):
            for name, parameter in model.named_parameters():
                if "lora_B" in name:  # gaussian init leaves B at zero
                    parameter.copy_(0.2 * torch.randn(parameter.shape, generator=generator))
    layers = {
        part: get_peft_model_state_dict(getattr(reference, part))
        for part in ("unet", "text_encoder", "text_encoder_2")
    }
    if keys == "diffusers":
        layers = {part: convert_state_dict_to_diffusers(state) for part, state in layers.items()}
    metadata = (
        {}
        if keys == "diffusers"
        else {
            "unet_lora_adapter_metadata": unet_config.to_dict(),
            "text_encoder_lora_adapter_metadata": text_config.to_dict(),
            "text_encoder_2_lora_adapter_metadata": text_config.to_dict(),
        }
    )
    StableDiffusionXLPipeline.save_lora_weights(
        tmp_path,
        unet_lora_layers=layers["unet"],
        text_encoder_lora_layers=layers["text_encoder"],
        text_encoder_2_lora_layers=layers["text_encoder_2"],
        **metadata,
    )
    file = tmp_path / "pytorch_lora_weights.safetensors"
    written = safetensors.torch.load_file(file)
    marker = ".lora.down.weight" if keys == "diffusers" else ".lora_A.weight"
    assert any(key.startswith("unet.") and key.endswith(marker) for key in written)
    assert ("lora_adapter_metadata" in read_lora_metadata(file)) == (keys == "peft")

    continued = continue_from(file, preset="attn-mlp")  # the file has attention only
    attention = {"to_q", "to_k", "to_v", "to_out_0", "q_proj", "k_proj", "v_proj", "out_proj"}
    assert len(continued.network.adapters) == len(written) // 2
    assert all(
        any(name.endswith(suffix) for suffix in attention) for name in continued.network.adapters
    )
    assert rel_err(unet_out(pipe), unet_out(reference)) < 1e-5
    ours, theirs = text_outs(pipe), text_outs(reference)
    for what, ref in theirs.items():
        assert rel_err(ours[what], ref) < 1e-5, what


# --- OneTrainer ------------------------------------------------------------------------------


@pytest.mark.parametrize("naming", ["onetrainer-default", "onetrainer-omi", "geodesic"])
def test_onetrainer_and_own_files_continue_exactly(
    naming: str, continue_from, pipe: StableDiffusionXLPipeline, checkpoint_modules, tmp_path: Path
) -> None:
    """OneTrainer's default files: kohya keys with diffusers paths (what Geodesic wrote before);
    its OMI files: `unet.<SGM path>`, `clip_l.` / `clip_g.` + CLIP path, kohya suffixes."""
    saved = make_network(pipe, preset="full", rank=4, alpha=2.0, seed=7)
    saved.detach()
    if naming == "onetrainer-default":
        saved.layouts = GENERIC_LAYOUTS
    file = tmp_path / "lora.safetensors"
    save_lora(saved, file, layout="kohya", metadata={}, dtype=torch.float32)
    tensors = safetensors.torch.load_file(file)
    if naming == "onetrainer-omi":
        modules = sgm_modules_of(saved, pipe.unet)
        omi_part = {"unet": "unet", "text_encoder": "clip_l", "text_encoder_2": "clip_g"}
        renamed = {}
        layout = sdxl_lora_layouts(pipe.unet.config)[0]
        for name in saved.adapters:
            part = saved.part_of[name]
            path = (
                modules[name][0].removeprefix(tools.UNET)
                if part == "unet"
                else saved.export_path[name]
            )
            for suffix in (".lora_down.weight", ".lora_up.weight", ".alpha"):
                renamed[f"{omi_part[part]}.{path}{suffix}"] = tensors[
                    layout.stem(saved, name) + suffix
                ]
        safetensors.torch.save_file(renamed, file)
        assert "unet.input_blocks.3.1.transformer_blocks.0.attn1.to_q.lora_down.weight" in renamed

    continued = continue_from(file)
    assert set(continued.network.adapters) == set(saved.adapters)
    for name, adapter in continued.network.adapters.items():
        want = saved.adapters[name].merged_delta_weight()
        torch.testing.assert_close(adapter.merged_delta_weight(), want, rtol=1e-5, atol=1e-7)


def test_a_continued_run_trains_and_saves_the_files_layers(
    tiny_sdxl_path: Path, tiny_dataset_path: Path, checkpoint_modules, pipe, tmp_path: Path, capsys
) -> None:
    """Through the trainer: an sd-scripts file with conv_dim and text-encoder layers, a config
    with another preset and rank; the saved LoRA has the file's keys, shapes and ranks."""
    shapes = tools.sd_scripts_network(checkpoint_modules, network_dim=8, conv_dim=2)
    for prefix, encoder in (("lora_te1", pipe.text_encoder), ("lora_te2", pipe.text_encoder_2)):
        shapes |= tools.sd_scripts_text_encoder(encoder, prefix=prefix, network_dim=8)
    file = tmp_path / "sd_scripts.safetensors"
    tensors = random_file(shapes, file, alpha=4.0)
    raw = tiny_config(
        tiny_sdxl_path,
        tiny_dataset_path,
        tmp_path / "run",
        lora={"rank": 16, "alpha": 16, "layer_preset": "attn", "init_from": str(file)},
        training={"max_steps": 1},
        model={"text_encoder": {"train": True}, "text_encoder_2": {"train": True}},
        output={"save_dtype": "float32"},
    )
    result = train(load_config(raw=raw))
    out = safetensors.torch.load_file(result.paths.output)
    assert set(out) == set(tensors)
    assert all(out[key].shape == tensors[key].shape for key in tensors)
    assert any(not torch.equal(out[k], tensors[k].float()) for k in out if k.endswith("up.weight"))
    printed = capsys.readouterr().out
    assert f"lora.init_from: continuing the kohya file {file.name}" in printed

    raw["model"] = {"base_model": str(tiny_sdxl_path)}  # the text encoders frozen again
    with pytest.raises(UserError, match=r"set model\.text_encoder\.train=true"):
        TrainingRun(load_config(raw=raw))


# --- files that cannot be continued: one line that says why ----------------------------------


def _write(file: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> Path:
    safetensors.torch.save_file({k: v.clone() for k, v in tensors.items()}, file, metadata=metadata)
    return file


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("flux", "name no layer of this SDXL model"),
        ("wrong shape", "takes (4, 64); the file was trained for another base model"),
        ("loha", "holds LyCORIS LoHa weights"),
        ("dora", "holds DoRA weights"),
        ("embedding", "bundled textual-inversion embedding"),
        ("no up", "is missing; the file is cut short"),
        ("twice", "both hold LoRA layer"),
        ("alpha not a number", "should be one finite number"),
        ("truncated", "not a readable .safetensors file"),
        ("header garbage", "not a readable .safetensors file"),
        ("adapter metadata not json", "'lora_adapter_metadata' is not valid JSON"),
        ("adapter metadata not object", "should be a JSON object"),
        ("adapter rank not a number", "unet.r = 'four', not a valid number"),
        ("empty", "holds no tensors"),
    ],
)
def test_bad_files_are_one_clear_line(
    case: str, expected: str, continue_from, pipe, checkpoint_modules, tmp_path: Path
) -> None:
    stem = "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q"
    down, up = torch.zeros(4, 64), torch.zeros(64, 4)
    good = {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up}
    peft = {
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": down,
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": up,
    }
    file = tmp_path / "bad.safetensors"
    if case == "flux":
        _write(file, {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": down, **good})
    elif case == "wrong shape":
        _write(file, {f"{stem}.lora_down.weight": torch.zeros(4, 40), f"{stem}.lora_up.weight": up})
    elif case == "loha":
        _write(file, {f"{stem}.hada_w1_a": down, **good})
    elif case == "dora":
        _write(file, {f"{stem}.dora_scale": torch.ones(1, 64), **good})
    elif case == "embedding":
        _write(file, {"bundle_emb.sks.clip_l": torch.zeros(1, 32), **good})
    elif case == "no up":
        _write(file, {f"{stem}.lora_down.weight": down})
    elif case == "twice":
        _write(
            file,
            {
                **good,
                "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": down,
            },
        )
    elif case == "alpha not a number":
        _write(file, {**good, f"{stem}.alpha": torch.tensor([1, 2])})
    elif case == "truncated":
        network = make_network(pipe, preset="attn")
        network.detach()
        save_lora(network, file, layout="kohya", metadata={})
        file.write_bytes(file.read_bytes()[:-100])
    elif case == "header garbage":
        file.write_bytes((40).to_bytes(8, "little") + b"{not json" + b" " * 31)
    elif case == "adapter metadata not json":
        _write(file, peft, {"lora_adapter_metadata": "{"})
    elif case == "adapter metadata not object":
        _write(file, peft, {"lora_adapter_metadata": "[1]"})
    elif case == "adapter rank not a number":
        header = '{"unet.r": "four", "unet.lora_alpha": 4}'
        _write(file, peft, {"lora_adapter_metadata": header})
    elif case == "empty":
        _write(file, {})
    with pytest.raises(UserError) as excinfo:
        continue_from(file)
    message = str(excinfo.value)
    assert "\n" not in message and str(file) in message
    assert expected in message


# --- Flux: fused layers ----------------------------------------------------------------------


def _continue_flux(flux_pipe, file: Path, *, rank: int) -> ContinuedNetwork:
    modules = {"transformer": flux_pipe.transformer, "text_encoder": flux_pipe.text_encoder}
    targets = flux_lora_targets(
        modules=modules, train_parts=set(modules), layer_preset="attn", layer_patterns=[]
    )
    return network_from_file(
        file,
        targets=targets,
        catalog=LayerCatalog(target for target, _ in targets),
        layouts=FLUX_LORA_LAYOUTS,
        part_labels={spec.name: spec.label for spec in FluxModelConfig.part_specs()},
        model_name="FLUX",
        rank=rank,
        alpha=rank,
        dropout=0.0,
    )


def test_flux_fused_layers_continue_at_the_files_ranks(
    flux_pipe, flux_network_on, tmp_path: Path
) -> None:
    """sd-scripts' Flux files hold one dense LoRA per BFL layer: every member of a fused layer
    (q, k, v, MLP input) continues at the file's rank 8, not lora.rank 4, and the fused layer's
    delta is the file's. Our own file of only q/k/v of a single block's fused layer continues
    on exactly those three, at their rank."""
    named = flux_network_on(preset="attn-mlp", rank=4)
    generator = torch.Generator().manual_seed(5)
    tensors, fused = {}, {}
    for stem, layer in KOHYA_FLUX.layers(named).items():
        some = named.adapters[next(iter(layer.adapters.values()))]
        width = some.lora_down.weight.shape[1]
        is_fused = layer.bfl is not None and layer.bfl.fused
        rows = sum(size for _, size in layer.rows(width)) if is_fused else some.base.out_features
        tensors[f"{stem}.lora_down.weight"] = torch.randn(8, width, generator=generator)
        tensors[f"{stem}.lora_up.weight"] = torch.randn(rows, 8, generator=generator)
        tensors[f"{stem}.alpha"] = torch.tensor(2.0)
        fused[stem] = [layer.adapters[i] for i in sorted(layer.adapters)]
    named.detach()
    file = tmp_path / "sd_scripts_flux.safetensors"
    safetensors.torch.save_file(tensors, file)

    continued = _continue_flux(flux_pipe, file, rank=4)
    network = continued.network
    try:
        assert sorted(network.adapters) == sorted(named.adapters)
        assert {adapter.rank for adapter in network.adapters.values()} == {8}
        for stem, members in fused.items():
            want = 0.25 * tensors[f"{stem}.lora_up.weight"] @ tensors[f"{stem}.lora_down.weight"]
            got = torch.cat([network.adapters[name].merged_delta_weight() for name in members])
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    finally:
        network.detach()

    qkv = flux_network_on(patterns=[r"re:^single_transformer_blocks\.0\.attn\.to_[qkv]$"])
    ours = tmp_path / "ours.safetensors"
    save_lora(qkv, ours, layout="kohya", metadata={}, dtype=torch.float32)
    qkv.detach()
    partial = _continue_flux(flux_pipe, ours, rank=16).network
    try:
        assert sorted(partial.adapters) == sorted(qkv.adapters)
        for name, adapter in partial.adapters.items():
            assert adapter.rank == 4
            torch.testing.assert_close(
                adapter.merged_delta_weight(), qkv.adapters[name].merged_delta_weight()
            )
    finally:
        partial.detach()
