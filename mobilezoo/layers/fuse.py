"""Inference-time fusion: BatchNorm folded into the adjacent convolution, activation fused into it.

`fuse_for_inference(model)` returns a copy of an eval-mode model in which
  * every conv -> BatchNorm2d [-> activation] sequence (`ConvNormAct`) becomes one `FusedConvAct`:
    the BN folded into the conv's weight and bias, the activation applied as a oneDNN post-op on
    CPU (one pass over the output instead of three);
  * a pre-norm BatchNorm2d followed by an unpadded 1x1 conv (MBConv's `pre_norm` + `expand`) is
    folded into that conv (exact: a per-channel affine map before a 1x1 conv is linear in it);
  * a squeeze-excite followed by a 1x1 conv (MBConv's `se` + `shrink`, MobileDet's SE + projection)
    becomes one `GatedConv1x1`: the per-sample channel gate scales the conv's weights instead of
    the activations, and the conv runs as one batched matmul (one pass over the tensor less).
With `fuse_act=False` only the BatchNorms are folded: every other module keeps its type and slot.
The result computes the same function (to float rounding, ~1e-6 relative) and is for inference only.
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

from .conv import Conv2dSame, same_padding
from .squeeze_excite import SqueezeExcite

# Activation module -> (oneDNN post-op name, scalars, algorithm) for mkldnn._convolution_pointwise.
_POST_OPS = {
    nn.ReLU: lambda m: ("relu", [], ""),
    nn.ReLU6: lambda m: ("hardtanh", [0.0, 6.0], ""),
    nn.SiLU: lambda m: ("swish", [], ""),
    nn.Hardswish: lambda m: ("hardswish", [], ""),
    nn.Sigmoid: lambda m: ("sigmoid", [], ""),
    nn.GELU: lambda m: ("gelu", [], m.approximate),
    nn.Identity: lambda m: ("none", [], ""),
}


def _has_pointwise_op() -> bool:
    return hasattr(torch.ops.mkldnn, "_convolution_pointwise") and torch.backends.mkldnn.is_available()


class FusedConvAct(nn.Module):
    """conv (BN already folded in) + activation; on CPU a single oneDNN convolution with a post-op."""

    def __init__(self, conv: nn.Conv2d, act: nn.Module):
        super().__init__()
        self.conv, self.act = conv, act
        self.post_op = _POST_OPS[type(act)](act)
        self._packed: dict = {}  # (dtype, input shape, weight version) -> weight in oneDNN's blocked layout

    def __getstate__(self):  # copies and pickles drop the prepacked weights (oneDNN tensors have no storage)
        return {**self.__dict__, "_packed": {}}

    def _weight_and_padding(self, x: torch.Tensor):
        conv = self.conv
        if not (isinstance(conv, Conv2dSame) and conv.dynamic):
            return x, conv.weight, list(conv.padding)
        return same_padding(x, conv.weight, conv.stride[0], conv.dilation[0], conv.pad_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or torch.is_grad_enabled() or not _has_pointwise_op():
            return self.act(self.conv(x))
        # oneDNN's fast kernels are NHWC; the output keeps the input's layout, so set it once here.
        x = x.contiguous(memory_format=torch.channels_last)
        x, w, padding = self._weight_and_padding(x)
        b = self.conv.bias
        if torch.is_autocast_enabled("cpu"):  # the oneDNN op has no autocast rule: cast as conv2d would
            dtype = torch.get_autocast_dtype("cpu")
            x, b = x.to(dtype), None if b is None else b.to(dtype)
        stride, dilation, groups = list(self.conv.stride), list(self.conv.dilation), self.conv.groups
        weight = self.conv.weight  # an inference-mode copy has no version counter (and cannot change)
        key = (x.dtype, tuple(x.shape), 0 if weight.is_inference() else weight._version)
        if key not in self._packed:  # reordering the weight on every call costs up to 1/3 of the conv
            if len(self._packed) >= 4:
                self._packed.clear()
            self._packed[key] = torch._C._nn.mkldnn_reorder_conv2d_weight(
                w.to(x.dtype).to_mkldnn(), padding, stride, dilation, groups, list(x.shape))
        name, scalars, algorithm = self.post_op
        return torch.ops.mkldnn._convolution_pointwise(
            x, self._packed[key], b, padding, stride, dilation, groups, name, scalars, algorithm)


class GatedConv1x1(nn.Module):
    """SqueezeExcite then an unpadded, ungrouped, stride-1 1x1 conv [+ activation], as
    `act(bmm(x, (W * gate)^T) + b)` over the (N, H*W, C) view of a channels-last input."""

    def __init__(self, se: SqueezeExcite, fused: "FusedConvAct"):
        super().__init__()
        self.se, self.conv, self.act = se, fused.conv, fused.act

    @staticmethod
    def applies(se: nn.Module, nxt: nn.Module) -> bool:
        if type(se) is not SqueezeExcite or se.dims != 2 or not isinstance(nxt, FusedConvAct):
            return False
        c = nxt.conv
        return c.kernel_size == (1, 1) and c.stride == (1, 1) and c.groups == 1 and not any(c.padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        se = self.se
        n, c, h, w = x.shape
        gate = se.excite(se.pool(x))
        weight = gate.view(n, 1, c) * self.conv.weight.view(1, -1, c)  # (N, C_out, C_in)
        tokens = x.permute(0, 2, 3, 1).reshape(n, h * w, c)  # a view when x is channels-last
        bias = self.conv.bias
        out = (torch.bmm(tokens, weight.transpose(1, 2)) if bias is None
               else torch.baddbmm(bias.to(tokens.dtype), tokens, weight.transpose(1, 2)))
        return self.act(out.view(n, h, w, -1).permute(0, 3, 1, 2))


def _fuse_gates(module: nn.Module) -> None:
    """SqueezeExcite followed by a fused 1x1 conv, in a Sequential or as `se` + `shrink`."""
    if isinstance(module, nn.Sequential):
        for i in range(len(module) - 1):
            nxt = module[i + 1]
            first = nxt[0] if isinstance(nxt, nn.Sequential) and len(nxt) else nxt
            if GatedConv1x1.applies(module[i], first) and (
                    first is nxt or all(isinstance(m, nn.Identity) for m in list(nxt)[1:])):
                module[i], module[i + 1] = nn.Identity(), GatedConv1x1(module[i], first)
    se, shrink = getattr(module, "se", None), getattr(module, "shrink", None)
    if se is not None and GatedConv1x1.applies(se, shrink):
        module.se, module.shrink = nn.Identity(), GatedConv1x1(se, shrink)


def _bn_scale_shift(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    scale = bn.running_var.add(bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale, shift


def _with_bias(conv: nn.Conv2d) -> nn.Conv2d:
    if conv.bias is None:
        conv.bias = nn.Parameter(torch.zeros(conv.out_channels, dtype=conv.weight.dtype,
                                             device=conv.weight.device))
    return conv


@torch.no_grad()
def fold_bn_after(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """conv then bn -> one conv (modified in place and returned)."""
    scale, shift = _bn_scale_shift(bn)
    conv = _with_bias(conv)
    conv.weight.mul_(scale.view(-1, 1, 1, 1))
    conv.bias.mul_(scale).add_(shift)
    return conv


@torch.no_grad()
def fold_bn_before(bn: nn.BatchNorm2d, conv: nn.Conv2d) -> nn.Conv2d:
    """bn then an unpadded, ungrouped 1x1 conv -> one conv (modified in place and returned)."""
    if conv.kernel_size != (1, 1) or conv.groups != 1 or any(conv.padding):
        raise ValueError("only a 1x1 ungrouped conv without padding can absorb a preceding BatchNorm")
    scale, shift = _bn_scale_shift(bn)
    conv = _with_bias(conv)
    conv.bias.add_(conv.weight[:, :, 0, 0] @ shift)
    conv.weight.mul_(scale.view(1, -1, 1, 1))
    return conv


_CONVS = (nn.Conv2d, Conv2dSame)


def _fuse_sequence(seq: nn.Sequential, fuse_act: bool) -> None:
    """Fold each conv -> BatchNorm2d [-> activation] run in `seq`, in place; with `fuse_act` the
    conv and activation become one FusedConvAct.

    Folded slots become Identity, so code that indexes or slices the Sequential (e.g.
    `glo_conv[:3]`) still finds the same layers at the same positions."""
    i = 0
    while i + 1 < len(seq):
        conv, bn = seq[i], seq[i + 1]
        if not (type(conv) in _CONVS and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats):
            i += 1
            continue
        has_act = i + 2 < len(seq) and type(seq[i + 2]) in _POST_OPS
        fold_bn_after(conv, bn)
        seq[i + 1] = nn.Identity()
        if fuse_act:
            seq[i] = FusedConvAct(conv, seq[i + 2] if has_act else nn.Identity())
            if has_act:
                seq[i + 2] = nn.Identity()
        i += 2 + has_act


def _fuse_named(module: nn.Module, fuse_act: bool) -> None:
    """Fold the (conv, bn, act-or-None) attribute triples a module lists in `fusable` (ResNet-style code)."""
    for conv_name, bn_name, act_name in getattr(module, "fusable", ()):
        conv, bn = getattr(module, conv_name), getattr(module, bn_name)
        if not (isinstance(bn, nn.BatchNorm2d) and type(conv) in _CONVS):
            continue
        fold_bn_after(conv, bn)
        setattr(module, bn_name, nn.Identity())
        if fuse_act:
            setattr(module, conv_name, FusedConvAct(conv, getattr(module, act_name) if act_name else nn.Identity()))
            if act_name:
                setattr(module, act_name, nn.Identity())


def _conv_of(m: nn.Module | None) -> nn.Conv2d | None:
    if isinstance(m, FusedConvAct):
        return m.conv
    return m if type(m) in _CONVS else None


def _fuse_pre_norm(module: nn.Module) -> None:
    """A pre-norm block (MBConv): BN -> unpadded 1x1 conv absorbs the BN."""
    pre, expand = getattr(module, "pre_norm", None), getattr(module, "expand", None)
    conv = _conv_of(expand[0] if isinstance(expand, nn.Sequential) else expand)
    if isinstance(pre, nn.BatchNorm2d) and conv is not None and conv.kernel_size == (1, 1) \
            and conv.groups == 1 and not any(conv.padding):
        fold_bn_before(pre, conv)
        module.pre_norm = nn.Identity()


def _fuse_children(module: nn.Module, fuse_act: bool) -> None:
    if isinstance(module, nn.Sequential):
        _fuse_sequence(module, fuse_act)
    _fuse_named(module, fuse_act)
    for name, child in module.named_children():
        if type(child) in _CONVS:
            if fuse_act:  # a lone conv still gains prepacked weights
                setattr(module, name, FusedConvAct(child, nn.Identity()))
        elif not isinstance(child, FusedConvAct):
            _fuse_children(child, fuse_act)
    _fuse_pre_norm(module)
    if fuse_act:
        _fuse_gates(module)


def fuse_for_inference(model: nn.Module, fuse_act: bool = True) -> nn.Module:
    """An eval-mode copy of `model` with BatchNorms folded into its convs (inference only).

    With `fuse_act` (the default) convs and their activations, and squeeze-excite gates and their
    1x1 convs, also run as one op each (`FusedConvAct`, `GatedConv1x1`: CPU speed); without it
    every module keeps its plain PyTorch type and slot, which is what an exporter can trace."""
    model = copy.deepcopy(model).eval()
    _fuse_children(model, fuse_act)
    return model


def replace_modules(model: nn.Module, replace: Callable[[nn.Module], nn.Module | None]) -> nn.Module:
    """Swap, in place, every submodule for which `replace(module)` returns a new module; returns `model`.

    Children are visited before their parent is asked, and a replacement is not visited again."""
    for name, child in model.named_children():
        new = replace(child)
        if new is not None:
            setattr(model, name, new)
        else:
            replace_modules(child, replace)
    return model
