"""Quantization-aware training: the model computes, while it trains, what its full-integer LiteRT file will.

`FakeQuantizer(model)` makes an eager model round its tensors the way `export --tflite --int8`
(ai-edge-quantizer's `static_wi8_ai8`) computes them, so that fine-tuning adapts the weights to it:

  * weights of every Conv2d / Linear: int8, symmetric per output channel ([-127, 127], scale
    max|w| / 127). Quantizing the unfolded conv weight per channel is quantizing the BN-folded one
    (folding scales each output channel; the bias is int32 and nearly exact);
  * activations: int8, asymmetric per tensor (range widened to include 0, 255 steps), from a moving
    average (momentum 0.01) of each sample's min and max (tighter than the export's min/max over
    its calibration samples: the weights learn to fit ranges the file then contains), at the
    tensors the file holds in int8: the model input; each conv's output after its BatchNorm, or
    after the ReLU / ReLU6 the converter fuses into it; each other activation's output (hard-swish,
    GELU, SiLU; a sigmoid at LiteRT's fixed 1/256 scale); LayerNorm outputs; squeeze-excite's
    pooled input (at the scale of its input, as AVERAGE_POOL_2D keeps) and output (the gating
    MUL); residual-add outputs; and a detector's head maps and their concatenations (the file's outputs).

The rounding has `torch.fake_quantize_*`'s straight-through gradient (zero where clamped). Everything
is per-instance hooks and forward overrides: the model's state_dict keys, and so its
`model.safetensors`, stay those of the plain model; the observed ranges travel in the trainer state
(`state_dict`). Not simulated: ops inside modules that are not modules themselves (attention's
matmuls and softmax, MOAT's LayerNorm decomposition, average-pooled shortcuts) and the int32 bias
rounding; MOAT's pre-norm BatchNorm, folded into the next conv's input channels, is simulated
before folding.
"""
from __future__ import annotations

import functools
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..layers.ibn import MobileBlock
from ..layers.mbconv import MBConv
from ..layers.squeeze_excite import SqueezeExcite
from ..models.moat import MoatBlock

_BN = nn.modules.batchnorm._BatchNorm
_FUSED = (nn.ReLU, nn.ReLU6)  # TFLite runs them as the producing conv's fused activation
_ACTS = (nn.ReLU, nn.ReLU6, nn.Hardswish, nn.Hardsigmoid, nn.GELU, nn.SiLU)
_NORMS = (nn.LayerNorm, nn.GroupNorm)


class _FakeQuant(torch.autograd.Function):
    """x rounded to the grid (scale, zero point) and clamped to [qmin, qmax], with the straight-through
    gradient of `torch.fake_quantize_*` (1 inside the range, 0 where clamped), faster than those
    on CPU, and one function for per-tensor and (broadcast `scale`) per-channel rounding."""

    @staticmethod
    def forward(ctx, x, scale, zero, qmin: int, qmax: int):
        q = torch.round(x / scale).add_(zero)
        ctx.save_for_backward((q >= qmin) & (q <= qmax))
        return q.clamp_(qmin, qmax).sub_(zero).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        inside, = ctx.saved_tensors
        return grad * inside, None, None, None, None


def fake_quant(x: torch.Tensor, scale, zero, qmin: int = -128, qmax: int = 127) -> torch.Tensor:
    """`x` as the int8 tensor (scale, zero point) holds it, in float; straight-through gradient."""
    return _FakeQuant.apply(x, scale, zero, qmin, qmax)


def fake_quant_weight(w: torch.Tensor) -> torch.Tensor:
    """`w` rounded to int8, symmetric per output channel (dim 0), as LiteRT stores conv and dense weights."""
    scale = w.detach().abs().amax(dim=tuple(range(1, w.dim())), keepdim=True).clamp_min(1e-9) / 127
    return fake_quant(w, scale, 0, -127, 127)


class Observer:
    """Moving-average min/max of one tensor, and its fake int8 quantization (asymmetric, per tensor)."""

    def __init__(self, momentum: float = 0.01):
        self.momentum, self.range = momentum, None  # range: tensor [min, max]

    def update(self, x: torch.Tensor) -> None:
        """Fold in the batch's per-sample minima and maxima (averaged over the batch)."""
        x = x.detach().float()
        dims = tuple(range(1, x.dim()))  # reduced in place: a reshape would copy a channels-last map
        seen = torch.stack([x.amin(dim=dims).mean(), x.amax(dim=dims).mean()])
        self.range = seen if self.range is None else torch.lerp(self.range, seen, self.momentum)

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero point) as ai-edge-quantizer derives them from the range."""
        lo, hi = self.range[0].clamp(max=0), self.range[1].clamp(min=0)
        scale = ((hi - lo) / 255).clamp_min(1e-9)
        return scale, (-128 - lo / scale).round()

    def __call__(self, x: torch.Tensor, observe: bool) -> torch.Tensor:
        if observe:
            self.update(x)
        if self.range is None:  # never observed (evaluated before any training step)
            return x
        return fake_quant(x, *self.qparams())


class SigmoidObserver(Observer):
    """A sigmoid's output: LiteRT's LOGISTIC kernel fixes its int8 scale to 1/256, zero point -128."""

    def __call__(self, x: torch.Tensor, observe: bool) -> torch.Tensor:
        return fake_quant(x, 1 / 256, -128)


def _weighted_forward(module: nn.Module, x: torch.Tensor, quantize: bool = True) -> torch.Tensor:
    """The conv / linear's own forward, with its weight fake-quantized if `quantize`."""
    w = fake_quant_weight(module.weight) if quantize else module.weight
    if isinstance(module, nn.Linear):
        return F.linear(x, w, module.bias)
    return module._conv_forward(x, w, module.bias)


def _neighbours(model: nn.Module):
    """(producer, consumer) module pairs the converter may fuse: Sequential neighbours, the
    `fusable` (conv, bn, act) triples of ResNet-style modules, squeeze-excite's reduce and act."""
    for m in model.modules():
        if isinstance(m, nn.Sequential):
            yield from zip(m, list(m)[1:])
        for conv, bn, act in getattr(m, "fusable", ()):
            yield getattr(m, conv), getattr(m, bn)
            if act:
                yield getattr(m, bn), getattr(m, act)
        if isinstance(m, SqueezeExcite):
            yield m.reduce, m.act


def _adds(m: nn.Module) -> bool:
    """Whether the module's output is a residual ADD."""
    return isinstance(m, (MBConv, MoatBlock)) or (isinstance(m, MobileBlock) and m.residual)


def check_qat(recipe, task) -> None:
    """UserError when a run cannot be trained with `train.qat`."""
    if task.inputs.spatial != 2:
        raise UserError(f"train.qat: a {task.name} model cannot be exported to LiteRT (its depthwise 3-D "
                        "convolutions have no LiteRT builtin kernel), so there is no INT8 file to adapt it to")
    if recipe.train.precision != "fp32":
        raise UserError(f"train.qat simulates INT8 on fp32 arithmetic; train.precision must be fp32, "
                        f"got {recipe.train.precision}")
    if recipe.train.ema_decay > 0:
        raise UserError("train.qat: an EMA of the weights (train.ema_decay) is not fake-quantized; set it to 0")


class FakeQuantizer:
    """Fake INT8 hooks on `model` (see the module doc); `remove()` takes them off again.

    Ranges are observed while the model is in training mode and frozen in eval mode. With
    `freeze_bn_after` (epochs), `set_epoch` freezes the BatchNorm statistics from that epoch on,
    as QAT does once the ranges have settled (the BatchNorms then normalise with their running
    statistics, which export folds)."""

    def __init__(self, model: nn.Module, freeze_bn_after: int | None = None):
        self.model, self.enabled, self.freeze_bn_after, self.bn_frozen = model, True, freeze_bn_after, False
        self.observers: dict[str, Observer] = {}
        self._handles, self._overridden = [], []
        pairs = list(_neighbours(model))
        after_conv = {id(b) for a, b in pairs if isinstance(a, nn.Conv2d) and isinstance(b, _BN)}
        silent = {id(a) for a, b in pairs if (isinstance(a, nn.Conv2d) and isinstance(b, _BN))
                  or (isinstance(a, (nn.Conv2d, nn.Linear, _BN)) and isinstance(b, _FUSED))}
        self.batchnorms = {n: m for n, m in model.named_modules() if isinstance(m, _BN)}
        self._hook(model, "input", pre=True)
        for name, m in model.named_modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.forward = functools.partial(self._weighted, m)
                self._overridden.append(m)
            if id(m) in silent:
                continue
            if isinstance(m, (nn.Conv2d, nn.Linear, *_ACTS, *_NORMS)) or id(m) in after_conv or _adds(m):
                self._hook(m, name)
            elif isinstance(m, nn.Sigmoid):
                self._hook(m, name, SigmoidObserver())
            elif isinstance(m, SqueezeExcite):
                self._hook(m, name)
                self._squeeze(m, name)
        if callable(getattr(model, "head_outputs", None)):
            self._wrap_heads(model)

    def _observe(self) -> bool:
        return self.enabled and self.model.training

    def _weighted(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return _weighted_forward(module, x, self.enabled)

    def _hook(self, module: nn.Module, name: str, observer: Observer | None = None, pre: bool = False) -> None:
        """Fake-quantize the module's output (or with `pre`, its first input) at observer `name`."""
        obs = self.observers[name] = observer or Observer()

        def output(_m, _args, out):
            return obs(out, self._observe()) if self.enabled else out

        def first_input(_m, args):
            return (obs(args[0], self._observe()), *args[1:]) if self.enabled and args else args

        self._handles.append(module.register_forward_pre_hook(first_input) if pre
                             else module.register_forward_hook(output))

    def _squeeze(self, se: SqueezeExcite, name: str) -> None:
        """AVERAGE_POOL_2D keeps its input's scale: the pooled map is rounded on the SE input's range."""
        obs = self.observers[f"{name}.pool"] = Observer()

        def watch(_m, args):
            if self._observe():
                obs.update(args[0])

        def pooled(_m, args):
            return (obs(args[0], False), *args[1:]) if self.enabled else args

        self._handles += [se.register_forward_pre_hook(watch), se.reduce.register_forward_pre_hook(pooled)]

    def _wrap_heads(self, model: nn.Module) -> None:
        """A detector's raw outputs: each head map reshaped and concatenated, one int8 tensor per kind."""
        heads = model.head_outputs
        boxes = self.observers["head_outputs.boxes"] = Observer()
        logits = self.observers["head_outputs.logits"] = Observer()

        def head_outputs(images):
            regression, scores, sizes = heads(images)
            if self.enabled:
                regression, scores = boxes(regression, self._observe()), logits(scores, self._observe())
            return regression, scores, sizes

        model.head_outputs = head_outputs
        self._overridden.append(model)

    def remove(self) -> nn.Module:
        """Take every hook and override off; returns the plain model."""
        for h in self._handles:
            h.remove()
        for m in self._overridden:
            for attr in ("forward", "head_outputs"):
                m.__dict__.pop(attr, None)
        self._handles, self._overridden = [], []
        return self.model

    @contextmanager
    def disabled(self):
        """Within the block the model computes in plain fp32 (no rounding of weights or activations, no
        observing): e.g. to evaluate the fp32 model the file is converted from."""
        was, self.enabled = self.enabled, False
        try:
            yield self.model
        finally:
            self.enabled = was

    def set_epoch(self, epoch: int) -> None:
        """Freeze the BatchNorm statistics from epoch `freeze_bn_after` (0-based) on."""
        self.bn_frozen = self.freeze_bn_after is not None and epoch >= self.freeze_bn_after

    def eval_batchnorms(self) -> None:
        """While frozen, put the BatchNorms in eval mode (after `model.train()`)."""
        for bn in self.batchnorms.values() if self.bn_frozen else ():
            bn.eval()

    def kept_batchnorms(self) -> list[str]:
        """Names of the BatchNorms whose statistics must not move now (for `recalibrate_bn`)."""
        return list(self.batchnorms) if self.bn_frozen else []

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The observed ranges (for the trainer state: `--resume` continues with them)."""
        return {k: o.range.detach().cpu() for k, o in self.observers.items() if o.range is not None}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore ranges saved by `state_dict`, on the model's device."""
        device = next(self.model.parameters()).device
        for k, v in state.items():
            if k in self.observers:
                self.observers[k].range = v.to(device)
