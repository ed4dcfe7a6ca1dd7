"""DeepLabv3+ (Chen et al., ECCV 2018) on any registered `features_only` backbone, by default tiny-MOAT-0.

backbone -> deepest map (stride 16 or 32) -> ASPP (torchvision's: 1x1, three 3x3 atrous convs,
image pooling, each 256 + BN + ReLU, concatenated, projected to 256, dropout 0.1) -> bilinear up to
stride 4 -> concat with the stride-4 map projected to 48 -> two 3x3 convs 256 + BN + ReLU -> 1x1
classifier -> bilinear up to the input. The atrous rates are the paper's (6, 12, 18) at output
stride 16, scaled to the deepest map's stride: (3, 6, 9) at MOAT's stride 32 (the same receptive
field in pixels). Eval and train mode both return logits (N, classes, H, W).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.segmentation.deeplabv3 import ASPP

from ..errors import UserError
from ..layers import ConvNormAct
from .registry import register

PAPER_RATES = (6, 12, 18)  # at output stride 16


def scaled_rates(stride: int, rates=PAPER_RATES) -> tuple[int, ...]:
    """The paper's atrous rates (given at output stride 16) for a map of another stride, at least 1."""
    return tuple(max(1, round(r * 16 / stride)) for r in rates)


def returned_maps(backbone: nn.Module) -> list[dict]:
    """`feature_info` entries of the maps `backbone(x)` returns, in order (timm's `out_indices`)."""
    info = backbone.feature_info
    return [info[i] for i in getattr(backbone, "out_indices", range(len(info)))]


def separable_conv(in_ch: int, out_ch: int, kernel_size: int = 3) -> nn.Sequential:
    """Depthwise kxk + BN + ReLU, then 1x1 + BN + ReLU: the paper's decoder conv (about 1/9 of the MACs)."""
    return nn.Sequential(ConvNormAct(in_ch, in_ch, kernel_size, groups=in_ch), ConvNormAct(in_ch, out_ch, 1))


class DeepLabV3Plus(nn.Module):
    """DeepLabv3+ over a backbone that returns a list of maps described by `feature_info`: the
    stride-4 map feeds the decoder, the deepest map the ASPP. The decoder's 3x3 convs are full
    convs (torchvision's habit) or, with `separable`, depthwise-separable ones (the paper's)."""

    def __init__(self, backbone: nn.Module, num_classes: int = 150, *, atrous_rates=None,
                 aspp_channels: int = 256, low_level_channels: int = 48, decoder_channels: int = 256,
                 dropout: float = 0.1, separable: bool = False):
        super().__init__()
        maps = returned_maps(backbone)
        strides = [m["reduction"] for m in maps]
        if 4 not in strides:
            raise UserError(f"{type(backbone).__name__} gives feature maps at strides "
                            f"{', '.join(map(str, strides))}; DeepLabv3+ needs a stride-4 map for its decoder")
        self.backbone, self.num_classes = backbone, num_classes
        self.low_index, deep = strides.index(4), maps[-1]
        self.output_stride = deep["reduction"]
        self.atrous_rates = tuple(atrous_rates) if atrous_rates is not None else scaled_rates(self.output_stride)
        self.aspp = ASPP(deep["num_chs"], self.atrous_rates, aspp_channels)
        self.aspp.project[-1] = nn.Dropout(dropout)  # torchvision hard-codes 0.5; DeepLab's own code 0.1
        self.low_level = ConvNormAct(maps[self.low_index]["num_chs"], low_level_channels, 1)
        conv = separable_conv if separable else ConvNormAct
        self.decoder = nn.Sequential(conv(aspp_channels + low_level_channels, decoder_channels, 3),
                                     conv(decoder_channels, decoder_channels, 3))
        self.classifier = nn.Conv2d(decoder_channels, num_classes, 1)
        for m in [*self.aspp.modules(), *self.low_level.modules(), *self.decoder.modules()]:
            if isinstance(m, nn.Conv2d):  # torchvision's segmentation heads: He init
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def head_keys(self) -> list[str]:
        """State-dict keys of the classifier, whose size follows the classes (fine-tuning resets them)."""
        return [f"classifier.{k}" for k in self.classifier.state_dict()]

    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's layer groups (layer-wise lr decay): the backbone's stem and stages, then the ASPP and
        decoder together with the classifier on top."""
        return dict(stem=r"^backbone\.stem", blocks=r"^backbone\." if coarse else r"^backbone\.stages\.(\d+)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.backbone(x)
        low = feats[self.low_index]
        y = self.aspp(feats[-1])
        y = F.interpolate(y, size=low.shape[-2:], mode="bilinear", align_corners=False)
        y = self.decoder(torch.cat([y, self.low_level(low)], 1))
        return F.interpolate(self.classifier(y), size=x.shape[-2:], mode="bilinear", align_corners=False)


def deeplabv3plus(backbone: str = "tiny_moat_0", num_classes: int = 150, backbone_args: dict | None = None,
                  window_size=None, **kwargs) -> DeepLabV3Plus:
    """DeepLabv3+ on the stride-4 and deepest maps of a registered `features_only` backbone (tiny-MOAT,
    MOAT, the MobileDet backbones `mobiledet_cpu` etc.); a MOAT
    backbone takes `window_size` per stage (default global attention in stages 3 and 4, MOAT's
    ADE20K setting; windows are padded where a map does not divide)."""
    from .registry import create_model
    kwargs.pop("features_only", None)
    args = {"window_size": window_size} if backbone.startswith(("moat", "tiny_moat")) else {}
    if window_size is not None and not args:
        raise UserError(f"window_size: {backbone} has no window attention (a MOAT option)")
    args = {**args, **(backbone_args or {})}
    net = create_model(backbone, features_only=True, **args)
    info = net.feature_info
    stride4 = [i for i, f in enumerate(info) if f["reduction"] == 4]
    if "out_indices" not in args and stride4 and 4 not in [m["reduction"] for m in returned_maps(net)]:
        # e.g. a MobileDet backbone, which returns SSDLite's strides 16 and 32 unless asked for others
        net = create_model(backbone, features_only=True, **args, out_indices=(stride4[-1], len(info) - 1))
    return DeepLabV3Plus(net, num_classes, **kwargs)


register("deeplabv3plus", "segment", deeplabv3plus, (3, 512, 512), __name__)
