"""Detection transforms (torchvision.transforms.v2 with tv_tensors.BoundingBoxes) and the collate.

Train follows the TF SSD recipe (the TF Object Detection API's ssdlite_mobiledet configs): horizontal
flip, then the SSD random crop (kept off 15% of the time), then a stretch-resize to S x S; eval only
resizes. Both end by scaling pixels to [-1, 1], i.e. (2 / 255) x - 1."""
from __future__ import annotations

import torch
from torch import nn
from torchvision.transforms import v2

DEFAULT_AUGMENT = {"hflip": 0.5, "ssd_crop": 0.85}  # probabilities; TF's random_coef 0.15 keeps 15%


class SSDRandomCrop(nn.Module):
    """v2.RandomIoUCrop applied with probability `p`; images without boxes are left as they are
    (RandomIoUCrop needs a box centre inside its crop and would never return on them)."""

    def __init__(self, p: float):
        super().__init__()
        self.p, self.crop = p, v2.RandomIoUCrop()

    def forward(self, sample: dict) -> dict:
        if self.p <= 0 or len(sample["boxes"]) == 0 or torch.rand(()).item() >= self.p:
            return sample
        return self.crop(sample)


SIGNED_UNIT = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # uint8 -> [-1, 1]: MobileDets' (the TF OD API's) input range


def normalise(mean=SIGNED_UNIT[0], std=SIGNED_UNIT[1]) -> list:
    """uint8 image -> float, normalised (by default to [-1, 1])."""
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]


def train_transform(size: int, aug: dict | None = None, mean=SIGNED_UNIT[0], std=SIGNED_UNIT[1]) -> v2.Compose:
    """Flip, SSD random crop, stretch-resize to size x size, drop degenerate boxes, normalise."""
    aug = {**DEFAULT_AUGMENT, **(aug or {})}
    return v2.Compose([v2.RandomHorizontalFlip(aug["hflip"]), SSDRandomCrop(aug["ssd_crop"]),
                       v2.Resize((size, size), antialias=True), v2.SanitizeBoundingBoxes(),
                       *normalise(mean, std)])


def eval_transform(size: int, mean=SIGNED_UNIT[0], std=SIGNED_UNIT[1]) -> v2.Compose:
    """Stretch-resize to size x size and normalise (boxes follow the resize)."""
    return v2.Compose([v2.Resize((size, size), antialias=True), *normalise(mean, std)])


def collate_detection(samples: list) -> dict:
    """Stack images; keep targets as a list of dicts; `None` marks a skipped sample and is counted."""
    good = [s for s in samples if s is not None]
    batch: dict = {}
    if good:
        batch = {"image": torch.stack([s["image"] for s in good]),
                 "target": [s["target"] for s in good],
                 "image_id": torch.tensor([s["image_id"] for s in good], dtype=torch.int64),
                 "orig_size": torch.stack([s["orig_size"] for s in good])}
    batch["skipped"] = len(samples) - len(good)
    return batch
