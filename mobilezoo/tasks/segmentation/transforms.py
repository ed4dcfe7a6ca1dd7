"""Segmentation transforms (torchvision.transforms.v2 on tv_tensors.Image + tv_tensors.Mask) and the collate.

Train follows DeepLab's: the image is fitted into a `resize` square (long side = `resize`, ratio
kept), scaled by a random factor in `scale` (0.5-2.0), randomly cropped to data.img_size (padded
with the mean pixel and the ignore label where it is smaller), flipped, optionally photometrically
distorted, normalised. Eval fits the image into the `resize` square and pads it there (bottom and
right, with the mean, i.e. 0 after normalising), so that every image batches and exports at one
size; the mask stays at the original size, where the metric is computed."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import tv_tensors
from torchvision.transforms import v2

from ...errors import DataError
from ..base import task_options
from .dataset import IGNORE

DEFAULT_OPTIONS = {
    "scale": [0.5, 2.0],  # random scale factor range after fitting into `resize`
    "hflip": 0.5,  # probability of a horizontal flip
    "photometric": False,  # torchvision's RandomPhotometricDistort (SSD's colour jitter)
    "resize": 0,  # side of the square images are fitted into (long side); 0: data.img_size
    "eval_mode": "whole",  # whole: one pass over the fitted image; slide: windows of `crop`
    "crop": 0,  # sliding window side; 0: data.img_size (the training crop)
    "stride": 0,  # sliding window step; 0: two thirds of the window
    "reduce_zero_label": False,  # ADE20K's masks: 0 = other (ignored), classes 1..K -> 0..K-1
}


def check_options(given: dict, img_size: int) -> dict:
    """`data.augment` over the defaults, checked, with sizes resolved against img_size."""
    o = task_options(given, DEFAULT_OPTIONS)
    lo, hi = (o["scale"] + [0, 0])[:2]
    if len(o["scale"]) != 2 or not 0 < lo <= hi:
        raise DataError(f"data.augment.scale must be [low, high] with 0 < low <= high, got {o['scale']}")
    if not 0 <= o["hflip"] <= 1:
        raise DataError(f"data.augment.hflip must be a probability in [0, 1], got {o['hflip']}")
    if o["eval_mode"] not in ("whole", "slide"):
        raise DataError(f"data.augment.eval_mode must be whole or slide, got {o['eval_mode']!r}")
    for k in ("resize", "crop", "stride"):
        if o[k] < 0:
            raise DataError(f"data.augment.{k} must be >= 0 (0: the default), got {o[k]}")
    o["resize"] = o["resize"] or img_size
    o["crop"] = o["crop"] or img_size
    o["stride"] = o["stride"] or max(1, round(o["crop"] * 2 / 3))
    if o["stride"] > o["crop"]:
        raise DataError(f"data.augment.stride {o['stride']} is larger than the window ({o['crop']}): "
                        "pixels between windows would get no prediction")
    return o


class PlainTensors(nn.Module):
    """The sample's tv_tensors as plain tensors, the mask as int64 (what cross-entropy takes)."""

    def forward(self, sample: dict) -> dict:
        return {"image": sample["image"].as_subclass(torch.Tensor),
                "mask": sample["mask"].as_subclass(torch.Tensor).long()}


def train_transform(size: int, opts: dict, mean, std) -> v2.Compose:
    """Scale jitter, random crop with ignore padding, flip, optional photometric distortion, normalise."""
    r = opts["resize"]
    fill = {tv_tensors.Image: [round(255 * m) for m in mean], tv_tensors.Mask: IGNORE}
    ops = [v2.ScaleJitter((r, r), tuple(opts["scale"]), antialias=True),
           v2.RandomCrop(size, pad_if_needed=True, fill=fill), v2.RandomHorizontalFlip(opts["hflip"])]
    if opts["photometric"]:
        ops.append(v2.RandomPhotometricDistort())
    ops += [v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True), v2.Normalize(mean, std),
            PlainTensors()]
    return v2.Compose(ops)


class EvalTransform(nn.Module):
    """Fit the image into a `side` square (long side = side), normalise, pad bottom/right to the
    square; keep the mask as it is. Adds `valid` (the fitted image's height, width in the square)
    and `size` (the original height, width)."""

    def __init__(self, side: int, mean, std):
        super().__init__()
        self.side, self.mean, self.std = side, list(mean), list(std)

    def fit(self, image: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """(normalised float image padded to side x side, (h, w) of the image inside it) of a uint8 image."""
        h, w = image.shape[-2:]
        s = self.side / max(h, w)
        hw = (max(1, round(h * s)), max(1, round(w * s)))
        x = v2.functional.resize(image, list(hw), antialias=True) if hw != (h, w) else image
        x = v2.functional.normalize(v2.functional.to_dtype(x, torch.float32, scale=True), self.mean, self.std)
        return F.pad(x, (0, self.side - hw[1], 0, self.side - hw[0])), hw

    def forward(self, sample: dict) -> dict:
        image = sample["image"].as_subclass(torch.Tensor)
        x, hw = self.fit(image)
        return {"image": x, "mask": sample["mask"].as_subclass(torch.Tensor).long(),
                "valid": torch.tensor(hw), "size": torch.tensor(tuple(image.shape[-2:]))}


def collate_segmentation(samples: list) -> dict:
    """Stack images; pad masks to the largest with the ignore label; `None` marks a skipped sample."""
    good = [s for s in samples if s is not None]
    batch: dict = {}
    if good:
        h, w = max(s["mask"].shape[0] for s in good), max(s["mask"].shape[1] for s in good)
        masks = torch.full((len(good), h, w), IGNORE, dtype=torch.long)
        for m, s in zip(masks, good):
            m[: s["mask"].shape[0], : s["mask"].shape[1]] = s["mask"]
        batch = {"image": torch.stack([s["image"] for s in good]), "mask": masks}
        for key in ("valid", "size"):
            if key in good[0]:
                batch[key] = torch.stack([s[key] for s in good])
    batch["skipped"] = len(samples) - len(good)
    return batch
