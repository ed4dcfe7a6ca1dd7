"""One-shot supernet over a SearchSpace with TuNAS-style weight sharing.

Every layer position holds one `MobileBlock` per op *family* (ibn, fused, tucker, ibn_noexp), built
at its largest configuration: widest input and output, expansion 8, kernel 5, Tucker ratios 0.75.
An architecture of the space runs the matching family at each position on *slices* of those
tensors (`MobileBlock.sliced`):

* channels: the first C filters/channels (output width, input width, expansion 4 = the first half
  of expansion 8, Tucker ranks, SE width), so every choice shares the leading filters;
* kernels: a 3x3 kernel is the centre of the 5x5 one (TuNAS / once-for-all sharing);
* BatchNorm: the first C entries of gamma, beta and the running statistics;
* skip: the position is left out (a residual position, so the block's width is unchanged).

Different families do not share weights with each other (their tensors differ in kind). The
supernet is an `SSDLite` whose backbone is the `SuperBackbone`: the detection tail (extra layers,
heads, anchors, loss, post-processing) is the standalone detector's, built for the widest C4/C5,
and runs the slice of its first extra layer and C4/C5 heads that fits the sub-network's widths.
`export_state_dict` copies the slices into the state dict of the standalone SSDLite of the same
architecture, which then computes the same function as `forward(..., choices)`.
"""
from __future__ import annotations

import torch
from torch import nn

from ..layers import ConvNormAct
from ..layers.conv import center_slice, run_sliced
from ..layers.factories import get_act, get_norm
from ..layers.ibn import MobileBlock
from ..models.mobiledet import MobileDetBackbone, init_tf_he_normal
from ..models.ssdlite import SSDLite
from .space import OPS, SearchSpace, get_space, layer_plan, to_arch

FAMILY_MAX = {"ibn": dict(kernel=5, expansion=8), "fused": dict(kernel=5, expansion=8),
              "tucker": dict(kernel=3, ratios=(0.75, 0.75)), "ibn_noexp": dict(kernel=5)}
SLICE_ARGS = ("kernel", "expansion", "ratios")  # the op fields that `MobileBlock.sliced` takes


class SuperBackbone(nn.Module):
    """Stem + one widest block per op family at each position; returns [C4, C5] of the active sub-network."""

    def __init__(self, space: SearchSpace, padding: str = "same"):
        super().__init__()
        self.space, self.padding = space, padding
        act = get_act(space.act)
        norm = get_norm("batch", eps=0.01, momentum=0.01)
        widest = [space.max_width(b) for b in range(len(space.skeleton))]
        self.stem = ConvNormAct(3, widest[0], 3, space.skeleton[0].stride, norm=norm, act=act, padding=padding)
        layers, c_in = [], widest[0]
        for b, block in enumerate(space.skeleton[1:], start=1):
            for j in range(block.layers):
                families = {OPS[o]["type"] for o in space.layer_ops(b, j) if o != "skip"}
                stride = block.stride if j == 0 else 1
                layers.append(nn.ModuleDict({
                    f: MobileBlock(f, c_in, widest[b], stride=stride, residual=False, act=act, norm=norm,
                                   se=space.se and f != "tucker", padding=padding, **FAMILY_MAX[f])
                    for f in sorted(families)}))
                c_in = widest[b]
        self.layers = nn.ModuleList(layers)
        self.apply(init_tf_he_normal)
        self.update_stats = True
        self.activate(self.widest_choices())
        c4, c5 = self._endpoints()
        self.feature_info = [dict(num_chs=c4, reduction=16, module="layers"),
                             dict(num_chs=c5, reduction=32, module="layers")]

    def widest_choices(self) -> list[int]:
        """A choice vector with the widest multiplier of every block (the widths the tail is built for)."""
        return [max(range(len(d.options)), key=lambda i: d.options[i]) if d.position < 0 else 0
                for d in self.space.decisions]

    def activate(self, choices) -> None:
        """Make `choices` the sub-network that `forward` runs (once-for-all's `set_active_subnet`)."""
        self.plan = layer_plan(self.space, choices)

    def _endpoints(self) -> tuple[int, int]:
        stride, c4 = 1, None
        for p in self.plan:
            stride *= p["stride"]
            if stride == 16:
                c4 = p["out"]
        return c4, self.plan[-1]["out"]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        plan, update = self.plan, self.update_stats
        x = self.stem.sliced(x, plan[0]["out"], update_stats=update)
        c4, stride = None, self.space.skeleton[0].stride
        for p, blocks in zip(plan[1:], self.layers):
            stride *= p["stride"]
            if p["op"] != "skip":
                op = OPS[p["op"]]
                x = blocks[op["type"]].sliced(x, p["out"], residual=p["residual"], update_stats=update,
                                              **{k: op[k] for k in SLICE_ARGS if k in op})
            if stride == 16:
                c4 = x
        return [c4, x]


def _legacy_keys(state_dict, prefix, *_) -> None:
    # Supernets saved before the backbone was a module of its own held `stem.`, `layers.` and `det.`.
    for key in [k for k in state_dict if k.startswith(prefix)]:
        rest = key[len(prefix):]
        if rest.startswith(("stem.", "layers.")):
            state_dict[prefix + "backbone." + rest] = state_dict.pop(key)
        elif rest.startswith("det."):
            state_dict[prefix + rest[len("det."):]] = state_dict.pop(key)


class SuperDetector(SSDLite):
    """SSDLite supernet: `forward(images, targets, choices)` runs the sub-network of a choice vector."""

    def __init__(self, space="ibn_fused_tucker", num_classes: int = 90, padding: str = "same", **ssd_kwargs):
        space = get_space(space)
        super().__init__(SuperBackbone(space, padding), num_classes, **ssd_kwargs)
        self.space, self.padding = space, padding
        self._register_load_state_dict_pre_hook(_legacy_keys)

    @property
    def update_stats(self) -> bool:
        """Whether train-mode BatchNorm moves the running statistics (off for the search's held-out pass)."""
        return self.backbone.update_stats

    @update_stats.setter
    def update_stats(self, value: bool) -> None:
        self.backbone.update_stats = value

    def run(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return run_sliced(layer, x, self.update_stats)

    def head_outputs(self, images: torch.Tensor, choices=None):
        """(box regression, class logits, feature-map sizes) of the sub-network of `choices`."""
        if choices is not None:
            self.backbone.activate(choices)
        return super().head_outputs(images)

    def forward(self, images: torch.Tensor, targets: list[dict] | None = None, choices=None):
        """Loss dict in train mode with targets, raw outputs without, detections in eval mode."""
        if choices is None:
            raise ValueError("SuperDetector.forward needs choices (a choice vector of its space)")
        self.backbone.activate(choices)
        return super().forward(images, targets)

    # --- export -----------------------------------------------------------------------------------

    def _source_key(self, key: str, plan: list[dict]) -> str:
        if not key.startswith("backbone."):
            return key  # the tail: same layout, sliced
        parts = key.split(".")  # backbone.layers.<j>.<rest>
        j, rest = int(parts[2]), ".".join(parts[3:])
        if j == 0:
            return "backbone.stem." + rest
        pos = [i for i, p in enumerate(plan) if p["op"] != "skip"][j]
        return f"backbone.layers.{pos - 1}.{OPS[plan[pos]['op']]['type']}.{rest}"

    def export_state_dict(self, choices) -> dict[str, torch.Tensor]:
        """The inherited weights in the key layout of `standalone(choices)`."""
        plan = layer_plan(self.space, choices)
        target = self.standalone(choices, init=False).state_dict()
        source = self.state_dict()
        return {k: center_slice(source[self._source_key(k, plan)], v.shape).detach().clone()
                for k, v in target.items()}

    def standalone(self, choices, init: bool = True) -> SSDLite:
        """The standalone SSDLite of a choice vector, with the inherited weights when `init`."""
        model = SSDLite(MobileDetBackbone(to_arch(self.space, choices), padding=self.padding), **self.settings())
        if init:
            model.load_state_dict(self.export_state_dict(choices))
        return model


def export_weights(supernet: SuperDetector, choices) -> dict[str, torch.Tensor]:
    """Inherited weights of a sub-network, ready for `SSDLite(...).load_state_dict` of `to_arch(space, choices)`."""
    return supernet.export_state_dict(choices)
