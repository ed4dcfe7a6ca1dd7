"""Embedded default datasets, generated locally into real files in the real formats."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Where generated datasets live: $MOBILEZOO_CACHE, else ~/.cache/mobilezoo."""
    return Path(os.environ.get("MOBILEZOO_CACHE", Path.home() / ".cache" / "mobilezoo"))


def resolve(name_or_path: str) -> Path:
    """An embedded dataset name (generated on first use) or an existing folder."""
    from . import digits, shapes
    generators = {"digits": digits.ensure, "shapes": shapes.ensure}
    if name_or_path in generators:
        return generators[name_or_path]()
    return Path(name_or_path)


EMBEDDED = ("digits", "shapes")
