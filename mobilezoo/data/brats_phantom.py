"""`brats-phantom`: generated brain-tumour MRI cases written as BraTS 2020 NIfTI folders.

Layout (the one the segment3d task reads for any dataset root):

    brats-phantom/train/BraTS20_Training_001/BraTS20_Training_001_{flair,t1,t1ce,t2,seg}.nii.gz
    brats-phantom/val/BraTS20_Training_301/...        (val cases are numbered from 301)

Each case is a 64x64x48 volume of 3 mm voxels (a 192x192x144 mm field of view) with a real,
non-RAS affine like BraTS's own (x and y axes run right-to-left and anterior-to-posterior, i.e.
LPS), int16 intensities with background exactly 0, and a uint8 label map with BraTS 2020 values.

Anatomy: an ellipsoidal head (scalp and a dark skull shell), a brain of grey-matter cortex
over white matter, sulcal CSF and two lateral ventricles. Tumour: a randomly placed,
randomly shaped core (irregular rotated ellipsoid) made of necrosis (label 1) inside an
enhancing rim 2-3 voxels thick (label 4), surrounded by oedema (label 2) spreading 1.4-2.2x
the core size and kept inside the brain. Contrasts follow real scans: the enhancing rim is
bright on t1ce only, necrosis is dark on t1 and t1ce and bright on t2, oedema is bright on
FLAIR and t2, CSF is bright on t2 and suppressed on FLAIR. Each modality then gets a slight
blur (partial volume), a smooth multiplicative bias field (+-15%), Gaussian noise and its own
arbitrary intensity scale. Every case is drawn from its own seed (split, index), so the set is
the same on every machine and a smaller set is a prefix of a larger one."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy import ndimage

from . import cache_dir, publish

VERSION = 1  # bump when the generator changes: a cached set of another version is rewritten
SHAPE = (64, 64, 48)
SPACING = 3.0  # mm per voxel, isotropic
NUM_TRAIN, NUM_VAL = 40, 10
VAL_FIRST = 301  # val cases are BraTS20_Training_301, 302, ...
SEED = 2020
MODALITIES = ("flair", "t1", "t1ce", "t2")

# Relative intensity of each tissue per modality (before bias, noise and scale).
TISSUES = ("background", "skull", "scalp", "csf", "gm", "wm", "oedema", "necrosis", "enhancing")
CONTRAST = {  # columns follow TISSUES
    "flair": (0, 0.08, 0.55, 0.15, 0.75, 0.55, 1.45, 0.55, 1.05),
    "t1": (0, 0.10, 0.95, 0.20, 0.60, 0.85, 0.45, 0.25, 0.55),
    "t1ce": (0, 0.10, 0.95, 0.20, 0.60, 0.85, 0.50, 0.20, 1.50),
    "t2": (0, 0.08, 0.60, 1.50, 0.80, 0.55, 1.30, 1.45, 0.90),
}
LABEL = {"oedema": 2, "necrosis": 1, "enhancing": 4}


def _affine(shape: tuple[int, int, int]) -> np.ndarray:
    """An LPS-oriented voxel-to-world (RAS mm) affine centred on the volume, as in BraTS files."""
    a = np.diag([-SPACING, -SPACING, SPACING, 1.0])
    a[:3, 3] = [SPACING * (shape[0] - 1) / 2, SPACING * (shape[1] - 1) / 2, -SPACING * (shape[2] - 1) / 2]
    return a


@lru_cache(maxsize=None)
def _upsampler(n: int, coarse: int) -> np.ndarray:
    """(n, coarse) matrix of scipy's cubic-spline zoom along one axis (the zoom is separable)."""
    return ndimage.zoom(np.eye(coarse), (n / coarse, 1), order=3, mode="nearest")[:n]


def _smooth_field(rng: np.random.Generator, shape, coarse: int = 4) -> np.ndarray:
    """A smooth random field in about [-1, 1]: a coarse random grid upsampled with cubic splines."""
    grid = rng.uniform(-1, 1, (coarse,) * 3)
    wx, wy, wz = (_upsampler(n, coarse) for n in shape)
    return np.einsum("ai,bj,ck,ijk->abc", wx, wy, wz, grid, optimize=True)


def _rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random 3-D rotation matrix."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q *= np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def make_case(index: int, split: str, shape: tuple[int, int, int] = SHAPE) -> tuple[dict, np.ndarray]:
    """One case from its own seed: ({modality: int16 volume}, uint8 labels {0, 1, 2, 4}).

    Lengths are in units of the volume's half-extent, so a smaller `shape` gives the same
    anatomy at a coarser resolution."""
    rng = np.random.default_rng([SEED, 0 if split == "train" else 1, index])
    shape = tuple(int(s) for s in shape)
    half = np.array(shape, float) / 2
    # coordinates in mm-like units where the x half-extent is 1 (voxels are isotropic)
    grid = np.stack(np.meshgrid(*[(np.arange(n) + 0.5 - half[i]) / half[0] for i, n in enumerate(shape)],
                                indexing="ij"), -1)
    vox = 1.0 / half[0]  # one voxel in these units

    head_axes = np.array([0.80, 0.92, 0.66]) * rng.uniform(0.93, 1.05, 3)
    wobble = 1 + 0.03 * _smooth_field(rng, shape)
    r_head = np.sqrt(((grid / head_axes) ** 2).sum(-1)) * wobble
    scalp_t, skull_t, csf_t, gm_t = (v * vox / head_axes.mean() for v in (1.2, 1.6, 1.0, 2.6))
    tissue = np.zeros(shape, np.uint8)
    names = {n: i for i, n in enumerate(TISSUES)}
    tissue[r_head < 1] = names["scalp"]
    tissue[r_head < 1 - scalp_t] = names["skull"]
    tissue[r_head < 1 - scalp_t - skull_t] = names["csf"]
    brain_r = 1 - scalp_t - skull_t - csf_t
    # a folded cortex: grey matter of varying thickness over white matter
    folds = 0.6 * gm_t * _smooth_field(rng, shape, coarse=7)
    tissue[r_head < brain_r] = names["gm"]
    tissue[r_head < brain_r - gm_t - folds] = names["wm"]
    brain = r_head < brain_r
    # two lateral ventricles either side of the midline (x), elongated front to back (y)
    v_axes = np.array([0.10, 0.32, 0.14]) * rng.uniform(0.8, 1.2, 3)
    for side in (-1, 1):
        c = np.array([side * 0.12, rng.uniform(-0.05, 0.05), rng.uniform(0.0, 0.1)])
        tissue[(((grid - c) / v_axes) ** 2).sum(-1) < 1] = names["csf"]

    # the tumour: an irregular rotated ellipsoid core, enhancing rim over necrosis, oedema around
    core_axes = rng.uniform(0.16, 0.30) * rng.uniform(0.75, 1.25, 3)
    oedema_scale = rng.uniform(1.4, 2.2)
    reach = core_axes.max() * oedema_scale
    for _ in range(100):  # a centre whose core lies inside the brain (the last draw if none does)
        centre = rng.uniform(-1, 1, 3) * (head_axes * brain_r - core_axes.max() - 2 * vox)
        if np.sqrt(((centre / (head_axes * brain_r)) ** 2).sum()) < 1 - core_axes.max() / head_axes.min():
            break
    rot = _rotation(rng)
    local = (grid - centre) @ rot
    s_core = np.sqrt(((local / core_axes) ** 2).sum(-1)) * (1 + 0.18 * _smooth_field(rng, shape, coarse=6))
    s_oed = np.sqrt(((local / (core_axes * oedema_scale)) ** 2).sum(-1)) * (
        1 + 0.30 * _smooth_field(rng, shape, coarse=5))
    rim = rng.uniform(2.0, 3.0) * vox / core_axes.mean()
    in_reach = np.sqrt(((grid - centre) ** 2).sum(-1)) < reach * 1.5
    oedema = (s_oed < 1) & brain & in_reach
    core = (s_core < 1) & brain
    necrosis = (s_core < 1 - rim) & brain
    tissue[oedema] = names["oedema"]
    tissue[core] = names["enhancing"]
    tissue[necrosis] = names["necrosis"]
    labels = np.zeros(shape, np.uint8)
    for name, value in LABEL.items():
        labels[tissue == names[name]] = value

    head = r_head < 1
    volumes = {}
    for m in MODALITIES:
        img = np.asarray(CONTRAST[m], np.float64)[tissue]
        img *= 1 + 0.04 * _smooth_field(rng, shape, coarse=9)  # tissue texture
        img = ndimage.gaussian_filter(img, 0.6)  # partial volume at tissue borders
        img *= np.exp(0.15 * _smooth_field(rng, shape, coarse=3))  # coil bias field
        img += rng.normal(0, rng.uniform(0.03, 0.06), shape)
        img = np.clip(img, 0.01, None) * rng.uniform(300, 1500)
        volumes[m] = np.where(head, np.round(img), 0).astype(np.int16)  # skull-stripped style: 0 outside
    return volumes, labels


def case_name(index: int, split: str) -> str:
    """BraTS 2020 folder name of a generated case: train 001.., val 301.."""
    return f"BraTS20_Training_{index + (1 if split == 'train' else VAL_FIRST):03d}"


def write_case(folder: Path, name: str, volumes: dict, labels: np.ndarray | None,
               affine: np.ndarray) -> Path:
    """Write one case folder with BraTS 2020 file names (`labels=None`: no seg, as in validation)."""
    import nibabel as nib
    case = Path(folder) / name
    case.mkdir(parents=True, exist_ok=True)
    arrays = dict(volumes) if labels is None else {**volumes, "seg": labels}
    for key, arr in arrays.items():
        img = nib.Nifti1Image(arr, affine)
        img.header.set_xyzt_units("mm", "sec")
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
        nib.save(img, case / f"{name}_{key}.nii.gz")
    return case


def ensure(root: Path | None = None, num_train: int | None = None, num_val: int | None = None,
           shape: tuple[int, int, int] | None = None) -> Path:
    """Write the dataset under `root` (default: the cache) unless already complete; return root.

    `num_train`, `num_val` and `shape` (defaults NUM_TRAIN, NUM_VAL, SHAPE) shrink the set for
    tests. A cached set written with other parameters or by another VERSION is rewritten."""
    root = Path(root) if root is not None else cache_dir() / "brats-phantom"
    num_train = NUM_TRAIN if num_train is None else num_train
    num_val = NUM_VAL if num_val is None else num_val
    shape = tuple(SHAPE if shape is None else shape)
    marker = f"brats-phantom v{VERSION}, seed {SEED}, {num_train} train, {num_val} val, shape {shape}\n"

    def write(tmp: Path) -> None:
        affine = _affine(shape)
        for split, count in (("train", num_train), ("val", num_val)):
            (tmp / split).mkdir(parents=True)
            for i in range(count):
                volumes, labels = make_case(i, split, shape)
                write_case(tmp / split, case_name(i, split), volumes, labels, affine)
    return publish(root, marker, write)
