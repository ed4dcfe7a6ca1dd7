"""SSDLite detector, composed as torchvision composes SSD, and configured as the TF object-detection
API configures it on MobileDet backbones.

backbone C4/C5 -> four depthwise extra layers (512, 256, 256, 128) -> unshared depthwise box and
class heads on the six maps -> TF `create_ssd_anchors` anchors (2,034 at 320x320; option
`anchor_scales`: min scale, max scale, lowest layer's box). Training: IoU-0.5 matching (TF's
matched_threshold, option `match_iou`) with forced best anchors, box coder (10, 10, 5, 5), sigmoid
focal loss (alpha 0.75 on positives, gamma 2) + smooth L1, both divided by the number of positives
(and the box loss by 4). Inference: sigmoid, per-class NMS at IoU 0.6, 100 detections. torchvision's
detection contract: train mode returns a loss dict, eval mode a list of boxes/scores/labels.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection import _utils as det_utils
from torchvision.ops import batched_nms, box_iou, clip_boxes_to_image, sigmoid_focal_loss

from ..errors import UserError
from ..layers import ConvNormAct
from ..layers.factories import get_norm
from .mobiledet import ARCHS, MobileDetBackbone
from .registry import register

EXTRA_DEPTHS = (512, 256, 256, 128)
TAIL_NORM = get_norm("batch", eps=1e-3, momentum=0.03)  # BN of the extra layers and heads


def ssd_anchor_specs(num_layers: int = 6, min_scale: float = 0.2, max_scale: float = 0.95,
                     aspect_ratios=(1.0, 2.0, 0.5, 3.0, 0.3333),
                     lowest_scale: float = 0.1) -> list[list[tuple[float, float]]]:
    """(scale, aspect) pairs per layer, as TF `create_ssd_anchors` with its defaults (`lowest_scale`:
    the square box of the lowest layer, fixed at 0.1 in TF)."""
    scales = [min_scale + (max_scale - min_scale) * i / (num_layers - 1) for i in range(num_layers)] + [1.0]
    specs = [[(lowest_scale, 1.0), (min_scale, 2.0), (min_scale, 0.5)]]  # reduce_boxes_in_lowest_layer
    for k in range(1, num_layers):
        layer = [(scales[k], ar) for ar in aspect_ratios]
        layer.append((math.sqrt(scales[k] * scales[k + 1]), 1.0))  # interpolated scale, aspect 1
        specs.append(layer)
    return specs


def grid_anchors(sizes: list[tuple[int, int]], specs, image_size: tuple[int, int]) -> torch.Tensor:
    """Anchors (N, 4) as xyxy pixels of the input; order: layer, y, x, box spec (TF order).

    Normalised anchors are made square in pixels for non-square inputs (TF's base_anchor_size
    scaling by min(H, W) / H and min(H, W) / W); they are not clipped."""
    ih, iw = image_size
    base_h, base_w = min(ih, iw) / ih, min(ih, iw) / iw
    out = []
    for (fh, fw), spec in zip(sizes, specs):
        s = torch.tensor([p[0] for p in spec], dtype=torch.float64)
        ar = torch.tensor([p[1] for p in spec], dtype=torch.float64).sqrt()
        h, w = s / ar * base_h, s * ar * base_w
        cy = (torch.arange(fh, dtype=torch.float64) + 0.5) / fh
        cx = (torch.arange(fw, dtype=torch.float64) + 0.5) / fw
        cy, cx = torch.meshgrid(cy, cx, indexing="ij")
        cy, cx = cy.reshape(-1, 1), cx.reshape(-1, 1)
        boxes = torch.stack([(cx - w / 2) * iw, (cy - h / 2) * ih, (cx + w / 2) * iw, (cy + h / 2) * ih], -1)
        out.append(boxes.reshape(-1, 4))
    return torch.cat(out).float()


def anchor_specs_from_scales(anchor_scales=(0.2, 0.95, 0.1), num_layers: int = 6) -> list[list[tuple[float, float]]]:
    """`ssd_anchor_specs` from TF's config triple (min scale, max scale, lowest layer's box), checked."""
    if len(anchor_scales) != 3 or min(anchor_scales) <= 0 or anchor_scales[0] >= anchor_scales[1]:
        raise UserError(f"anchor_scales: expected [min_scale, max_scale, lowest_scale], positive, min < max; "
                        f"got {list(anchor_scales)}")
    min_scale, max_scale, lowest_scale = anchor_scales
    return ssd_anchor_specs(num_layers, min_scale=min_scale, max_scale=max_scale, lowest_scale=lowest_scale)


def extra_layer(in_ch: int, depth: int, norm) -> nn.Sequential:
    """1x1 to depth/2 -> depthwise 3x3 stride 2 -> 1x1 to depth, each BN + ReLU6 (use_depthwise)."""
    mid = max(depth // 2, 16)
    return nn.Sequential(ConvNormAct(in_ch, mid, 1, norm=norm, act=nn.ReLU6),
                         ConvNormAct(mid, mid, 3, 2, groups=mid, norm=norm, act=nn.ReLU6),
                         ConvNormAct(mid, depth, 1, norm=norm, act=nn.ReLU6))


def head(in_ch: int, out_ch: int, norm) -> nn.Sequential:
    """Depthwise 3x3 + BN + ReLU6, then a biased 1x1 prediction conv."""
    return nn.Sequential(ConvNormAct(in_ch, in_ch, 3, groups=in_ch, norm=norm, act=nn.ReLU6),
                         nn.Conv2d(in_ch, out_ch, 1))


def ssdlite_extras(in_ch: int, depths=EXTRA_DEPTHS, norm=TAIL_NORM) -> nn.ModuleList:
    """The extra layers that continue the backbone's last map, each halving it."""
    return nn.ModuleList(extra_layer(c, d, norm) for c, d in zip((in_ch, *depths), depths))


def ssdlite_heads(widths, anchor_specs, num_logits: int, norm=TAIL_NORM) -> tuple[nn.ModuleList, nn.ModuleList]:
    """(box heads, class heads): one unshared depthwise head per feature map."""
    return (nn.ModuleList(head(w, len(s) * 4, norm) for w, s in zip(widths, anchor_specs)),
            nn.ModuleList(head(w, len(s) * num_logits, norm) for w, s in zip(widths, anchor_specs)))


def feature_channels(backbone: nn.Module) -> list[int]:
    """Channels of the maps `backbone(x)` returns: its timm-style `feature_info` at `out_indices` (all without)."""
    info = backbone.feature_info
    return [info[i]["num_chs"] for i in getattr(backbone, "out_indices", range(len(info)))]


def _out_channels(layer: nn.Module) -> int:
    return [m for m in layer.modules() if isinstance(m, nn.Conv2d)][-1].out_channels


def flatten_maps(maps: list[torch.Tensor], width: int) -> torch.Tensor:
    """Per-map head outputs NCHW -> (N, anchors, width): anchors fastest, then x, then y, as the anchor order."""
    return torch.cat([m.permute(0, 2, 3, 1).reshape(m.shape[0], -1, width) for m in maps], 1)


class SSDLite(nn.Module):
    """SSDLite over any backbone that returns a list of feature maps and describes them in `feature_info`.

    The last backbone map is continued by `extras` (default: the four depthwise extra layers); every
    map gets an unshared box and class head (`heads`, default: depthwise heads sized by
    `anchor_specs`, one list of (scale, aspect) per map). `num_classes` logits (+1 if
    `background_class`). Extras and heads built here get TF's initialisation."""

    def __init__(self, backbone: nn.Module, num_classes: int = 90, *, extras: nn.ModuleList | None = None,
                 heads: tuple[nn.ModuleList, nn.ModuleList] | None = None, anchor_specs=None,
                 background_class: bool = False, score_thresh: float = 1e-8, nms_iou: float = 0.6,
                 detections_per_img: int = 100, topk_candidates: int = 200, focal_alpha: float = 0.75,
                 focal_gamma: float = 2.0, match_iou: float = 0.5):
        super().__init__()
        for name, iou in (("match_iou", match_iou), ("nms_iou", nms_iou)):
            if not 0 < iou <= 1:
                raise UserError(f"{name}: expected an IoU in (0, 1], got {iou}")
        self.backbone = backbone
        channels = feature_channels(backbone)
        built_extras = extras is None
        self.extras = ssdlite_extras(channels[-1]) if built_extras else extras
        widths = [*channels, *(_out_channels(e) for e in self.extras)]
        self.anchor_specs = anchor_specs if anchor_specs is not None else ssd_anchor_specs(len(widths))
        if len(self.anchor_specs) != len(widths):
            raise UserError(f"anchor_specs: expected one entry per feature map ({len(widths)}), "
                            f"got {len(self.anchor_specs)}")
        self.num_classes, self.background = num_classes, background_class
        self.num_logits = num_classes + int(background_class)
        self.box_heads, self.cls_heads = heads if heads is not None else ssdlite_heads(
            widths, self.anchor_specs, self.num_logits)
        if built_extras:
            _init_extras(self.extras)
        if heads is None:
            _init_heads(self.box_heads, self.cls_heads)
        self.box_coder = det_utils.BoxCoder(weights=(10.0, 10.0, 5.0, 5.0))
        self.matcher = det_utils.SSDMatcher(match_iou)
        self.match_iou, self.score_thresh, self.nms_iou = match_iou, score_thresh, nms_iou
        self.detections_per_img, self.topk_candidates = detections_per_img, topk_candidates
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self._anchor_cache: dict = {}

    def settings(self) -> dict:
        """The keyword arguments that build a detector with this one's classes, anchors, matching and decoding."""
        return dict(num_classes=self.num_classes, background_class=self.background, anchor_specs=self.anchor_specs,
                    score_thresh=self.score_thresh, nms_iou=self.nms_iou, detections_per_img=self.detections_per_img,
                    topk_candidates=self.topk_candidates, focal_alpha=self.focal_alpha,
                    focal_gamma=self.focal_gamma, match_iou=self.match_iou)

    def head_keys(self) -> list[str]:
        """State-dict keys of the final 1x1 conv of each class head, whose size follows the classes
        (the box heads do not): left freshly initialised by `load_pretrained` for another class
        count, trained alone while the backbone is frozen."""
        keys = []
        for i, h in enumerate(self.cls_heads):
            name, conv = [(n, m) for n, m in h.named_modules() if isinstance(m, nn.Conv2d)][-1]
            keys += [f"cls_heads.{i}.{name}.{k}" for k in conv.state_dict()]
        return keys

    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's layer groups (layer-wise lr decay): the backbone's layers (the stem is layer 0),
        the extra layers, then the box and class heads together on top."""
        return dict(stem=r"^backbone\.stem", blocks=r"^backbone\." if coarse else r"^backbone\.layers\.(\d+)",
                    extras=r"^extras\." if coarse else r"^extras\.(\d+)")

    def run(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """One extra layer or head on a map (a supernet runs the slice of it that fits the map)."""
        return layer(x)

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The SSD feature maps: the backbone's (C4 and C5 for MobileDets), then the extra layers'."""
        feats = list(self.backbone(images))
        x = feats[-1]
        for layer in self.extras:
            x = self.run(layer, x)
            feats.append(x)
        return feats

    def head_outputs(self, images: torch.Tensor):
        """(box regression (N, A, 4), class logits (N, A, num_logits), feature-map sizes)."""
        feats = self.features(images)
        boxes = flatten_maps([self.run(h, f) for h, f in zip(self.box_heads, feats)], 4)
        logits = flatten_maps([self.run(h, f) for h, f in zip(self.cls_heads, feats)], self.num_logits)
        return boxes, logits, [tuple(f.shape[-2:]) for f in feats]

    def anchors(self, sizes, image_size, device) -> torch.Tensor:
        """Anchors for these feature-map sizes and input size (cached)."""
        key = (tuple(sizes), tuple(image_size), str(device))
        if key not in self._anchor_cache:
            self._anchor_cache[key] = grid_anchors(sizes, self.anchor_specs, image_size).to(device)
        return self._anchor_cache[key]

    def forward(self, images: torch.Tensor, targets: list[dict] | None = None):
        regression, logits, sizes = self.head_outputs(images)
        anchors = self.anchors(sizes, images.shape[-2:], images.device)
        if self.training:
            if targets is None:  # e.g. BatchNorm recalibration: raw outputs
                return {"bbox_regression": regression, "cls_logits": logits}
            return self.loss(regression, logits, anchors, targets)
        return self.postprocess(regression, logits, anchors, tuple(images.shape[-2:]))

    def loss(self, regression, logits, anchors, targets) -> dict[str, torch.Tensor]:
        """Focal classification + smooth-L1 box loss, normalised by the number of positives."""
        cls_targets, box_targets, positive = [], [], []
        for t in targets:
            boxes, labels = t["boxes"], t["labels"]
            target = torch.zeros(anchors.shape[0], self.num_logits, device=logits.device)
            if boxes.numel() == 0:
                matched = torch.full((anchors.shape[0],), -1, dtype=torch.long, device=anchors.device)
            else:
                matched = self.matcher(box_iou(boxes, anchors))
            pos = matched >= 0
            gt = matched[pos]
            target[pos, labels[gt] + int(self.background)] = 1.0  # background column stays 0
            cls_targets.append(target)
            box_targets.append(self.box_coder.encode_single(boxes[gt], anchors[pos]) if pos.any()
                               else regression.new_zeros(0, 4))
            positive.append(pos)
        positive = torch.stack(positive)
        num_pos = max(1, int(positive.sum()))
        cls = sigmoid_focal_loss(logits.float(), torch.stack(cls_targets), self.focal_alpha,
                                 self.focal_gamma, reduction="sum") / num_pos
        box = F.smooth_l1_loss(regression[positive].float(), torch.cat(box_targets), beta=1.0,
                               reduction="sum") / num_pos / 4  # normalize_loc_loss_by_codesize
        return {"classification": cls, "bbox_regression": box}

    @torch.no_grad()
    def postprocess(self, regression, logits, anchors, image_size) -> list[dict]:
        """Sigmoid scores, per-class NMS, top detections, boxes clipped to the input."""
        scores_all = logits.float().sigmoid()
        if self.background:
            scores_all = scores_all[..., 1:]
        out = []
        for reg, scores in zip(regression.float(), scores_all):
            # The best `topk_candidates` anchors of *each* class go to NMS, so no class can crowd
            # another out (TF runs NMS per class over every anchor; this caps the cost).
            k = min(self.topk_candidates, scores.shape[0])
            sc, a_idx = scores.topk(k, dim=0)  # (k, classes)
            labels = torch.arange(self.num_classes, device=sc.device).expand(k, -1)
            keep = sc > self.score_thresh
            sc, a_idx, labels = sc[keep], a_idx[keep], labels[keep]
            boxes = self.box_coder.decode_single(reg[a_idx], anchors[a_idx])
            boxes = clip_boxes_to_image(boxes, image_size)
            kept = batched_nms(boxes, sc, labels, self.nms_iou)[: self.detections_per_img]
            out.append({"boxes": boxes[kept], "scores": sc[kept], "labels": labels[kept]})
        return out


def _init_extras(extras: nn.Module) -> None:
    for m in extras.modules():
        if isinstance(m, nn.Conv2d):  # truncated normal 0.03 in the extra layers
            nn.init.trunc_normal_(m.weight, std=0.03, a=-0.06, b=0.06)


def _init_heads(box_heads: nn.ModuleList, cls_heads: nn.ModuleList) -> None:
    for m in [*box_heads.modules(), *cls_heads.modules()]:
        if isinstance(m, nn.Conv2d):  # random normal 0.03 in the box predictor
            nn.init.normal_(m.weight, std=0.03)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    for h in cls_heads:
        nn.init.constant_(h[-1].bias, -4.6)  # prior probability ~0.01 per class


def ssdlite_mobiledet(arch="cpu", num_classes: int = 90, multiplier: float = 1.0, padding: str = "same",
                      anchor_scales=(0.2, 0.95, 0.1), **kwargs) -> SSDLite:
    """SSDLite on a MobileDet backbone (C4, C5), configured as TF's object-detection API does."""
    specs = anchor_specs_from_scales(anchor_scales)
    return SSDLite(MobileDetBackbone(arch, multiplier=multiplier, padding=padding), num_classes,
                   anchor_specs=specs, **kwargs)


def ssdlite(backbone: str = "tiny_moat_0", num_classes: int = 90, backbone_args: dict | None = None,
            window_size=(None, None, 10, None), anchor_scales=(0.2, 0.95, 0.1), **kwargs) -> SSDLite:
    """SSDLite on the stride-16 and stride-32 maps of any registered `features_only` backbone, e.g.
    tiny-MOAT with window attention (`window_size` per stage: 10x10 windows at stride 16, global at
    stride 32 by default, i.e. 2x2 windows at 320 px; windows are padded where a map does not divide)."""
    from .registry import create_model
    args = {"window_size": window_size} if backbone.startswith(("moat", "tiny_moat")) else {}
    net = create_model(backbone, features_only=True, out_indices=(2, 3), **{**args, **(backbone_args or {})})
    return SSDLite(net, num_classes, anchor_specs=anchor_specs_from_scales(anchor_scales), **kwargs)


def _detector_factory(variant: str | None):
    def build(**kwargs) -> SSDLite:
        arch = kwargs.pop("arch", variant)
        if arch is None:
            raise ValueError("ssdlite_mobiledet needs arch=NAME_OR_JSON_PATH")
        kwargs.pop("features_only", None)
        return ssdlite_mobiledet(arch, **kwargs)
    return build


for _name in ARCHS:
    register(f"ssdlite_mobiledet_{_name}", "detect", _detector_factory(_name), (3, 320, 320), __name__)
register("ssdlite_mobiledet", "detect", _detector_factory(None), (3, 320, 320), __name__)
register("ssdlite", "detect", ssdlite, (3, 320, 320), __name__)
