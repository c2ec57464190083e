"""Drop library log messages that are wrong for Geodesic's runs, and nothing else.

Each appears at the top of every run and sends users after problems they do not have:
- transformers advises installing torchvision for image processors that diffusers imports (for
  IP-Adapter) but training never uses;
- diffusers 0.42 warns on every dtype cast of a model that some of its modules "should be kept in
  float32" even when that list is empty (its `to()` turns None into []). With a non-empty list the
  warning still shows;
- importing torchao (diffusers imports it whenever it is installed) reports its CUDA kernel
  libraries as failing to load on machines without CUDA, that Triton is missing, and torch
  deprecates how it registers two enums; diffusers adds that it cannot import torchao classes
  for loading torchao-serialized checkpoints. Geodesic uses torchao's weight-only int8 / fp8,
  which need none of these kernels, and loads no torchao checkpoints;
- bitsandbytes on a machine without CUDA reports that its optional CPU 4-bit matmul kernel,
  fetched from the Hugging Face hub by the `kernels` package, is missing. Its own CPU path
  serves the rare nf4 run on a CPU, and training runs offline.
"""

from __future__ import annotations

import logging

# the logger that emits each message, and a fragment only that message contains
DROPPED = {
    "transformers.utils.import_utils": "requires torchvision",
    "diffusers.models.modeling_utils": "should be kept in float32: [].",
    "torchao": "Failed to load",
    "torchao.kernel.intmm": "Detected no triton",
    "torch.utils._pytree": "is an Enum subclass and is now natively supported",
    "diffusers.quantizers.torchao.torchao_quantizer": "Unable to import `torchao` Tensor",
    "bitsandbytes.backends.cpu.ops": "from kernels-community",
}


class _Drop(logging.Filter):
    def __init__(self, fragment: str) -> None:
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return self.fragment not in record.getMessage()


def quiet_library_notices() -> None:
    """Install the filters on the loggers that emit those messages (idempotent)."""
    for name, fragment in DROPPED.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Drop) and f.fragment == fragment for f in logger.filters):
            logger.addFilter(_Drop(fragment))
