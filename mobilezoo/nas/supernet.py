"""One-shot supernet over a SearchSpace with TuNAS-style weight sharing.

Every layer position holds one block per op *family* (ibn, fused, tucker, ibn_noexp), built at its
largest configuration: widest input and output, expansion 8, kernel 5, Tucker ratios 0.75. An
architecture of the space runs the matching family at each position on *slices* of those tensors:

* channels: the first C filters/channels (output width, input width, expansion 4 = the first half
  of expansion 8, Tucker ranks, SE width), so every choice shares the leading filters;
* kernels: a 3x3 kernel is the centre of the 5x5 one (TuNAS / once-for-all sharing);
* BatchNorm: the first C entries of gamma, beta and the running statistics;
* skip: the position is left out (a residual position, so the block's width is unchanged).

Different families do not share weights with each other (their tensors differ in kind). The
detection tail (extra layers, box and class heads, anchors, loss, post-processing) is the
standalone SSDLite's, at the widest C4/C5, with the C4/C5 heads and the first extra layer sliced.
`export_state_dict` copies the slices into the state dict of the standalone `SSDLite` of the same
architecture, which then computes the same function as `forward(..., choices)`.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import ConvNormAct
from ..layers.conv import tf_same_pad
from ..layers.ibn import MobileBlock, scale_filters
from ..models.mobiledet import ACTIVATIONS, _init_backbone
from ..models.ssdlite import SSDLite, _flatten
from .space import OPS, SearchSpace, get_space, layer_plan, to_arch

FAMILY_MAX = {"ibn": dict(kernel=5, expansion=8), "fused": dict(kernel=5, expansion=8),
              "tucker": dict(kernel=3, ratios=(0.75, 0.75)), "ibn_noexp": dict(kernel=5)}


def _conv(x: torch.Tensor, w: torch.Tensor, b, stride: int, groups: int, padding: str) -> torch.Tensor:
    """A conv with TF 'same' (as Conv2dSame) or symmetric padding, on explicit weights."""
    k = w.shape[-1]
    if padding == "symmetric" or (stride == 1 and k % 2 == 1):
        return F.conv2d(x, w, b, stride, (k - 1) // 2, 1, groups)
    ph, pw = tf_same_pad(x.shape[-2], k, stride), tf_same_pad(x.shape[-1], k, stride)
    return F.conv2d(F.pad(x, (pw[0], pw[1], ph[0], ph[1])), w, b, stride, 0, 1, groups)


def center(t: torch.Tensor, shape) -> torch.Tensor:
    """The slice of a shared tensor that a smaller one inherits: leading entries, centred kernels."""
    if t.dim() == 0:
        return t
    index = []
    for d, (have, want) in enumerate(zip(t.shape, shape)):
        if want > have:
            raise ValueError(f"cannot take {tuple(shape)} from a shared tensor of shape {tuple(t.shape)}")
        off = (have - want) // 2 if (t.dim() == 4 and d >= 2) else 0
        index.append(slice(off, off + want))
    return t[tuple(index)]


class SuperDetector(nn.Module):
    """SSDLite supernet: `forward(images, targets, choices)` runs the sub-network of a choice vector."""

    def __init__(self, space="ibn_fused_tucker", num_classes: int = 90, padding: str = "same", **ssd_kwargs):
        super().__init__()
        self.space: SearchSpace = get_space(space)
        self.padding, self.update_stats = padding, True
        act = ACTIVATIONS[self.space.act]
        norm = partial(nn.BatchNorm2d, eps=0.01, momentum=0.01)
        widest = [self.space.max_width(b) for b in range(len(self.space.skeleton))]
        self.stem = ConvNormAct(3, widest[0], 3, self.space.skeleton[0].stride, norm=norm, act=act,
                                padding=padding)
        layers, c_in = [], widest[0]
        for b, block in enumerate(self.space.skeleton[1:], start=1):
            for j in range(block.layers):
                families = {OPS[o]["type"] for o in self.space.layer_ops(b, j) if o != "skip"}
                stride = block.stride if j == 0 else 1
                layers.append(nn.ModuleDict({
                    f: MobileBlock(f, c_in, widest[b], stride=stride, residual=False, act=act, norm=norm,
                                   se=self.space.se and f != "tucker", padding=padding, **FAMILY_MAX[f])
                    for f in sorted(families)}))
                c_in = widest[b]
        self.layers = nn.ModuleList(layers)
        self.apply(_init_backbone)
        # The tail of the standalone detector at the widest C4/C5 (its backbone is not used).
        self.det = SSDLite(self._max_arch(), num_classes=num_classes, padding=padding, **ssd_kwargs)
        del self.det.backbone

    def _max_arch(self) -> list[dict]:
        # Widest multiplier everywhere (the tail only depends on the C4/C5 widths).
        choices = [max(range(len(d.options)), key=lambda i: d.options[i]) if d.position < 0 else 0
                   for d in self.space.decisions]
        return to_arch(self.space, choices)

    # --- sliced building blocks -------------------------------------------------------------------

    def _bn(self, bn: nn.BatchNorm2d, y: torch.Tensor) -> torch.Tensor:
        c = y.shape[1]
        if bn.training:
            # Batch statistics in training; the held-out pass of the search does not touch the
            # running statistics (update_stats False).
            rm, rv = (bn.running_mean[:c], bn.running_var[:c]) if self.update_stats else (None, None)
            return F.batch_norm(y, rm, rv, bn.weight[:c], bn.bias[:c], True, bn.momentum, bn.eps)
        return F.batch_norm(y, bn.running_mean[:c], bn.running_var[:c], bn.weight[:c], bn.bias[:c],
                            False, 0.0, bn.eps)

    def _cna(self, m: nn.Sequential, x: torch.Tensor, out: int | None = None, kernel: int | None = None,
             depthwise: bool = False) -> torch.Tensor:
        """A ConvNormAct on the slice of its weights for x's width, `out` outputs and `kernel`."""
        conv, cin = m[0], x.shape[1]
        depthwise = depthwise or conv.groups > 1
        if depthwise:
            out = cin
        out = conv.out_channels if out is None else out
        k = conv.kernel_size[0] if kernel is None else kernel
        w = center(conv.weight, (out, 1 if depthwise else cin, k, k))
        b = None if conv.bias is None else conv.bias[:out]
        y = _conv(x, w, b, conv.stride[0], cin if depthwise else 1, self.padding)
        for mod in list(m)[1:]:
            y = self._bn(mod, y) if isinstance(mod, nn.BatchNorm2d) else mod(y)
        return y

    def _se(self, se, h: torch.Tensor) -> torch.Tensor:
        c = h.shape[1]
        r = scale_filters(c, 0.25)
        s = F.avg_pool2d(h, h.shape[-2:])
        s = se.act(F.conv2d(s, se.reduce.weight[:r, :c], se.reduce.bias[:r]))
        return h * se.gate(F.conv2d(s, se.expand.weight[:c, :r], se.expand.bias[:c]))

    def _block(self, block: MobileBlock, spec: dict, x: torch.Tensor, out: int, residual: bool) -> torch.Tensor:
        body, cin, kind, k = block.body, x.shape[1], spec["type"], spec["kernel"]
        if kind == "ibn_noexp":
            h, i = self._cna(body[0], x, kernel=k, depthwise=True), 1
        elif kind == "ibn":
            h = self._cna(body[0], x, int(cin * spec["expansion"]))
            h, i = self._cna(body[1], h, kernel=k, depthwise=True), 2
        elif kind == "fused":
            h, i = self._cna(body[0], x, int(cin * spec["expansion"]), kernel=k), 1
        else:  # tucker
            r_in, r_out = scale_filters(cin, spec["ratios"][0]), scale_filters(out, spec["ratios"][1])
            h = self._cna(body[0], x, r_in)
            h, i = self._cna(body[1], h, r_out, kernel=k), 2
        if self.space.se and kind != "tucker":
            h, i = self._se(body[i], h), i + 1
        y = self._cna(body[i], h, out)
        return x + y if residual else y

    # --- forward ----------------------------------------------------------------------------------

    def backbone(self, x: torch.Tensor, choices) -> list[torch.Tensor]:
        """[C4, C5] of the sub-network of `choices`."""
        plan = layer_plan(self.space, choices)
        x = self._cna(self.stem, x, plan[0]["out"])
        c4, stride = None, self.space.skeleton[0].stride
        for p, layers in zip(plan[1:], self.layers):
            stride *= p["stride"]
            if p["op"] != "skip":
                x = self._block(layers[OPS[p["op"]]["type"]], OPS[p["op"]], x, p["out"], p["residual"])
            if stride == 16:
                c4 = x
        return [c4, x]

    def _seq(self, seq: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        for m in seq:
            x = self._cna(m, x) if isinstance(m, ConvNormAct) else m(x)
        return x

    def _head(self, h: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        y = self._cna(h[0], x, depthwise=True)
        return F.conv2d(y, h[1].weight[:, : x.shape[1]], h[1].bias)

    def head_outputs(self, images: torch.Tensor, choices):
        """(box regression, class logits, feature-map sizes), as `SSDLite.head_outputs`."""
        feats = self.backbone(images, choices)
        x = feats[-1]
        for layer in self.det.extras:
            x = self._seq(layer, x)
            feats.append(x)
        boxes = _flatten([self._head(h, f) for h, f in zip(self.det.box_heads, feats)], 4)
        logits = _flatten([self._head(h, f) for h, f in zip(self.det.cls_heads, feats)], self.det.num_logits)
        return boxes, logits, [tuple(f.shape[-2:]) for f in feats]

    def forward(self, images: torch.Tensor, targets: list[dict] | None = None, choices=None):
        """Loss dict in train mode with targets, raw outputs without, detections in eval mode."""
        if choices is None:
            raise ValueError("SuperDetector.forward needs choices (a choice vector of its space)")
        regression, logits, sizes = self.head_outputs(images, choices)
        anchors = self.det.anchors(sizes, images.shape[-2:], images.device)
        if self.training:
            if targets is None:
                return {"bbox_regression": regression, "cls_logits": logits}
            return self.det.loss(regression, logits, anchors, targets)
        return self.det.postprocess(regression, logits, anchors, tuple(images.shape[-2:]))

    # --- export -----------------------------------------------------------------------------------

    def _source_key(self, key: str, plan: list[dict]) -> str:
        if not key.startswith("backbone."):
            return "det." + key
        parts = key.split(".")  # backbone.layers.<j>.<rest>
        j, rest = int(parts[2]), ".".join(parts[3:])
        if j == 0:
            return "stem." + rest
        positions = [i for i, p in enumerate(plan) if p["op"] != "skip"]
        pos = positions[j]
        family = OPS[plan[pos]["op"]]["type"]
        return f"layers.{pos - 1}.{family}.{rest}"

    def export_state_dict(self, choices) -> dict[str, torch.Tensor]:
        """The inherited weights in the key layout of `standalone(choices)`."""
        plan = layer_plan(self.space, choices)
        target = self.standalone(choices, init=False).state_dict()
        source = self.state_dict()
        return {k: center(source[self._source_key(k, plan)], v.shape).detach().clone() for k, v in target.items()}

    def standalone(self, choices, init: bool = True) -> SSDLite:
        """The standalone SSDLite of a choice vector, with the inherited weights when `init`."""
        det = self.det
        model = SSDLite(to_arch(self.space, choices), num_classes=det.num_classes, background_class=det.background,
                        score_thresh=det.score_thresh, nms_iou=det.nms_iou,
                        detections_per_img=det.detections_per_img, topk_candidates=det.topk_candidates,
                        focal_alpha=det.focal_alpha, focal_gamma=det.focal_gamma, padding=self.padding)
        if init:
            model.load_state_dict(self.export_state_dict(choices))
        return model


def export_weights(supernet: SuperDetector, choices) -> dict[str, torch.Tensor]:
    """Inherited weights of a sub-network, ready for `SSDLite(to_arch(space, choices)).load_state_dict`."""
    return supernet.export_state_dict(choices)
