"""The embedded `digits` data: sklearn's 1,797 scans written once as a stratified 80/20 PNG ImageFolder."""
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from mobilezoo import data as embedded
from mobilezoo.data import digits

CLASSES = [str(d) for d in range(10)]


@pytest.fixture(scope="module")
def sk():
    return load_digits()


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """Generated once for the whole module, into a temporary folder (never the user's cache)."""
    return digits.ensure(tmp_path_factory.mktemp("gen_a") / "digits")


def _pngs(root: Path, split: str | None = None) -> list[Path]:
    splits = [split] if split else ["train", "val"]
    return sorted(p for s in splits for p in (root / s).rglob("*") if p.is_file())


def _rel(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in _pngs(root)}


def test_layout_and_total(root, sk):
    assert root.is_dir()
    files = _pngs(root)
    assert len(files) == len(sk.target) == 1797
    assert all(p.suffix == ".png" for p in files)
    for split in ("train", "val"):
        assert sorted(p.name for p in (root / split).iterdir()) == CLASSES
        assert all((root / split / c).is_dir() for c in CLASSES)
    # every scan appears exactly once, in one split only
    names = [p.name for p in files]
    assert len(set(names)) == len(names)


def test_val_is_a_stratified_fifth(root, sk):
    per_class = Counter(str(t) for t in sk.target)
    val = Counter(p.parent.name for p in _pngs(root, "val"))
    train = Counter(p.parent.name for p in _pngs(root, "train"))
    assert sum(val.values()) in (359, 360)
    for c in CLASSES:
        assert val[c] + train[c] == per_class[c]
        assert abs(val[c] - 0.2 * per_class[c]) <= 1, (c, val[c], per_class[c])


def test_files_are_rgb_32px_pngs_of_the_right_digit(root, sk):
    """Each PNG is an RGB 32x32 image whose content is a scan of the digit its folder names."""
    files = _pngs(root)
    small = np.empty((len(files), 64))
    for i, f in enumerate(files):
        with Image.open(f) as im:
            assert im.format == "PNG" and im.mode == "RGB" and im.size == (32, 32), f
            a = np.asarray(im.convert("L").resize((8, 8), Image.BOX), dtype=np.float64)
        small[i] = a.ravel()
    assert small.std(axis=1).min() > 0  # no blank images
    # nearest original 8x8 scan (by correlation) of every image must carry the folder's label
    ref = sk.images.reshape(len(sk.images), -1).astype(np.float64)
    z = lambda m: (m - m.mean(1, keepdims=True)) / (m.std(1, keepdims=True) + 1e-9)
    nearest = (z(small) @ z(ref).T).argmax(1)
    labels = np.array([int(f.parent.name) for f in files])
    assert (sk.target[nearest] == labels).mean() > 0.99
    # and the images are the whole data set, not a few scans repeated
    assert len(set(nearest.tolist())) > 0.95 * len(files)


def test_regenerating_elsewhere_gives_the_same_split(root, tmp_path):
    """Same split in another folder; a folder left by an interrupted run (no marker) is rebuilt."""
    target = tmp_path / "again"
    (target / "train" / "0").mkdir(parents=True)
    (target / "train" / "0" / "junk.png").write_bytes(b"not an image")
    assert digits.ensure(target) == target
    assert not (target / "train" / "0" / "junk.png").exists()
    assert _rel(target) == _rel(root)
    a, b = _pngs(root), _pngs(target)
    for i in (0, 500, 1796):
        assert np.array_equal(np.asarray(Image.open(a[i])), np.asarray(Image.open(b[i])))


def test_second_call_does_not_rewrite(root):
    old = 1_000_000_000  # backdate every file, so any rewrite would show as a new mtime
    files = _pngs(root)
    for f in files:
        os.utime(f, (old, old))
    assert digits.ensure(root) == root
    after = _pngs(root)
    assert after == files
    assert all(f.stat().st_mtime == old for f in after)


def test_resolve_uses_the_cache_env(monkeypatch, tmp_path):
    monkeypatch.setenv("MOBILEZOO_CACHE", str(tmp_path))
    assert embedded.cache_dir() == tmp_path
    done = tmp_path / "digits"
    done.mkdir()
    (done / ".complete").write_text("")  # marks it complete: nothing should be generated
    assert embedded.resolve("digits") == done
    assert not (done / "train").exists()
    assert embedded.resolve(str(tmp_path / "mine")) == tmp_path / "mine"
