"""Geometry-aware LoRA optimisation: Riemannian preconditioning and AdaPreLoRA.

`directions` holds the two factor updates (training's batched pass and the tests' float64
reference in one), `statistics` AdaPreLoRA's sketched row/column energies, `preconditioner` the
optimizer step pre-hook that applies them and the report of which layers it serves.
"""

from modules.lora.preconditioning.directions import Damping
from modules.lora.preconditioning.preconditioner import LoRAPreconditioner, Settings, find_coverage

__all__ = ["Damping", "LoRAPreconditioner", "Settings", "find_coverage"]
