"""Continue training from a LoRA file, whichever trainer wrote it (`lora.init_from`).

The file decides the layers: the network is built on exactly the layers it holds, each at the
file's own rank (sd-scripts' conv_dim gives ResNet convolutions another rank than the rest), so
training continues on what the file trained. A trained part the file has no layers for gets new
adapters as the config says (lora.layer_preset / layer_patterns at lora.rank). The family's
layouts resolve the names other trainers give a layer, so a file from sd-scripts, ai-toolkit,
OneTrainer or diffusers' scripts reads like our own; a key that names no layer of the model at
all means the file is for another model, and the message says so.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from modules.errors import UserError
from modules.lora.formats import copy_into, detect_layout, read_lora_file
from modules.lora.layouts import AdapterWeights, LoRALayout
from modules.lora.network import LayerCatalog, LayerRef, LoRANetwork, LoRATarget, target_layers


@dataclass(frozen=True)
class ContinuedNetwork:
    network: LoRANetwork
    summary: str  # one line for the run's report: what came from the file, what is new


def network_from_file(
    path: str | Path,
    *,
    targets: Sequence[tuple[LoRATarget, list[str]]],
    catalog: LayerCatalog,
    layouts: Sequence[LoRALayout],
    part_labels: Mapping[str, str],
    model_name: str,
    rank: int,
    alpha: float,
    dropout: float,
) -> ContinuedNetwork:
    """The network for a run that continues the LoRA at `path`, its weights loaded.

    `targets` are what the config trains (with its layer patterns); `catalog` holds every layer
    of every part a LoRA could go on, so a file's layers in a part the config leaves frozen are
    named as such rather than as unknown.
    """
    path = Path(path)
    tensors, metadata = read_lora_file(path)
    layout = detect_layout(layouts, path, list(tensors))
    decoded = layout.decode(catalog, tensors, metadata, path=path)
    if decoded.unknown:
        raise UserError(
            f"{path}: {len(decoded.unknown)} of its {len(tensors)} keys name no layer of this "
            f"{model_name} model (first {decoded.unknown[0]!r}); it is a LoRA for another model"
        )
    weights = {
        name: _fitted(path, catalog.layers[name], part_labels, file_weights)
        for name, file_weights in decoded.weights.items()
    }
    file_parts = _layers_per_part(catalog, weights)
    trained = [target.part for target, _ in targets]
    for part, names in file_parts.items():
        if part not in trained:
            raise UserError(
                f"{path}: the file has {len(names)} LoRA layers of the {part_labels[part]} "
                f"(first {weights[names[0]].keys[0]!r}) but this config does not train it; set "
                f"model.{part}.train=true to continue them"
            )

    layers: list[LayerRef] = []
    new_parts = []
    for target, patterns in targets:  # the parts in the config's order, as a new run has them
        if target.part in file_parts:
            layers += [catalog.layers[name] for name in file_parts[target.part]]
        else:
            layers += target_layers(target, patterns)
            new_parts.append(target.part)
    ranks = {
        layer.name: weights[layer.name].down.shape[0] if layer.name in weights else rank
        for layer in layers
    }
    network = LoRANetwork.on_layers(
        layers, rank=ranks, alpha=alpha, dropout=dropout, layouts=layouts
    )
    copy_into(network, weights, path)

    from_file = ", ".join(
        f"{part_labels[part]} {len(names)} (rank {_ranks(ranks, names)})"
        for part, names in file_parts.items()
    )
    summary = f"lora.init_from: continuing the {layout.name} file {path.name}: {from_file}"
    if new_parts:
        labels = ", ".join(part_labels[part] for part in new_parts)
        summary += f"; new layers at lora.rank {rank}: {labels}"
    return ContinuedNetwork(network=network, summary=summary)


def _layers_per_part(
    catalog: LayerCatalog, weights: Mapping[str, AdapterWeights]
) -> dict[str, list[str]]:
    """Part -> the file's adapter names in it, in the model's own layer order."""
    parts: dict[str, list[str]] = defaultdict(list)
    for name in catalog.layers:
        if name in weights:
            parts[catalog.part_of[name]].append(name)
    return dict(parts)


def _ranks(ranks: Mapping[str, int], names: list[str]) -> str:
    return "/".join(str(rank) for rank in sorted(Counter(ranks[name] for name in names)))


def _fitted(
    path: Path, layer: LayerRef, part_labels: Mapping[str, str], weights: AdapterWeights
) -> AdapterWeights:
    """The file's factors shaped as an adapter on `layer` at the file's rank; a factor that
    does not fit the layer means the file is for another model, and the message says so."""
    module, down = layer.module, weights.down
    rank = down.shape[0] if down.dim() >= 2 else 0
    if rank < 1:
        raise UserError(f"{path}: key {weights.keys[0]!r} has shape {tuple(down.shape)}, no rank")
    if isinstance(module, nn.Conv2d):
        want_down = (rank, module.in_channels, *module.kernel_size)
        want_up = (module.out_channels, rank, 1, 1)
    else:
        want_down, want_up = (rank, module.in_features), (module.out_features, rank)
    where = f"the {part_labels[layer.part]} layer {layer.module_path}"
    return replace(
        weights,
        down=_reshaped(path, weights.keys[0], weights.down, want_down, where),
        up=_reshaped(path, weights.keys[1], weights.up, want_up, where),
    )


def _reshaped(
    path: Path, key: str, tensor: torch.Tensor, want: tuple[int, ...], where: str
) -> torch.Tensor:
    """`tensor` as shape `want`; trailing 1x1 dimensions may be there or not (tools differ on
    whether a 1x1 convolution's factors are stored as 2-D matrices)."""
    got = tuple(tensor.shape)
    if got == want:
        return tensor
    if _without_trailing_ones(got) == _without_trailing_ones(want):
        return tensor.reshape(want)
    raise UserError(
        f"{path}: key {key!r} has shape {got} but {where} takes {want}; the file was trained "
        "for another base model"
    )


def _without_trailing_ones(shape: tuple[int, ...]) -> tuple[int, ...]:
    while len(shape) > 2 and shape[-1] == 1:
        shape = shape[:-1]
    return shape
