"""Embedded default datasets, generated locally into real files in the real formats."""
from __future__ import annotations

import importlib
import os
from pathlib import Path

EMBEDDED = ("digits", "shapes", "brats-phantom")  # modules here (name with _ for -) with an `ensure()`


def cache_dir() -> Path:
    """Where generated datasets live: $MOBILEZOO_CACHE, else ~/.cache/mobilezoo."""
    return Path(os.environ.get("MOBILEZOO_CACHE", Path.home() / ".cache" / "mobilezoo"))


def resolve(name_or_path: str) -> Path:
    """An embedded dataset name (generated on first use) or an existing folder."""
    if name_or_path in EMBEDDED:
        return importlib.import_module(f".{name_or_path.replace('-', '_')}", __name__).ensure()
    return Path(name_or_path)
