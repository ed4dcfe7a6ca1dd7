"""The benchmark suites `mobilezoo bench SUITE` runs; each is a thin layer over `mobilezoo.bench`."""
from __future__ import annotations

import importlib
from types import ModuleType

from ...errors import UserError

NAMES = ("classify", "detect", "video", "runtimes")
NEEDS_MODELS = ("classify", "detect", "video")  # runtimes without models runs its whole suite


def suite(name: str) -> ModuleType:
    """The suite module `name` (its `benchmark`, `format_markdown` and `run_cli`); a UserError naming
    the value and the suites if there is none."""
    if name not in NAMES:
        raise UserError(f"unknown bench suite {name!r}; expected one of {', '.join(NAMES)} (peak training "
                        "memory of revunet3d: `python benchmarks/revunet_memory.py`, `make bench-memory`)")
    return importlib.import_module(f"{__name__}.{name}")
