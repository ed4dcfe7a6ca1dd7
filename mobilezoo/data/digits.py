"""`digits`: scikit-learn's 1,797 real handwritten digits as RGB PNG class folders (ImageFolder layout).

The 8x8 scans are upsampled to 32x32, written once to the cache with a fixed stratified 80/20
train/val split, and then read by the same ImageFolder code path as any user dataset."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from . import cache_dir, publish

SIZE = 32
VAL_FRACTION = 0.2
SPLIT_SEED = 0


def ensure(root: Path | None = None) -> Path:
    """Write the dataset under `root` (default: the cache) unless already complete; return root."""
    root = Path(root) if root is not None else cache_dir() / "digits"
    if (root / ".complete").is_file():  # sets written before the marker text existed count too
        return root
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    def write(tmp: Path) -> None:
        digits = load_digits()
        idx = np.arange(len(digits.target))
        train_idx, val_idx = train_test_split(idx, test_size=VAL_FRACTION, random_state=SPLIT_SEED,
                                              stratify=digits.target)
        for split, ids in (("train", train_idx), ("val", val_idx)):
            for i in ids:
                gray = (digits.images[i] / 16.0 * 255).astype(np.uint8)
                img = Image.fromarray(gray).resize((SIZE, SIZE), Image.BILINEAR).convert("RGB")
                folder = tmp / split / str(digits.target[i])
                folder.mkdir(parents=True, exist_ok=True)
                img.save(folder / f"digit_{i:04d}.png")
    return publish(root, "sklearn load_digits, 80/20 stratified split, seed 0\n", write)
