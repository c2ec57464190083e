"""The set of LoRA adapters injected into one model, and how layers are chosen for them."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

from modules.errors import UserError
from modules.lora.layers import LoRAModule, UnsupportedLayerError, lora_for

if TYPE_CHECKING:
    from modules.lora.layouts import LoRALayout


@dataclass(frozen=True)
class LoRATarget:
    """One model part that can carry LoRA (the UNet, a text encoder, ...)."""

    part: str  # config name of the part (PartSpec.name)
    kohya_prefix: str  # prefix of its adapters' names (PartSpec.kohya_prefix)
    model: nn.Module
    kohya_path: Callable[[str], str] = lambda path: path  # module path as kohya tools name it


def compile_patterns(patterns: Iterable[str]) -> list[tuple[str, re.Pattern[str]]]:
    """A pattern is a substring of the module path, or a regular expression after `re:`."""
    compiled = []
    for pattern in patterns:
        if pattern.startswith("re:"):
            try:
                compiled.append((pattern, re.compile(pattern[3:])))
            except re.error as error:
                raise UserError(
                    f"layer pattern {pattern!r} is not a valid regex: {error}"
                ) from None
        else:
            compiled.append((pattern, re.compile(re.escape(pattern))))
    return compiled


def select_layers(
    model: nn.Module, *, patterns: list[str] | None, part: str
) -> list[tuple[str, nn.Module]]:
    """Linear/Conv2d modules whose path matches any pattern (every one when `patterns` is None);
    every pattern must match something."""
    compiled = compile_patterns(patterns or [])
    used: set[str] = set()
    selected = []
    for path, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        hits = [raw for raw, regex in compiled if regex.search(path)]
        used.update(hits)
        if hits or patterns is None:
            selected.append((path, module))
    unmatched = [raw for raw, _ in compiled if raw not in used]
    if unmatched:
        raise UserError(
            f"lora layer pattern(s) {', '.join(map(repr, unmatched))} match no Linear or Conv2d "
            f"layer of the {part}; check lora.layer_patterns or use a layer preset"
        )
    return selected


@dataclass(frozen=True)
class LayerRef:
    """One layer a LoRA can go on, under the name its adapter has."""

    name: str  # `<kohya prefix>_<export path with dots as underscores>`
    part: str
    module_path: str  # inside its part
    export_path: str  # as kohya/diffusers files name it
    module: nn.Module


def target_layers(target: LoRATarget, patterns: list[str] | None) -> list[LayerRef]:
    """The layers of `target` that `patterns` select (every Linear/Conv2d when None)."""
    layers = []
    for path, module in select_layers(target.model, patterns=patterns, part=target.part):
        exported = target.kohya_path(path)
        name = f"{target.kohya_prefix}_{exported.replace('.', '_')}"
        layers.append(LayerRef(name, target.part, path, exported, module))
    return layers


class LayerCatalog:
    """Every layer of some targets a LoRA can go on, by adapter name: what a LoRA file from
    another trainer, which may cover any of them, is matched against."""

    def __init__(self, targets: Iterable[LoRATarget]) -> None:
        self.layers = {
            layer.name: layer for target in targets for layer in target_layers(target, None)
        }
        self.part_of = {name: layer.part for name, layer in self.layers.items()}
        self.module_path = {name: layer.module_path for name, layer in self.layers.items()}
        self.export_path = {name: layer.export_path for name, layer in self.layers.items()}


class LoRANetwork(nn.Module):
    """All adapters of a run, keyed by their kohya name (`<kohya prefix>_<module path>`), and
    the file layouts of the model family they were injected into."""

    def __init__(
        self,
        adapters: Iterable[LoRAModule],
        *,
        part_of: dict[str, str],
        module_path: dict[str, str],
        export_path: dict[str, str],
        layouts: Sequence[LoRALayout] = (),
    ) -> None:
        super().__init__()
        self.adapters = nn.ModuleDict({adapter.name: adapter for adapter in adapters})
        self.part_of = part_of  # adapter name -> model part ("unet", "text_encoder", ...)
        self.module_path = module_path  # adapter name -> module path inside its part
        self.export_path = export_path  # adapter name -> that path as kohya/diffusers files name it
        self.layouts = tuple(layouts)  # empty: the generic kohya and diffusers layouts

    @classmethod
    def inject(
        cls,
        targets: Iterable[tuple[LoRATarget, list[str]]],
        *,
        rank: int,
        alpha: float,
        dropout: float,
        layouts: Sequence[LoRALayout] = (),
    ) -> LoRANetwork:
        """Create and attach adapters on every layer selected by the patterns of each target."""
        layers = [
            layer for target, patterns in targets for layer in target_layers(target, patterns)
        ]
        return cls.on_layers(layers, rank=rank, alpha=alpha, dropout=dropout, layouts=layouts)

    @classmethod
    def on_layers(
        cls,
        layers: Iterable[LayerRef],
        *,
        rank: int | Mapping[str, int],
        alpha: float,
        dropout: float,
        layouts: Sequence[LoRALayout] = (),
    ) -> LoRANetwork:
        """Create and attach adapters on `layers`; `rank` may give each adapter name its own."""
        adapters, part_of, module_path, export_path = [], {}, {}, {}
        for layer in layers:
            layer_rank = rank if isinstance(rank, int) else rank[layer.name]
            try:
                adapter = lora_for(
                    layer.module, name=layer.name, rank=layer_rank, alpha=alpha, dropout=dropout
                )
            except UnsupportedLayerError as error:
                raise UserError(f"cannot put LoRA on {layer.part} layer {error}") from None
            adapters.append(adapter)
            part_of[layer.name] = layer.part
            module_path[layer.name] = layer.module_path
            export_path[layer.name] = layer.export_path
        network = cls(
            adapters,
            part_of=part_of,
            module_path=module_path,
            export_path=export_path,
            layouts=layouts,
        )
        network.attach()
        return network

    def attach(self) -> None:
        for adapter in self.adapters.values():
            adapter.attach()

    def detach(self) -> None:
        for adapter in self.adapters.values():
            adapter.detach()

    def parts(self) -> list[str]:
        return sorted(set(self.part_of.values()))

    def parameters_of(self, part: str) -> list[nn.Parameter]:
        return [
            p
            for name, adapter in self.adapters.items()
            if self.part_of[name] == part
            for p in adapter.parameters()
        ]
