"""Embedded default datasets, generated locally into real files in the real formats."""
from __future__ import annotations

import importlib
import os
import shutil
from pathlib import Path
from typing import Callable

# modules here (name with _ for -) with an `ensure()`
EMBEDDED = ("digits", "shapes", "shapes-seg", "brats-phantom", "motion")


def cache_dir() -> Path:
    """Where generated datasets live: $MOBILEZOO_CACHE, else ~/.cache/mobilezoo."""
    return Path(os.environ.get("MOBILEZOO_CACHE", Path.home() / ".cache" / "mobilezoo"))


def resolve(name_or_path: str) -> Path:
    """An embedded dataset name (generated on first use) or an existing folder."""
    if name_or_path in EMBEDDED:
        return importlib.import_module(f".{name_or_path.replace('-', '_')}", __name__).ensure()
    return Path(name_or_path)


def publish(root: Path, marker: str, write: Callable[[Path], None]) -> Path:
    """`root`, written by `write(tmp)` into a per-process temporary folder and renamed into place,
    unless `root/.complete` already holds `marker` (a set of another version or size is rewritten).

    The per-process folder lets concurrent first uses (e.g. DDP ranks) each write a copy safely."""
    done = root / ".complete"
    if done.is_file() and done.read_text() == marker:
        return root
    tmp = root.with_name(f"{root.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    (tmp / ".complete").write_text(marker)
    if done.is_file() and done.read_text() == marker:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
        return root
    shutil.rmtree(root, ignore_errors=True)
    try:
        tmp.rename(root)
    except OSError:  # another process renamed its copy in between
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def publish_splits(name: str, root: Path | None, counts: dict[str, int], version: int, seed: int,
                   write_split: Callable[[Path, str, int], None],
                   prepare: Callable[[Path], None] | None = None) -> Path:
    """A generated set of splits (`counts`: split -> samples, written by `write_split(folder, split,
    count)` after `prepare(folder)`), under `root` (default: the cache folder `name`); a set of
    another size or version is rewritten (see `publish`)."""
    root = Path(root) if root is not None else cache_dir() / name
    marker = f"{name} v{version}, seed {seed}, " + ", ".join(f"{n} {split}" for split, n in counts.items()) + "\n"

    def write(tmp: Path) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        if prepare is not None:
            prepare(tmp)
        for split, n in counts.items():
            write_split(tmp, split, n)
    return publish(root, marker, write)
