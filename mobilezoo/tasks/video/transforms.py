"""Whole-clip transforms with torchvision.transforms.v2 on tv_tensors.Video: every frame gets the same crop.

Training follows the SqueezeTime configs (mmaction2 defaults): resize the short side, multi-scale
crop, resize to the input size, optional horizontal flip (done by the dataset, which may relabel),
colour jitter, ImageNet normalisation, random erasing. Evaluation resizes the short side and takes
a centre crop or three crops along the long side (mmaction2 CenterCrop / ThreeCrop)."""
from __future__ import annotations

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet, as the SqueezeTime configs


def to_video(frames: np.ndarray) -> tv_tensors.Video:
    """uint8 (T, H, W, 3) frames -> a uint8 Video (T, 3, H, W)."""
    return tv_tensors.Video(torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2))


def to_model_layout(video: torch.Tensor) -> torch.Tensor:
    """(T, C, H, W) -> contiguous (C, T, H, W), the model's clip layout without the batch axis."""
    return video.as_subclass(torch.Tensor).permute(1, 0, 2, 3).contiguous()


class MultiScaleCrop(v2.Transform):
    """mmaction2 MultiScaleCrop(random_crop=True): crop width and height each a fraction of the short
    side (levels at most `max_wh_scale_gap` apart), at a random position."""

    def __init__(self, scales=(1, 0.875, 0.75, 0.66, 0.5), max_wh_scale_gap: int = 1, input_size: int | None = None):
        super().__init__()
        self.scales, self.gap, self.input_size = tuple(scales), max_wh_scale_gap, input_size

    def make_params(self, flat_inputs: list) -> dict:
        h, w = F.get_size(next(x for x in flat_inputs if isinstance(x, torch.Tensor)))
        sides = [int(min(h, w) * s) for s in self.scales]
        pairs = [(cw, ch) for i, ch in enumerate(sides) for j, cw in enumerate(sides) if abs(i - j) <= self.gap]
        cw, ch = pairs[int(torch.randint(len(pairs), ()))]
        if self.input_size is not None:  # mmaction2 snaps a side within 3 px of the input size to it
            cw = self.input_size if abs(cw - self.input_size) < 3 else cw
            ch = self.input_size if abs(ch - self.input_size) < 3 else ch
        cw, ch = max(1, min(cw, w)), max(1, min(ch, h))
        top, left = int(torch.randint(h - ch + 1, ())), int(torch.randint(w - cw + 1, ()))
        return {"top": top, "left": left, "height": ch, "width": cw}

    def transform(self, inpt, params: dict):
        return F.crop(inpt, **params) if isinstance(inpt, torch.Tensor) else inpt


class TrainClip:
    """The training transform of one clip: uint8 Video (T, 3, H, W) -> normalised float (C, T, S, S)."""

    def __init__(self, size: int, opts: dict, mean=MEAN, std=STD):
        spatial = [v2.Resize(opts["short_side"], antialias=True)] if opts["short_side"] else []
        spatial += [MultiScaleCrop(opts["scales"], opts["max_wh_scale_gap"], size),
                    v2.Resize((size, size), antialias=True)]
        self.spatial = v2.Compose(spatial)
        self.to_float = v2.ToDtype(torch.float32, scale=True)  # jitter in float: no uint8 round trips
        jitter = opts["color_jitter"]
        self.jitter = v2.ColorJitter(*jitter) if jitter and any(jitter) else None
        after = [v2.Normalize(list(mean), list(std))]
        if opts["erase_prob"]:
            # erased after normalisation with N(0, 1) noise, i.e. random colours around the data mean
            # (mmaction2's mode='rand' fills uniform 0-255 before normalisation)
            after.append(v2.RandomErasing(opts["erase_prob"], scale=(0.02, 1 / 3), ratio=(0.3, 3.33),
                                          value="random"))
        self.after = v2.Compose(after)

    def __call__(self, video: tv_tensors.Video, flip: bool) -> torch.Tensor:
        video = self.spatial(video)
        if flip:
            video = F.horizontal_flip(video)
        video = self.to_float(video)
        if self.jitter is not None:
            video = self.jitter(video)
        return to_model_layout(self.after(video))


class EvalViews:
    """Deterministic views of one clip: short side resized, then a centre crop or three crops along the
    long side; uint8 Video (T, 3, H, W) -> normalised float (crops, C, T, S, S)."""

    def __init__(self, size: int, short_side: int, crops: int, mean=MEAN, std=STD):
        if crops not in (1, 3):
            raise ValueError(f"crops must be 1 (centre) or 3 (three along the long side), got {crops}")
        self.size, self.short_side, self.crops = size, short_side, crops
        self.normalise = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])

    def boxes(self, h: int, w: int) -> list[tuple[int, int]]:
        """(top, left) of each crop of an h x w frame."""
        s = self.size
        cy, cx = max(h - s, 0) // 2, max(w - s, 0) // 2
        if self.crops == 1:
            return [(cy, cx)]
        if w >= h:
            return [(cy, 0), (cy, cx), (cy, max(w - s, 0))]
        return [(0, cx), (cy, cx), (max(h - s, 0), cx)]

    def __call__(self, video: tv_tensors.Video) -> torch.Tensor:
        video = F.resize(video, self.short_side, antialias=True)
        h, w = F.get_size(video)
        views = [F.crop(video, top, left, self.size, self.size) for top, left in self.boxes(h, w)]
        return torch.stack([to_model_layout(self.normalise(v)) for v in views])
