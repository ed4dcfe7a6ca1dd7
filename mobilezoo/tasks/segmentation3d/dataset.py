"""A Dataset of BraTS cases through the MONAI pipeline, and a collate that pads unequal volumes."""
from __future__ import annotations

import torch
from monai.data.utils import affine_to_spacing
from monai.transforms import Compose, SpatialPad
from torch.utils.data import Dataset, default_collate

from ...errors import BadSampleError
from .brats import Case, load_case
from .transforms import preprocess


def _plain(x) -> torch.Tensor:
    """A MONAI MetaTensor as a plain tensor (cheaper to collate and move)."""
    return x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)


class BratsDataset(Dataset):
    """Labelled cases, preprocessed (optionally cached in memory), then passed through `augment`.

    Items: image (4, D, H, W) float32, label (3, D, H, W) uint8 regions, case (name) and spacing
    (3,) in mm of the RAS-oriented volume. Random transforms draw their seed from torch's RNG,
    so the engine's per-item seeding makes augmentation reproducible. With `skip_bad`, a case
    that cannot be read gives None (counted by the collate) instead of raising."""

    def __init__(self, cases: list[Case], augment: Compose | None = None, cache: bool = False,
                 skip_bad: bool = False):
        self.cases, self.augment, self.cache, self.skip_bad = cases, augment, cache, skip_bad
        self.pre = preprocess(with_label=True)
        self._cached: dict[int, dict] = {}

    def __len__(self) -> int:
        return len(self.cases)

    def prepared(self, i: int) -> dict:
        """Case i after the deterministic preprocessing, as plain tensors."""
        if i in self._cached:
            return self._cached[i]
        d = self.pre(load_case(self.cases[i], with_seg=True))
        out = {"image": _plain(d["image"]).float(), "label": _plain(d["label"]).to(torch.uint8),
               "case": self.cases[i].name,
               "spacing": torch.as_tensor(affine_to_spacing(d["image"].affine, r=3), dtype=torch.float64)}
        if self.cache:
            self._cached[i] = out
        return out

    def __getitem__(self, i: int):
        try:
            d = self.prepared(i)
        except BadSampleError:
            if self.skip_bad:
                return None
            raise
        if self.augment is None:
            return dict(d)
        self.augment.set_random_state(int(torch.randint(0, 2**31 - 1, ()).item()))
        out = self.augment({"image": d["image"], "label": d["label"]})
        out = out[0] if isinstance(out, list) else out  # RandCropByPosNegLabeld returns a list
        return {**d, "image": _plain(out["image"]).float(), "label": _plain(out["label"]).to(torch.uint8)}


def collate_volumes(samples: list) -> dict:
    """Stack samples, zero-padding unequal volumes at the end of each axis; `shape` keeps each
    sample's own (D, H, W) and `skipped` counts the None (unreadable) samples."""
    good = [s for s in samples if s is not None]
    batch: dict = {}
    if good:
        shapes = [tuple(s["image"].shape[1:]) for s in good]
        if len(set(shapes)) > 1:
            size = [max(s[k] for s in shapes) for k in range(3)]
            pad = SpatialPad(size, method="end")
            good = [{**s, "image": _plain(pad(s["image"])), "label": _plain(pad(s["label"]))} for s in good]
        batch = default_collate(good)
        batch["shape"] = torch.tensor(shapes)
    batch["skipped"] = len(samples) - len(good)
    return batch
