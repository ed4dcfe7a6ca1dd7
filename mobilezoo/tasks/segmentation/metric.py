"""mIoU, pixel accuracy and per-class IoU from a confusion matrix summed over the val set (and ranks)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...engine.metrics import SumMetric
from .dataset import IGNORE


def confusion(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(K, K) counts, rows true class, columns predicted, over the pixels whose target is not IGNORE."""
    keep = target != IGNORE
    k = num_classes
    return torch.bincount(target[keep] * k + pred[keep], minlength=k * k).view(k, k)


def scores(cm: torch.Tensor) -> dict:
    """IoU per class (None where a class is neither in the truth nor predicted), their mean over the
    classes that occur (mIoU, as mmsegmentation's nanmean), pixel accuracy and mean class accuracy."""
    cm = cm.double()
    tp, truth, predicted = cm.diag(), cm.sum(1), cm.sum(0)
    union = truth + predicted - tp
    iou = torch.where(union > 0, tp / union.clamp_min(1), torch.nan)
    acc = torch.where(truth > 0, tp / truth.clamp_min(1), torch.nan)
    total = cm.sum()
    return {"miou": iou.nanmean().item() if (union > 0).any() else float("nan"),
            "pixel_acc": (tp.sum() / total).item() if total > 0 else float("nan"),
            "mean_acc": acc.nanmean().item() if (truth > 0).any() else float("nan"),
            "per_class_iou": [None if v != v else v for v in iou.tolist()]}


class SegmentationMetric(SumMetric):
    """Confusion matrix, cross-entropy sum and image count; `compute` gives mIoU (the headline),
    pixel accuracy, mean class accuracy, per-class IoU and the loss per labelled pixel."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.state = {"confusion": torch.zeros(num_classes, num_classes, dtype=torch.float64),
                      "loss": torch.zeros((), dtype=torch.float64), "images": torch.zeros((), dtype=torch.float64)}

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Add one image: logits (K, H, W) at the mask's size and its mask (H, W); returns the prediction."""
        logits, target = logits.float().cpu(), target.cpu().long()
        pred = logits.argmax(0)
        self.add("confusion", confusion(pred, target, self.num_classes))
        self.add("loss", F.cross_entropy(logits[None], target[None], ignore_index=IGNORE, reduction="sum"))
        self.add("images", torch.ones(()))
        return pred

    def compute(self) -> dict:
        cm = self.state["confusion"]
        pixels = cm.sum().item()
        return {**scores(cm), "loss": self.state["loss"].item() / max(pixels, 1),
                "count": int(self.state["images"].item()), "pixels": int(pixels), "confusion": cm.long().tolist()}
