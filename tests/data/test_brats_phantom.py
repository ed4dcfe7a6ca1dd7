"""The embedded `brats-phantom` data: generated BraTS 2020-format NIfTI cases (small sets here)."""
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from mobilezoo import data as embedded
from mobilezoo.data import brats_phantom
from mobilezoo.tasks.segmentation3d import MODALITIES, find_case, load_case
from mobilezoo.tasks.segmentation3d.brats import split_cases

SMALL = (32, 32, 24)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A small set generated once for the module, into a temporary folder (never the user's cache)."""
    return brats_phantom.ensure(tmp_path_factory.mktemp("gen") / "brats-phantom", num_train=3, num_val=2,
                                shape=SMALL)


@pytest.fixture(scope="module")
def cases() -> list[tuple[dict, np.ndarray]]:
    """Six full-size cases straight from the generator (no files)."""
    return [brats_phantom.make_case(i, "train") for i in range(6)]


def test_default_set_meets_the_issue():
    assert brats_phantom.NUM_TRAIN >= 24 and brats_phantom.NUM_VAL >= 6
    assert brats_phantom.SHAPE == (64, 64, 48)


def test_layout_and_brats20_naming(root):
    assert (root / ".complete").is_file()
    assert sorted(p.name for p in (root / "train").iterdir()) == [f"BraTS20_Training_{i:03d}" for i in (1, 2, 3)]
    assert sorted(p.name for p in (root / "val").iterdir()) == ["BraTS20_Training_301", "BraTS20_Training_302"]
    folder = root / "train" / "BraTS20_Training_002"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        f"BraTS20_Training_002_{k}.nii.gz" for k in (*MODALITIES, "seg"))
    assert not list(root.parent.glob("brats-phantom.partial*"))


def test_files_are_real_nifti_with_an_lps_affine(root):
    case = find_case(root / "val" / "BraTS20_Training_301")
    flair = nib.load(str(case.images[0]))
    assert flair.shape == SMALL and flair.get_data_dtype() == np.int16
    assert nib.aff2axcodes(flair.affine) == ("L", "P", "S")  # as BraTS files, not RAS
    np.testing.assert_allclose(nib.affines.voxel_sizes(flair.affine), [brats_phantom.SPACING] * 3)
    assert nib.load(str(case.seg)).get_data_dtype() == np.uint8


def test_read_back_by_the_task_loader(root):
    train = split_cases(root, "train")
    assert [c.name for c in train] == [f"BraTS20_Training_{i:03d}" for i in (1, 2, 3)]
    d = load_case(train[0])
    vols, labels = brats_phantom.make_case(0, "train", SMALL)
    for k, m in enumerate(MODALITIES):
        np.testing.assert_array_equal(d["image"][k].numpy(), vols[m].astype(np.float32))
    np.testing.assert_array_equal(d["label"][0].numpy(), labels)


def test_labels_are_brats_values_and_every_case_has_all_three(cases):
    for _, labels in cases:
        assert set(np.unique(labels).tolist()) == {0, 1, 2, 4}


def test_background_is_zero_and_the_head_is_not(cases):
    for vols, labels in cases:
        head = vols["t1"] != 0
        assert not head[0].any() and not head[:, 0].any() and not head[..., 0].any()  # air around the head
        assert 0.2 < head.mean() < 0.7
        for m in MODALITIES:
            assert ((vols[m] != 0) == head).all()  # one head mask for all modalities
        assert head[labels > 0].all()


def _mean(vol, mask) -> float:
    return float(vol[mask].astype(float).mean())


def test_contrasts_follow_real_scans(cases):
    """Enhancing rim bright on t1ce (and not on t1), necrosis dark on t1ce, oedema bright on FLAIR
    and t2, each against the normal brain around the tumour (a shell 2-5 voxels outside it)."""
    for vols, labels in cases:
        tumour = labels > 0
        around = ndimage.binary_dilation(tumour, iterations=5) & ~ndimage.binary_dilation(tumour, iterations=2)
        around &= vols["t1"] != 0
        et, necrosis, oedema = labels == 4, labels == 1, labels == 2
        assert _mean(vols["t1ce"], et) > 1.5 * _mean(vols["t1ce"], around)
        assert _mean(vols["t1ce"], et) > 2 * _mean(vols["t1ce"], necrosis)
        assert _mean(vols["t1"], et) < _mean(vols["t1"], around)  # enhancement needs the contrast agent
        assert _mean(vols["t1ce"], necrosis) < _mean(vols["t1ce"], around)  # darker than normal brain
        for m in ("flair", "t2"):
            assert _mean(vols[m], oedema) > 1.5 * _mean(vols[m], around)


def test_enhancing_rim_surrounds_the_necrosis(cases):
    for _, labels in cases:
        necrosis = labels == 1
        outer = ndimage.binary_dilation(necrosis) & ~necrosis
        assert np.isin(labels[outer], (1, 4)).mean() > 0.9  # necrosis borders the rim, not oedema


def test_position_size_and_noise_vary(cases):
    centres = np.array([np.argwhere(labels > 0).mean(0) for _, labels in cases])
    sizes = [int((labels > 0).sum()) for _, labels in cases]
    assert np.ptp(centres, axis=0).max() > 10  # tumours in different places
    assert max(sizes) > 2 * min(sizes)
    vols, labels = cases[0]
    assert vols["flair"][labels == 2].std() > 0.02 * vols["flair"][labels == 2].mean()  # noise + bias


def test_deterministic_per_case(root):
    a, la = brats_phantom.make_case(4, "val", SMALL)
    b, lb = brats_phantom.make_case(4, "val", SMALL)
    c, _ = brats_phantom.make_case(5, "val", SMALL)
    assert all(np.array_equal(a[m], b[m]) for m in MODALITIES) and np.array_equal(la, lb)
    assert not np.array_equal(a["flair"], c["flair"])


def test_ensure_reuses_a_complete_set_and_rewrites_another(root, tmp_path):
    r = brats_phantom.ensure(tmp_path / "p", num_train=1, num_val=1, shape=(16, 16, 12))
    f = r / "train" / "BraTS20_Training_001" / "BraTS20_Training_001_t1.nii.gz"
    stamp = f.stat().st_mtime_ns
    assert brats_phantom.ensure(r, num_train=1, num_val=1, shape=(16, 16, 12)) == r
    assert f.stat().st_mtime_ns == stamp
    brats_phantom.ensure(r, num_train=2, num_val=1, shape=(16, 16, 12))  # other counts: rewritten
    assert len(list((r / "train").iterdir())) == 2
    # a smaller set is a prefix of a larger one
    np.testing.assert_array_equal(np.asarray(nib.load(str(f)).dataobj),
                                  brats_phantom.make_case(0, "train", (16, 16, 12))[0]["t1"])


def test_resolve_generates_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOBILEZOO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(brats_phantom, "NUM_TRAIN", 1)
    monkeypatch.setattr(brats_phantom, "NUM_VAL", 1)
    monkeypatch.setattr(brats_phantom, "SHAPE", (16, 16, 12))
    root = embedded.resolve("brats-phantom")
    assert root == tmp_path / "cache" / "brats-phantom"
    assert [p.name for p in (root / "val").iterdir()] == ["BraTS20_Training_301"]
