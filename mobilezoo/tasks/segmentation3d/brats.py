"""BraTS case folders: finding them, checking their NIfTI files, and the label <-> region maps.

A case is one folder holding four co-registered MRI volumes and, for labelled cases, a label
map. Three naming styles are recognised (the separator and the keys differ):

    BraTS 2020:      BraTS20_Training_001/BraTS20_Training_001_{flair,t1,t1ce,t2,seg}.nii[.gz]
    BraTS 2021/22:   BraTS2021_00000/BraTS2021_00000_{flair,t1,t1ce,t2,seg}.nii.gz
    BraTS 2023+:     BraTS-GLI-00000-000/BraTS-GLI-00000-000-{t2f,t1n,t1c,t2w,seg}.nii.gz

Only the suffix after the last `_` (or `-` for 2023) matters, so any prefix works. Validation
cases have no `seg`. The Kaggle copy of BraTS 2020 names case 355's label map
`W39_1998.09.19_Segm.nii`; a lone `*_Segm.nii[.gz]` file is therefore accepted as the `seg`.

The model input channels are always MODALITIES = (flair, t1, t1ce, t2) in that order (2023:
t2f, t1n, t1c, t2w). Labels are 0 background, 1 necrotic/non-enhancing core, 2 oedema and
4 enhancing tumour (3 in BraTS 2023, mapped to 4 on loading and back on writing). The model
output channels are REGIONS = (WT, TC, ET): WT = {1, 2, 4}, TC = {1, 4}, ET = {4}."""
from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ...errors import BadSampleError, DataError
from ..base import OnBadSample, readable

MODALITIES = ("flair", "t1", "t1ce", "t2")
MODALITIES_2023 = ("t2f", "t1n", "t1c", "t2w")  # the same four, in the same order
REGIONS = ("WT", "TC", "ET")
LABELS = (0, 1, 2, 4)
NIFTI = (".nii.gz", ".nii")
KAGGLE_SEG = re.compile(r".*_Segm\.nii(\.gz)?$")  # BraTS20_Training_355's misnamed label file
VAL_EVERY = 5  # a single folder of cases is split: sorted case k goes to val when k % 5 == 4
STYLES = ((MODALITIES, "_", 4), (MODALITIES_2023, "-", 3))  # (keys, separator, ET label) per naming
AFFINE_TOL = 1e-3  # mm: modalities of one case must share their voxel-to-world affine


@dataclass
class Case:
    """One case folder: its name, the four modality files (in MODALITIES order) and the label file."""

    name: str
    folder: Path
    images: tuple[Path, ...]
    seg: Path | None
    et_label: int = 4  # 3 for BraTS 2023 naming


def _key(path: Path, sep: str) -> str | None:
    """The modality key of a file name such as `X_t1ce.nii.gz` (sep `_`), or None if not NIfTI."""
    name = path.name
    for ext in NIFTI:
        if name.endswith(ext):
            stem = name[: -len(ext)]
            return stem.rsplit(sep, 1)[-1].lower() if sep in stem else None
    return None


def is_case_folder(folder: Path) -> bool:
    """Whether a folder directly holds NIfTI files (and so is meant as a case)."""
    return folder.is_dir() and any(f.name.endswith(NIFTI) for f in folder.iterdir() if f.is_file())


def find_case(folder: str | Path) -> Case:
    """The files of one case folder; BadSampleError naming the case and the missing file otherwise."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BadSampleError(f"{folder}: no such case folder")
    files = sorted(f for f in folder.iterdir() if f.is_file() and f.name.endswith(NIFTI))
    for style in STYLES:
        keys, sep, _ = style
        found: dict[str, list[Path]] = {}
        for f in files:
            k = _key(f, sep)
            if k in (*keys, "seg"):
                found.setdefault(k, []).append(f)
        if any(k in found for k in keys):
            break
    else:
        raise BadSampleError(f"case {folder.name}: no modality files in {folder} (expected "
                             f"{folder.name}_{{{','.join(MODALITIES)},seg}}.nii.gz, BraTS naming)")
    for k, fs in found.items():
        if len(fs) > 1:
            raise BadSampleError(f"case {folder.name}: {len(fs)} files for {k}: {', '.join(f.name for f in fs)}")
    missing = [k for k in keys if k not in found]
    if missing:
        some = next(iter(found.values()))[0].name
        ext = next(e for e in NIFTI if some.endswith(e))
        prefix = some[: -len(ext)].rsplit(sep, 1)[0]
        expected = ", ".join(f"{prefix}{sep}{k}{ext}" for k in missing)
        raise BadSampleError(f"case {folder.name}: missing modality file(s) {expected} in {folder}")
    seg = found.get("seg", [None])[0]
    if seg is None:
        kaggle = [f for f in files if KAGGLE_SEG.match(f.name)]
        seg = kaggle[0] if len(kaggle) == 1 else None
    return Case(folder.name, folder, tuple(found[k][0] for k in keys), seg, style[2])


def find_cases(paths: list[str | Path] | str | Path, on_bad_sample: OnBadSample = None) -> list[Case]:
    """Cases named directly (case folders) or found as the sub-folders of other folders, sorted. A
    case folder with missing or repeated files goes to `on_bad_sample` and is left out, or without
    it raises BadSampleError."""
    paths = [paths] if isinstance(paths, (str, Path)) else paths
    cases: list[Case] = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise DataError(f"{p}: no such folder (expected a BraTS case folder or a folder of them)")
        if is_case_folder(p):
            cases += [c for _, c in readable([p], find_case, on_bad_sample)]
            continue
        subs = sorted(d for d in p.iterdir() if is_case_folder(d))
        if not subs:
            subs = sorted(d for s in ("train", "val") if (p / s).is_dir()
                          for d in (p / s).iterdir() if is_case_folder(d))
        if not subs:
            raise DataError(f"{p}: no BraTS case folders in it (each holds <case>_flair.nii.gz etc.)")
        cases += [c for _, c in readable(subs, find_case, on_bad_sample)]
    return cases


def split_cases(root: str | Path, split: str) -> list[Case]:
    """The cases of a split: ROOT/train/* and ROOT/val/*, or, if ROOT holds the case folders
    directly, every fifth sorted case (k % 5 == 4) as val and the rest as train."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder (expected ROOT/train/<case>/ and ROOT/val/<case>/ "
                        "or a folder of BraTS case folders)")
    if (root / "train").is_dir() or (root / "val").is_dir():
        folder = root / split
        if not folder.is_dir():
            raise DataError(f"{folder}: no such folder (expected ROOT/train/ and ROOT/val/)")
        cases = sorted((d for d in folder.iterdir() if is_case_folder(d)), key=lambda d: d.name)
        picked = [find_case(d) for d in cases]
    else:
        all_cases = find_cases(root)
        picked = [c for k, c in enumerate(all_cases) if (k % VAL_EVERY == VAL_EVERY - 1) == (split == "val")]
    if not picked:
        raise DataError(f"{root}: no BraTS case folders for the {split} split")
    return picked


def _read(case: Case, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(3-D float32 array, 4x4 affine) of one NIfTI file; BadSampleError naming case and file."""
    import nibabel as nib
    from nibabel.filebasedimages import ImageFileError
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float32)
    except (OSError, EOFError, ValueError, zlib.error, ImageFileError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise BadSampleError(f"case {case.name}: cannot read {path.name} ({reason})") from None
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise BadSampleError(f"case {case.name}: {path.name} has shape {data.shape}, expected a 3-D volume")
    if not np.isfinite(data).all():
        raise BadSampleError(f"case {case.name}: {path.name} holds NaN or infinite values")
    return data, np.asarray(img.affine, dtype=np.float64)


def load_case(case: Case, with_seg: bool = True) -> dict:
    """{'image': MetaTensor (4, X, Y, Z) float32 with the files' affine, 'label': MetaTensor
    (1, X, Y, Z) uint8 in {0, 1, 2, 4} (if `with_seg`), 'case': name}, every file checked."""
    from monai.data import MetaTensor
    arrays, ref_path, ref_affine = [], None, None
    for path in case.images:
        data, affine = _read(case, path)
        if ref_path is None:
            ref_path, ref_affine = path, affine
        else:
            _check_same_grid(case, path, data.shape, affine, ref_path, arrays[0].shape, ref_affine)
        arrays.append(data)
    if not any(a.any() for a in arrays):
        raise BadSampleError(f"case {case.name}: every modality is all zeros")
    meta = {"filename_or_obj": str(ref_path), "case": case.name}
    out = {"image": MetaTensor(torch.from_numpy(np.stack(arrays)), affine=torch.from_numpy(ref_affine),
                               meta=meta), "case": case.name}
    if with_seg:
        if case.seg is None:
            raise BadSampleError(f"case {case.name}: no label file {case.name}_seg.nii.gz in {case.folder} "
                                 "(needed for training and evaluation)")
        seg, affine = _read(case, case.seg)
        _check_same_grid(case, case.seg, seg.shape, affine, ref_path, arrays[0].shape, ref_affine)
        out["label"] = MetaTensor(torch.from_numpy(check_labels(case, seg)[None]),
                                  affine=torch.from_numpy(ref_affine),
                                  meta={"filename_or_obj": str(case.seg), "case": case.name})
    return out


def _check_same_grid(case: Case, path: Path, shape, affine, ref_path: Path, ref_shape, ref_affine) -> None:
    if tuple(shape) != tuple(ref_shape):
        raise BadSampleError(f"case {case.name}: {path.name} has shape {tuple(shape)} but {ref_path.name} "
                             f"has {tuple(ref_shape)}; the volumes of a case must be co-registered")
    if not np.allclose(affine, ref_affine, rtol=0, atol=AFFINE_TOL):
        raise BadSampleError(f"case {case.name}: {path.name} has a different affine from {ref_path.name} "
                             f"(max difference {np.abs(affine - ref_affine).max():.4g}); the volumes of a case "
                             "must share one voxel grid")


def check_labels(case: Case, seg: np.ndarray) -> np.ndarray:
    """uint8 labels in {0, 1, 2, 4} (2023's ET label 3 becomes 4); any other value is an error."""
    values = np.unique(seg)
    allowed = (0, 1, 2, case.et_label)
    bad = [v for v in values.tolist() if v not in allowed]
    if bad:
        shown = ", ".join(f"{v:g}" for v in bad[:5])
        raise BadSampleError(f"case {case.name}: {case.seg.name} holds label value(s) {shown}; expected only "
                             f"{', '.join(map(str, allowed))} (BraTS labels)")
    out = seg.astype(np.uint8)
    if case.et_label != 4:
        out[out == case.et_label] = 4
    return out


def labels_to_regions(labels) -> torch.Tensor:
    """BraTS labels (X, Y, Z) or (1, X, Y, Z) -> bool regions (3, X, Y, Z) in REGIONS order (WT, TC, ET)."""
    from monai.transforms import ConvertToMultiChannelBasedOnBratsClasses
    tc_wt_et = ConvertToMultiChannelBasedOnBratsClasses(et_label=4)(torch.as_tensor(labels))
    return torch.as_tensor(tc_wt_et)[[1, 0, 2]].bool()  # MONAI gives (TC, WT, ET)


def regions_to_labels(regions, et_label: int = 4) -> np.ndarray:
    """Regions (3, X, Y, Z) in (WT, TC, ET) order -> uint8 BraTS labels: ET -> 4, TC minus ET -> 1,
    WT minus TC -> 2. Each region overrides the larger one, so ET outside TC is still labelled ET."""
    r = torch.as_tensor(regions).bool().cpu().numpy()
    labels = np.zeros(r.shape[1:], np.uint8)
    labels[r[0]] = 2
    labels[r[1]] = 1
    labels[r[2]] = et_label
    return labels
