"""segment3d: BraTS discovery and naming, label <-> region maps, bad files, metrics, the MONAI
pipeline, and predict's geometry (tiny hand-made volumes; a pointwise stand-in model)."""
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from mobilezoo.errors import BadSampleError, DataError
from mobilezoo.recipes import load_recipe
from mobilezoo.tasks.segmentation3d import (
    HD95_MAX,
    MODALITIES,
    REGIONS,
    BratsDataset,
    BratsMetric,
    Segmentation3DTask,
    case_scores,
    collate_volumes,
    find_case,
    find_cases,
    labels_to_regions,
    load_case,
    regions_to_labels,
)
from mobilezoo.tasks.segmentation3d.brats import split_cases
from mobilezoo.tasks.segmentation3d.transforms import augment, check_options, preprocess

SHAPE = (12, 10, 8)
# a non-RAS, non-diagonal affine: voxel axes (i, j, k) run along world (-y, +z, -x) with spacings
# 2, 1.5 and 3 mm (orientation "PSL"), plus an offset
ODD_AFFINE = np.array([[0, 0, -3.0, 40], [-2.0, 0, 0, 10], [0, 1.5, 0, -7], [0, 0, 0, 1]])


def write_nifti(path: Path, array: np.ndarray, affine=ODD_AFFINE) -> Path:
    """Write one NIfTI file (compressed if the name ends in .gz)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


def volumes(shape=SHAPE, blob=True, seed=0):
    """Four modalities: a constant brain box inside zero background, with a bright 3x3x3 blob on
    every modality; and labels: 4 on the blob, 2 on a one-voxel shell around it, 0 elsewhere."""
    rng = np.random.default_rng(seed)
    brain = np.zeros(shape, bool)
    brain[1:-1, 1:-1, 1:-1] = True
    blob_mask = np.zeros(shape, bool)
    if blob:
        c = [s // 2 for s in shape]
        blob_mask[c[0] - 2: c[0] + 1, c[1] - 1: c[1] + 2, c[2] - 1: c[2] + 2] = True
    vols = {}
    for m in MODALITIES:
        v = np.where(brain, 100.0 + rng.uniform(0, 1, shape), 0.0)
        v[blob_mask] = 1000.0
        vols[m] = v.astype(np.float32)
    labels = np.zeros(shape, np.uint8)
    shell = np.zeros(shape, bool)
    if blob:
        from scipy.ndimage import binary_dilation
        shell = binary_dilation(blob_mask) & ~blob_mask
    labels[shell] = 2
    labels[blob_mask] = 4
    return vols, labels, blob_mask


def write_case(folder: Path, name: str, style: str = "2020", seg: bool = True, ext: str = ".nii.gz",
               affine=ODD_AFFINE, shape=SHAPE, blob=True) -> Path:
    """A case folder in one of the naming styles (2020 / 2021: `_{flair,...}`, 2023: `-{t2f,...}`)."""
    vols, labels, _ = volumes(shape, blob)
    keys = dict(zip(MODALITIES, ("t2f", "t1n", "t1c", "t2w"))) if style == "2023" else {m: m for m in MODALITIES}
    sep = "-" if style == "2023" else "_"
    case = folder / name
    for m, v in vols.items():
        write_nifti(case / f"{name}{sep}{keys[m]}{ext}", v, affine)
    if seg:
        if style == "2023":
            labels = np.where(labels == 4, 3, labels).astype(np.uint8)
        write_nifti(case / f"{name}{sep}seg{ext}", labels, affine)
    return case


class Threshold(nn.Module):
    """Stand-in segmenter: every region is 'z-scored flair > 1.5' (pointwise, so any input size)."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return (10 * (x[:, :1] - 1.5)).repeat(1, 3, 1, 1, 1) + self.dummy


def make_task(root, **augment_opts) -> Segmentation3DTask:
    """A segment3d task on `root` with an 8^3 window."""
    recipe = load_recipe(None, {"task": "segment3d", "data.name": str(root), "data.img_size": 8,
                                "data.augment": {"crop": [8, 8, 8], **augment_opts}})
    return Segmentation3DTask(recipe)


# --- discovery and naming ------------------------------------------------------------------------


@pytest.mark.parametrize("name,style,ext", [("BraTS20_Training_001", "2020", ".nii.gz"),
                                            ("BraTS20_Training_002", "2020", ".nii"),  # the Kaggle copy
                                            ("BraTS2021_00000", "2021", ".nii.gz")])
def test_find_case_2020_and_2021_naming(tmp_path, name, style, ext):
    case = find_case(write_case(tmp_path, name, style, ext=ext))
    assert case.name == name and case.et_label == 4
    assert [p.name for p in case.images] == [f"{name}_{m}{ext}" for m in ("flair", "t1", "t1ce", "t2")]
    assert case.seg.name == f"{name}_seg{ext}"


def test_find_case_2023_naming_maps_et_label_3_to_4(tmp_path):
    name = "BraTS-GLI-00000-000"
    case = find_case(write_case(tmp_path, name, "2023"))
    assert [p.name for p in case.images] == [f"{name}-{m}.nii.gz" for m in ("t2f", "t1n", "t1c", "t2w")]
    assert case.et_label == 3
    on_disk = np.asarray(nib.load(str(case.seg)).dataobj)
    assert set(np.unique(on_disk)) == {0, 2, 3}
    label = load_case(case)["label"].numpy()[0]
    np.testing.assert_array_equal(label, np.where(on_disk == 3, 4, on_disk))


def test_validation_case_without_seg(tmp_path):
    case = find_case(write_case(tmp_path, "BraTS20_Validation_001", seg=False))
    assert case.seg is None
    d = load_case(case, with_seg=False)
    assert tuple(d["image"].shape) == (4, *SHAPE) and "label" not in d
    with pytest.raises(BadSampleError, match=r"BraTS20_Validation_001.*BraTS20_Validation_001_seg"):
        load_case(case, with_seg=True)


def test_kaggle_misnamed_seg_of_case_355_is_found(tmp_path):
    folder = write_case(tmp_path, "BraTS20_Training_355", seg=False, ext=".nii")
    _, labels, _ = volumes()
    write_nifti(folder / "W39_1998.09.19_Segm.nii", labels)
    assert find_case(folder).seg.name == "W39_1998.09.19_Segm.nii"


def test_modality_order_is_fixed_whatever_the_files_hold(tmp_path):
    """Channel k of the image is always MODALITIES[k] (flair, t1, t1ce, t2)."""
    folder = tmp_path / "BraTS20_Training_007"
    for k, m in enumerate(("t2", "t1ce", "flair", "t1", "seg")):  # written in another order
        write_nifti(folder / f"BraTS20_Training_007_{m}.nii.gz", np.full(SHAPE, 10.0 * (k + 1), np.float32))
    image = load_case(find_case(folder), with_seg=False)["image"]
    assert MODALITIES == ("flair", "t1", "t1ce", "t2")
    assert [float(image[c].mean()) for c in range(4)] == [30.0, 40.0, 20.0, 10.0]


def test_split_layouts(tmp_path):
    for i in range(3):
        write_case(tmp_path / "a" / "train", f"BraTS20_Training_{i + 1:03d}")
    write_case(tmp_path / "a" / "val", "BraTS20_Training_301")
    assert [c.name for c in split_cases(tmp_path / "a", "train")] == [f"BraTS20_Training_{i:03d}" for i in (1, 2, 3)]
    assert [c.name for c in split_cases(tmp_path / "a", "val")] == ["BraTS20_Training_301"]
    # one folder of ten cases: sorted cases 4 and 9 (k % 5 == 4) are val
    for i in range(10):
        write_case(tmp_path / "flat", f"BraTS2021_{i:05d}", "2021")
    assert [c.name for c in split_cases(tmp_path / "flat", "val")] == ["BraTS2021_00004", "BraTS2021_00009"]
    assert len(split_cases(tmp_path / "flat", "train")) == 8
    # predict inputs: a root with train/val, a folder of cases and a single case folder
    assert len(find_cases([tmp_path / "a"])) == 4
    assert [c.name for c in find_cases(tmp_path / "flat" / "BraTS2021_00003")] == ["BraTS2021_00003"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no BraTS case folders"):
        find_cases([tmp_path / "empty"])


# --- labels and regions --------------------------------------------------------------------------


def test_labels_to_regions_channel_order():
    labels = np.array([0, 1, 2, 4], np.uint8).reshape(4, 1, 1)
    r = labels_to_regions(labels).numpy()[:, :, 0, 0]
    assert REGIONS == ("WT", "TC", "ET")
    np.testing.assert_array_equal(r[0], [0, 1, 1, 1])  # WT = 1 | 2 | 4
    np.testing.assert_array_equal(r[1], [0, 1, 0, 1])  # TC = 1 | 4
    np.testing.assert_array_equal(r[2], [0, 0, 0, 1])  # ET = 4


def test_regions_to_labels_by_hand():
    wt = np.array([0, 1, 1, 1, 0, 1], bool)
    tc = np.array([0, 0, 1, 1, 0, 0], bool)
    et = np.array([0, 0, 0, 1, 1, 0], bool)  # voxel 4: ET outside WT and TC (inconsistent) -> still ET
    regions = np.stack([wt, tc, et]).reshape(3, 6, 1, 1)
    np.testing.assert_array_equal(regions_to_labels(regions).ravel(), [0, 2, 1, 4, 4, 2])
    np.testing.assert_array_equal(regions_to_labels(regions, et_label=3).ravel(), [0, 2, 1, 3, 3, 2])


def test_labels_regions_round_trip():
    labels = np.random.default_rng(0).choice([0, 1, 2, 4], (5, 6, 7)).astype(np.uint8)
    np.testing.assert_array_equal(regions_to_labels(labels_to_regions(labels)), labels)


# --- bad input -----------------------------------------------------------------------------------


def test_missing_modality_names_case_and_file(tmp_path):
    folder = write_case(tmp_path, "BraTS20_Training_010")
    (folder / "BraTS20_Training_010_t1ce.nii.gz").unlink()
    with pytest.raises(BadSampleError,
                       match=r"case BraTS20_Training_010: missing .*BraTS20_Training_010_t1ce\.nii\.gz"):
        find_case(folder)


def test_mismatched_shape_names_case_and_files(tmp_path):
    folder = write_case(tmp_path, "BraTS20_Training_011")
    write_nifti(folder / "BraTS20_Training_011_t2.nii.gz", np.ones((12, 10, 9), np.float32))
    with pytest.raises(BadSampleError, match=r"BraTS20_Training_011: BraTS20_Training_011_t2\.nii\.gz has shape "
                                             r"\(12, 10, 9\) but BraTS20_Training_011_flair\.nii\.gz has "
                                             r"\(12, 10, 8\)"):
        load_case(find_case(folder))


def test_mismatched_affine_names_case_and_files(tmp_path):
    folder = write_case(tmp_path, "BraTS20_Training_012")
    shifted = ODD_AFFINE.copy()
    shifted[0, 3] += 1.0
    write_nifti(folder / "BraTS20_Training_012_seg.nii.gz", volumes()[1], shifted)
    with pytest.raises(BadSampleError, match=r"BraTS20_Training_012: BraTS20_Training_012_seg\.nii\.gz has a "
                                             r"different affine from BraTS20_Training_012_flair"):
        load_case(find_case(folder))


def test_truncated_gzip_names_case_and_file(tmp_path):
    folder = write_case(tmp_path, "BraTS20_Training_013")
    path = folder / "BraTS20_Training_013_t1.nii.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadSampleError,
                       match=r"case BraTS20_Training_013: cannot read BraTS20_Training_013_t1\.nii\.gz"):
        load_case(find_case(folder))


def test_unexpected_label_value_names_case_file_and_value(tmp_path):
    folder = write_case(tmp_path, "BraTS20_Training_014")
    labels = volumes()[1]
    labels[0, 0, 0] = 3  # BraTS 2020 has no label 3
    write_nifti(folder / "BraTS20_Training_014_seg.nii.gz", labels)
    with pytest.raises(BadSampleError, match=r"BraTS20_Training_014: BraTS20_Training_014_seg\.nii\.gz holds label "
                                             r"value\(s\) 3; expected only 0, 1, 2, 4"):
        load_case(find_case(folder))


def test_bad_case_is_skipped_and_counted_when_asked(tmp_path):
    write_case(tmp_path / "train", "BraTS20_Training_001")
    bad = write_case(tmp_path / "train", "BraTS20_Training_002")
    p = bad / "BraTS20_Training_002_flair.nii.gz"
    p.write_bytes(p.read_bytes()[:100])
    cases = split_cases(tmp_path, "train")
    with pytest.raises(BadSampleError, match="BraTS20_Training_002"):
        BratsDataset(cases)[1]
    ds = BratsDataset(cases, skip_bad=True)
    batch = collate_volumes([ds[0], ds[1]])
    assert batch["skipped"] == 1 and batch["case"] == ["BraTS20_Training_001"]


# --- metrics -------------------------------------------------------------------------------------


def cube(shape=(10, 10, 10), lo=(2, 2, 2), size=4) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[lo[0]: lo[0] + size, lo[1]: lo[1] + size, lo[2]: lo[2] + size] = True
    return m


def test_perfect_prediction_scores_dice_1_hd95_0():
    r = np.stack([cube(size=6), cube(size=4), cube(size=2, lo=(3, 3, 3))])
    dice, hd95 = case_scores(r, r, spacing=[1.0, 1.0, 1.0])
    assert dice == [1.0, 1.0, 1.0] and hd95 == [0.0, 0.0, 0.0]


def test_shifted_cube_by_hand():
    """A 4^3 cube against the same cube shifted one voxel along x: overlap 3*4*4 = 48 voxels, so
    Dice = 2*48 / (64 + 64) = 0.75. Of each cube's 56 surface voxels, 16 (its outer x face) lie one
    x-step from the other's surface and the rest at most 1 voxel away, so with x spacing 2 mm the
    95th percentile distance is 2 mm."""
    a, b = cube(), cube(lo=(3, 2, 2))
    r_a, r_b = np.stack([a, a, a]), np.stack([b, b, b])
    dice, hd95 = case_scores(r_a, r_b, spacing=[2.0, 1.0, 1.0])
    assert dice == pytest.approx([0.75] * 3)
    assert hd95 == pytest.approx([2.0] * 3)
    assert case_scores(r_a, r_b, spacing=[1.0, 1.0, 1.0])[1] == pytest.approx([1.0] * 3)


def test_empty_region_rules():
    full, empty = cube(), np.zeros((10, 10, 10), bool)
    pred = np.stack([full, empty, full])  # WT right, TC both empty, ET false positive
    target = np.stack([full, empty, empty])
    dice, hd95 = case_scores(pred, target)
    assert dice == [1.0, 1.0, 0.0] and hd95 == [0.0, 0.0, HD95_MAX]
    dice, hd95 = case_scores(target, pred)  # ET missed
    assert dice[2] == 0.0 and hd95[2] == HD95_MAX
    assert HD95_MAX == pytest.approx(373.13, abs=0.005)  # diagonal of 240x240x155 mm


def test_metric_means_over_cases_and_regions():
    full, empty = cube(), np.zeros((10, 10, 10), bool)
    a, b = cube(), cube(lo=(3, 2, 2))
    m = BratsMetric()
    m.update("case_b", np.stack([a, a, full]), np.stack([b, b, empty]), loss=0.5)  # Dice .75, .75, 0
    m.update("case_a", np.stack([a, a, a]), np.stack([a, a, a]), loss=0.25)  # Dice 1, 1, 1
    out = m.compute()
    assert out["dice_wt"] == pytest.approx(0.875) and out["dice_tc"] == pytest.approx(0.875)
    assert out["dice_et"] == pytest.approx(0.5)
    assert out["dice"] == pytest.approx((0.875 + 0.875 + 0.5) / 3)
    assert out["hd95_et"] == pytest.approx(HD95_MAX / 2)
    assert out["loss"] == pytest.approx(0.375) and out["count"] == 2
    assert [c["case"] for c in out["per_case"]] == ["case_a", "case_b"]


# --- pipeline ------------------------------------------------------------------------------------


def test_preprocessing_reorients_to_ras_and_zscores_nonzero(tmp_path):
    """The same anatomy stored LPS (as BraTS files are) and RAS preprocesses to the same tensor."""
    vols, labels, _ = volumes()
    ras = np.diag([2.0, 2.0, 2.0, 1.0])
    lps = np.diag([-2.0, -2.0, 2.0, 1.0])
    lps[:3, 3] = [2.0 * (SHAPE[0] - 1), 2.0 * (SHAPE[1] - 1), 0]  # so voxel (i, j, k) of LPS = (X-1-i, Y-1-j, k) of RAS
    for name, aff, flip in (("ras", ras, lambda v: v), ("lps", lps, lambda v: v[::-1, ::-1].copy())):
        for m, v in vols.items():
            write_nifti(tmp_path / name / f"{name}_{m}.nii.gz", flip(v), aff)
        write_nifti(tmp_path / name / f"{name}_seg.nii.gz", flip(labels), aff)
    pre = preprocess()
    a = pre(load_case(find_case(tmp_path / "ras")))
    b = pre(load_case(find_case(tmp_path / "lps")))
    torch.testing.assert_close(a["image"].as_tensor(), b["image"].as_tensor())
    assert torch.equal(a["label"].as_tensor(), b["label"].as_tensor())
    img = a["image"]
    assert tuple(img.shape) == (4, SHAPE[0] - 2, SHAPE[1] - 2, SHAPE[2] - 2)  # cropped to the nonzero box
    for c in range(4):
        nz = img[c][img[c] != 0]
        assert abs(float(nz.mean())) < 1e-4 and float(nz.std(unbiased=False)) == pytest.approx(1, abs=1e-3)


def test_training_samples_are_random_crops_with_nested_regions(tmp_path):
    write_case(tmp_path / "train", "BraTS20_Training_001", affine=np.eye(4), shape=(20, 18, 16))
    opts = check_options({"crop": [8, 8, 8], "pos_fraction": 1.0}, 8)
    ds = BratsDataset(split_cases(tmp_path, "train"), augment(opts), cache=True)
    samples = []
    for seed in (0, 0, 1, 2, 3):
        torch.manual_seed(seed)
        samples.append(ds[0])
    assert torch.equal(samples[0]["image"], samples[1]["image"])  # the same seed, the same sample
    assert not all(torch.equal(samples[0]["image"], s["image"]) for s in samples[2:])
    for s in samples:
        assert s["image"].shape == (4, 8, 8, 8) and s["label"].shape == (3, 8, 8, 8)
        wt, tc, et = s["label"].bool()
        assert (et <= tc).all() and (tc <= wt).all()
        assert et.any()  # pos_fraction 1: centred on tumour


def test_options_are_checked(tmp_path):
    with pytest.raises(DataError, match="unknown option.*rotate"):
        make_task(tmp_path, rotate=10)
    with pytest.raises(DataError, match="crop must be three integers"):
        make_task(tmp_path, crop=[8, 8])
    assert make_task(tmp_path).roi == (8, 8, 8)


def test_loss_is_small_for_right_logits_and_large_for_wrong(tmp_path):
    task = make_task(tmp_path)
    target = torch.from_numpy(np.stack([cube(), cube(size=3), cube(size=2)]))[None].float()
    right = (target * 2 - 1) * 20
    assert task.region_loss(right, target).item() < 0.01
    assert task.region_loss(-right, target).item() > 2.0


def test_evaluation_crops_padding_back_and_scores_cases(tmp_path):
    """Two val cases of different sizes share a padded batch; each is scored on its own volume."""
    write_case(tmp_path / "val", "BraTS20_Training_301", affine=np.eye(4), shape=(12, 10, 8))
    write_case(tmp_path / "val", "BraTS20_Training_302", affine=np.eye(4), shape=(14, 12, 10))
    task = make_task(tmp_path)
    # labels: 4 on the blob (which the threshold model finds), 2 on the shell (which it misses)
    ds = task.val_dataset()
    batch = collate_volumes([ds[0], ds[1]])
    assert batch["image"].shape == (2, 4, 12, 10, 8) and batch["shape"].tolist() == [[10, 8, 6], [12, 10, 8]]
    metric = task.metric()
    task.eval_step(Threshold().eval(), batch, metric)
    out = metric.compute()
    assert out["count"] == 2
    assert out["dice_tc"] == 1.0 and out["dice_et"] == 1.0 and out["hd95_et"] == 0.0
    blob, wt = 27, int((volumes((12, 10, 8))[1] > 0).sum())
    assert out["per_case"][0]["dice_wt"] == pytest.approx(2 * blob / (blob + wt))
    assert "mean Dice" in task.summary(out)


# --- predict -------------------------------------------------------------------------------------


@pytest.mark.parametrize("style,name", [("2020", "BraTS20_Validation_001"), ("2023", "BraTS-GLI-00001-000")])
def test_predict_writes_labels_on_the_input_grid(tmp_path, style, name):
    """Non-RAS, non-diagonal affine: the written seg has the input's shape and affine, and its
    labels sit exactly on the blob of the input (ET, written as 4, or 3 for BraTS 2023)."""
    write_case(tmp_path / "in", name, style, seg=False, shape=(13, 11, 9))
    task = make_task(tmp_path)
    out = task.predict(Threshold().eval(), [str(tmp_path / "in")], out=tmp_path / "out")
    assert len(out) == 1 and out[0]["case"] == name
    written = nib.load(out[0]["file"])
    flair = nib.load(str(find_case(tmp_path / "in" / name).images[0]))
    assert written.shape == flair.shape == (13, 11, 9)
    np.testing.assert_allclose(written.affine, ODD_AFFINE)
    labels = np.asarray(written.dataobj)
    et = 3 if style == "2023" else 4
    blob = np.asarray(flair.dataobj) > 500
    np.testing.assert_array_equal(labels == et, blob)
    assert set(np.unique(labels)) == {0, et}
    assert out[0]["voxels"] == {"0": int((~blob).sum()), "1": 0, "2": 0, str(et): int(blob.sum())}
    assert Path(out[0]["overlay"]).stat().st_size > 1000
    json.dumps(out)  # the CLI prints it


def test_predict_scores_labelled_cases(tmp_path):
    write_case(tmp_path / "in", "BraTS20_Training_001", shape=(13, 11, 9))
    out = make_task(tmp_path).predict(Threshold().eval(), [str(tmp_path / "in" / "BraTS20_Training_001")],
                                      out=tmp_path / "out")[0]
    assert out["dice"]["ET"] == 1.0 and out["dice"]["TC"] == 1.0 and out["dice"]["WT"] < 1.0


def test_predict_skips_unreadable_cases_given_a_handler(tmp_path):
    """A case missing a modality and one with a cut file: without a handler the first stops predict;
    with one, each is handed over and the good case is still segmented and written."""
    for name in ("BraTS20_Training_001", "BraTS20_Training_002", "BraTS20_Training_003"):
        write_case(tmp_path / "in", name, seg=False)
    (tmp_path / "in" / "BraTS20_Training_001" / "BraTS20_Training_001_t2.nii.gz").unlink()
    cut = tmp_path / "in" / "BraTS20_Training_003" / "BraTS20_Training_003_t1.nii.gz"
    cut.write_bytes(cut.read_bytes()[:100])
    task = make_task(tmp_path)
    with pytest.raises(BadSampleError, match="BraTS20_Training_001"):
        task.predict(Threshold().eval(), [str(tmp_path / "in")], out=tmp_path / "out")
    skipped = []
    out = task.predict(Threshold().eval(), [str(tmp_path / "in")], out=tmp_path / "out",
                       on_bad_sample=skipped.append)
    assert [c["case"] for c in out] == ["BraTS20_Training_002"] and Path(out[0]["file"]).is_file()
    assert ["BraTS20_Training_001" in str(skipped[0]), "BraTS20_Training_003" in str(skipped[1])] == [True, True]
