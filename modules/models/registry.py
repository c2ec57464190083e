"""The model families Geodesic trains: their config sections (light) and implementations (lazy).

The config schema imports only the sections; a family's implementation, which pulls in diffusers,
is imported the first time a run asks for it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from modules.config.model_base import FamilyModelConfig
from modules.errors import UserError
from modules.models.flux.config import FluxModelConfig
from modules.models.sdxl.config import SDXLModelConfig

if TYPE_CHECKING:
    from modules.models.base import ModelFamily

# family name -> (its `model` config section, "module:class" of its implementation)
FAMILIES: dict[str, tuple[type[FamilyModelConfig], str]] = {
    "sdxl": (SDXLModelConfig, "modules.models.sdxl.family:SDXLFamily"),
    "flux": (FluxModelConfig, "modules.models.flux.family:FluxFamily"),
}
DEFAULT_FAMILY = "sdxl"


def family_configs() -> tuple[type[FamilyModelConfig], ...]:
    return tuple(config for config, _ in FAMILIES.values())


def get_family(name: str) -> ModelFamily:
    """The implementation of family `name` (imported on first use)."""
    if name not in FAMILIES:
        raise UserError(f"model.family {name!r} is not known; choose one of {sorted(FAMILIES)}")
    module_name, _, class_name = FAMILIES[name][1].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name != module_name:
            raise
        raise UserError(f"model.family {name!r} cannot train in this version yet") from None
    return getattr(module, class_name)()
