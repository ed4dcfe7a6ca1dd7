"""Per-case Dice and HD95 for WT, TC and ET (MONAI), averaged over cases and gathered over ranks.

Empty regions follow the BraTS convention: if both the prediction and the ground truth of a
region are empty, Dice is 1 and HD95 is 0; if exactly one is empty, Dice is 0 and HD95 is
HD95_MAX = 373.13 mm, the diagonal of a 240x240x155 BraTS volume of 1 mm voxels (the largest
distance two voxels of a BraTS scan can have). HD95 is in mm, from the voxel spacing."""
from __future__ import annotations

import math
import warnings

import torch
from monai.metrics import DiceMetric, HausdorffDistanceMetric

from ...engine.distributed import is_distributed
from ...engine.metrics import SumMetric
from .brats import REGIONS

HD95_MAX = round(math.sqrt(240**2 + 240**2 + 155**2), 2)  # 373.13 mm


def case_scores(pred, target, spacing=None) -> tuple[list[float], list[float]]:
    """(Dice, HD95) per region of one case; `pred`, `target`: bool (3, X, Y, Z) in (WT, TC, ET) order."""
    pred, target = torch.as_tensor(pred).bool().cpu(), torch.as_tensor(target).bool().cpu()
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} differs from the label's {tuple(target.shape)}")
    # MONAI's DiceMetric with ignore_empty=False already gives 1 for both empty and 0 for one empty
    dice = DiceMetric(include_background=True, reduction="none", ignore_empty=False)(pred[None], target[None])[0]
    hd_metric = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")
    hd95 = []
    for c in range(pred.shape[0]):
        p_any, t_any = bool(pred[c].any()), bool(target[c].any())
        if not p_any and not t_any:
            hd95.append(0.0)
        elif p_any != t_any:
            hd95.append(HD95_MAX)
        else:
            sp = None if spacing is None else [float(s) for s in spacing]
            with warnings.catch_warnings():  # MONAI 1.6 warns about its own internal argument
                warnings.simplefilter("ignore", FutureWarning)
                hd = hd_metric(pred[None, c: c + 1], target[None, c: c + 1], spacing=sp)
            hd95.append(min(float(hd.reshape(-1)[0]), HD95_MAX))
    return [float(d) for d in dice], hd95


class BratsMetric(SumMetric):
    """Collects per-case Dice/HD95 (and the loss); `compute` gives the means over cases.

    Keys: dice (the headline: mean Dice over the three regions), dice_wt/tc/et, hd95 (mean over
    regions), hd95_wt/tc/et, loss, count and per_case (a list of dicts, one per case)."""

    def __init__(self):
        super().__init__()
        self.cases: list[dict] = []

    def update(self, case: str, pred, target, spacing=None, loss: float | None = None) -> dict:
        """Score one case and keep its record."""
        dice, hd95 = case_scores(pred, target, spacing)
        rec = {"case": case}
        for name, d, h in zip(REGIONS, dice, hd95):
            rec[f"dice_{name.lower()}"] = d
            rec[f"hd95_{name.lower()}"] = h
        if loss is not None:
            rec["loss"] = float(loss)
        self.cases.append(rec)
        return rec

    def reduce(self) -> None:
        """Gather every rank's case records onto every rank."""
        if is_distributed():
            gathered: list = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, self.cases)
            self.cases = [c for part in gathered for c in part]

    def compute(self) -> dict:
        n = len(self.cases)
        out: dict = {}
        for kind in ("dice", "hd95"):
            per_region = []
            for name in REGIONS:
                key = f"{kind}_{name.lower()}"
                per_region.append(sum(c[key] for c in self.cases) / n if n else float("nan"))
                out[key] = per_region[-1]
            out[kind] = sum(per_region) / len(per_region)
        losses = [c["loss"] for c in self.cases if "loss" in c]
        if losses:
            out["loss"] = sum(losses) / len(losses)
        out["count"] = n
        out["per_case"] = sorted(self.cases, key=lambda c: c["case"])
        return out
