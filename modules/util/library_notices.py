"""Drop two library log messages that are wrong for Geodesic's runs, and nothing else.

Both appear at the top of every run and send users after problems they do not have:
- transformers advises installing torchvision for image processors that diffusers imports (for
  IP-Adapter) but training never uses;
- diffusers 0.42 warns on every dtype cast of a model that some of its modules "should be kept in
  float32" even when that list is empty (its `to()` turns None into []). With a non-empty list the
  warning still shows.
"""

from __future__ import annotations

import logging

# the logger that emits each message, and a fragment only that message contains
DROPPED = {
    "transformers.utils.import_utils": "requires torchvision",
    "diffusers.models.modeling_utils": "should be kept in float32: [].",
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
