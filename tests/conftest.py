"""Shared fixture: tiny synthetic class-per-folder image sets (ROOT/train/<class>/*.png, ROOT/val/...)."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def write_image_folder(root: Path, classes=("cat", "dog", "eel"), per_class: int = 4, size: int = 16,
                       splits=("train", "val"), seed: int = 0) -> Path:
    """Write `per_class` noisy PNGs per class and split, each class tinted by its own colour channel."""
    rng = np.random.default_rng(seed)
    for split in splits:
        for ci, name in enumerate(classes):
            folder = Path(root) / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for j in range(per_class):
                a = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
                a[..., ci % 3] += 150
                Image.fromarray(a).save(folder / f"{name}_{j}.png")
    return Path(root)


@pytest.fixture(scope="session")
def make_image_folder():
    """The `write_image_folder(root, classes=..., per_class=..., ...)` helper."""
    return write_image_folder
