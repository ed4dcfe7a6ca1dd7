"""Logits of whole images: one pass over the fitted image, or sliding windows, then back to the original size."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def slide(model, x: torch.Tensor, crop: int, stride: int, batch: int = 4) -> torch.Tensor:
    """Logits (1, K, h, w) of one image (1, 3, h, w): windows of crop x crop every `stride` pixels,
    overlaps averaged (MONAI's sliding-window inference; an image smaller than a window is padded
    with 0, the mean after normalising, and cropped back)."""
    from monai.inferers import sliding_window_inference
    overlap = (crop - stride) / crop
    return sliding_window_inference(x, (crop, crop), batch, model, overlap=overlap, mode="constant").float()


def image_logits(model, canvas: torch.Tensor, valid, sizes, opts: dict) -> list[torch.Tensor]:
    """Logits (K, H, W) at each image's original size from a batch of fitted images (N, 3, S, S), the
    fitted images' extents `valid` (N x (h, w)) and original sizes `sizes` (N x (H, W))."""
    valid = [tuple(v) for v in torch.as_tensor(valid).tolist()]
    sizes = [tuple(s) for s in torch.as_tensor(sizes).tolist()]
    if opts["eval_mode"] == "whole":
        maps = [m[None] for m in model(canvas).float()]
        maps = [m[..., :h, :w] for m, (h, w) in zip(maps, valid)]
    else:
        maps = [slide(model, canvas[i: i + 1, :, :h, :w], opts["crop"], opts["stride"])
                for i, (h, w) in enumerate(valid)]
    return [(m if m.shape[-2:] == size else F.interpolate(m, size=size, mode="bilinear", align_corners=False))[0]
            for m, size in zip(maps, sizes)]
