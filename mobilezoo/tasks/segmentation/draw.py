"""Class masks as palette PNGs and overlays, and the report's IoU / confusion figure."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torchvision.utils import draw_segmentation_masks


def palette(n: int = 256) -> list[tuple[int, int, int]]:
    """VOC's colour map (class bits spread over the high bits of R, G, B): what VOC masks ship with."""
    colours = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        colours.append((r, g, b))
    return colours


PALETTE = palette()


def write_mask_png(mask: torch.Tensor, path: Path) -> None:
    """Class indices (H, W) as a palette PNG: viewers show colours, readers get the indices back."""
    from PIL import Image
    im = Image.fromarray(mask.to(torch.uint8).cpu().numpy(), mode="P")
    im.putpalette([v for rgb in PALETTE for v in rgb])
    im.save(path)


def overlay(image: torch.Tensor, mask: torch.Tensor, names: list[str], alpha: float = 0.55) -> torch.Tensor:
    """uint8 image (3, H, W) with each class of `mask` (H, W) painted in its palette colour; a class 0
    named background and ignored pixels are left unpainted."""
    skip = 1 if names and names[0].lower() == "background" else 0
    classes = [k for k in mask.unique().tolist() if skip <= k < len(names)]
    if not classes:
        return image
    masks = torch.stack([mask == k for k in classes])
    return draw_segmentation_masks(image, masks, alpha=alpha, colors=[PALETTE[k] for k in classes])


def iou_figure(metrics: dict, names: list[str], path: Path) -> None:
    """IoU per class as bars (mIoU as a line) beside the confusion matrix normalised per true class."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    k = len(names)
    ious = [np.nan if v is None else v for v in metrics["per_class_iou"]]
    cm = np.asarray(metrics["confusion"], dtype=float)
    cm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, (a, b) = plt.subplots(1, 2, figsize=(4 + 0.6 * k, 1.8 + 0.3 * k), gridspec_kw={"width_ratios": [1.3, 1]})
    a.barh(range(k), ious, color=[np.array(PALETTE[i]) / 255 for i in range(k)], edgecolor="black")
    a.axvline(metrics["miou"], color="red", linestyle="--", label=f"mIoU {metrics['miou']:.3f}")
    a.set_yticks(range(k), names), a.invert_yaxis(), a.set_xlim(0, 1), a.set_xlabel("IoU"), a.legend(loc="lower right")
    b.imshow(cm, cmap="Blues", vmin=0, vmax=1)
    b.set_xticks(range(k), names, rotation=90), b.set_yticks(range(k), names)
    b.set_xlabel("predicted"), b.set_ylabel("true"), b.set_title("pixels per true class")
    if k <= 20:
        for i in range(k):
            for j in range(k):
                if cm[i, j] >= 0.005:
                    b.text(j, i, f"{cm[i, j]:.2f}", ha="center", va="center", fontsize=7,
                           color="white" if cm[i, j] > 0.5 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
