"""The MONAI pipeline: deterministic preprocessing, then random crop, flips and intensity jitter.

Preprocessing (train, eval and predict alike): orient to RAS, crop to the bounding box of the
voxels that are nonzero in any modality (the brain; BraTS is skull-stripped with background 0),
z-score each modality over its nonzero voxels (zeros stay 0), and turn labels into the (WT, TC,
ET) region channels. Training then pads to the crop size if needed, takes a random crop whose
centre is a tumour voxel with probability `pos_fraction` (else any voxel), flips each axis with
probability `flip`, and scales / shifts intensities by up to +-`scale` / +-`shift` (in standard
deviations) with probability `intensity_prob`."""
from __future__ import annotations

import torch
from monai.transforms import (
    CenterSpatialCropd,
    Compose,
    CropForegroundd,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    SpatialPadd,
)

from ...errors import DataError
from ..base import task_options
from .brats import labels_to_regions

DEFAULT_OPTIONS = {
    "crop": None,  # training crop and sliding window (D, H, W); None: data.img_size in every axis
    "pos_fraction": 0.5,  # probability that a training crop is centred on a tumour voxel
    "flip": 0.5,  # per-axis flip probability
    "scale": 0.1,  # intensity scale factor range 1 +- scale
    "shift": 0.1,  # intensity shift range +- shift (z-scored units)
    "intensity_prob": 1.0,
    "cache": True,  # keep preprocessed volumes in memory (with workers=0; off for full-size BraTS)
    "sw_overlap": 0.5,  # sliding-window overlap at evaluation and prediction
    "sw_batch_size": 4,  # windows per forward pass
}


def nonzero(x: torch.Tensor) -> torch.Tensor:
    """Voxels that belong to the head (BraTS background is exactly 0)."""
    return x != 0


class LabelsToRegionsd(MapTransform):
    """BraTS labels (1, X, Y, Z) in {0, 1, 2, 4} -> uint8 regions (3, X, Y, Z) in (WT, TC, ET) order."""

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = labels_to_regions(d[key]).to(torch.uint8)
        return d


def check_options(augment: dict, img_size: int) -> dict:
    """The task options from `data.augment` merged over the defaults; DataError on a bad one."""
    opts = task_options(augment, DEFAULT_OPTIONS)
    crop = opts["crop"] if opts["crop"] is not None else [img_size] * 3
    if isinstance(crop, int):
        crop = [crop] * 3
    if not (isinstance(crop, (list, tuple)) and len(crop) == 3
            and all(isinstance(c, int) and not isinstance(c, bool) and c >= 8 for c in crop)):
        raise DataError(f"data.augment.crop must be three integers >= 8 (D, H, W), got {opts['crop']!r}")
    opts["crop"] = tuple(crop)
    for k in ("pos_fraction", "flip", "intensity_prob"):
        if not (isinstance(opts[k], (int, float)) and 0 <= opts[k] <= 1):
            raise DataError(f"data.augment.{k} must be a probability in [0, 1], got {opts[k]!r}")
    for k in ("scale", "shift"):
        if not (isinstance(opts[k], (int, float)) and opts[k] >= 0):
            raise DataError(f"data.augment.{k} must be a number >= 0, got {opts[k]!r}")
    if not (isinstance(opts["sw_overlap"], (int, float)) and 0 <= opts["sw_overlap"] < 1):
        raise DataError(f"data.augment.sw_overlap must be in [0, 1), got {opts['sw_overlap']!r}")
    if not (isinstance(opts["sw_batch_size"], int) and opts["sw_batch_size"] >= 1):
        raise DataError(f"data.augment.sw_batch_size must be a positive integer, got {opts['sw_batch_size']!r}")
    return opts


def preprocess(with_label: bool = True) -> Compose:
    """Orient to RAS, crop to the brain, z-score each modality on nonzero voxels, labels -> regions.

    Invertible for the image key (Orientation and CropForeground are tracked), which `predict`
    uses to put predictions back on the input's voxel grid."""
    keys = ["image", "label"] if with_label else ["image"]
    ops = [Orientationd(keys=keys, axcodes="RAS", labels=None),
           CropForegroundd(keys=keys, source_key="image", select_fn=nonzero, allow_smaller=True),
           NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True)]
    if with_label:
        ops.append(LabelsToRegionsd(keys="label"))
    return Compose(ops)


def augment(opts: dict) -> Compose:
    """Random crop of `opts['crop']` (tumour-centred with probability pos_fraction), flips, intensity jitter."""
    keys, crop, p = ["image", "label"], opts["crop"], opts["pos_fraction"]
    ops = [SpatialPadd(keys=keys, spatial_size=crop),
           RandCropByPosNegLabeld(keys=keys, label_key="label", spatial_size=crop, pos=p, neg=1 - p,
                                  num_samples=1)]
    if opts["flip"] > 0:
        ops += [RandFlipd(keys=keys, prob=opts["flip"], spatial_axis=a) for a in range(3)]
    if opts["intensity_prob"] > 0 and opts["scale"] > 0:
        ops.append(RandScaleIntensityd(keys="image", factors=opts["scale"], prob=opts["intensity_prob"],
                                       channel_wise=True))
    if opts["intensity_prob"] > 0 and opts["shift"] > 0:
        ops.append(RandShiftIntensityd(keys="image", offsets=opts["shift"], prob=opts["intensity_prob"],
                                       channel_wise=True))
    return Compose(ops)


def center_crop(opts: dict) -> Compose:
    """A fixed-size centre crop (padded if smaller): model-sized calibration samples."""
    keys = ["image", "label"]
    return Compose([SpatialPadd(keys=keys, spatial_size=opts["crop"]),
                    CenterSpatialCropd(keys=keys, roi_size=opts["crop"])])
