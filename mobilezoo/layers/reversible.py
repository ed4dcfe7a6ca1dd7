"""Additive couplings and a reversible sequence that rebuilds activations in backward (RevNet).

A `ReversibleSequence` of `AdditiveCoupling`s runs as one autograd Function that stores only its
output; backward walks the couplings from last to first, reconstructing each input from its output
and re-running F and G with grad enabled. Memory then grows with the couplings' boundary tensors,
not with their internals. F and G may be any shape-preserving modules (2D, 3D, token tensors).
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Iterable, Iterator

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.func import functional_call
from torch.nn.modules.batchnorm import _NormBase

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _split(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    if x.shape[dim] % 2:
        raise ValueError(f"an additive coupling splits dim {dim} into two halves; it needs an even size, "
                         f"got shape {tuple(x.shape)}")
    x1, x2 = torch.chunk(x, 2, dim)
    return x1, x2


def _apply_checked(fn: nn.Module, x: torch.Tensor, name: str) -> torch.Tensor:
    # The coupling reuses F's and G's inputs (and the reversible backward rebuilds them), so an
    # in-place write there would silently corrupt the result: refuse it instead.
    if x.is_inference():  # inference-mode tensors keep no version counter (and no backward rebuilds them)
        return fn(x)
    version = x._version
    out = fn(x)
    if x._version != version:
        raise RuntimeError(f"coupling function {name} ({type(fn).__name__}) modified its input in place; "
                           "F and G must leave their input untouched (in-place ops on their own "
                           "intermediates are fine)")
    return out


class AdditiveCoupling(nn.Module):
    """y1 = x1 + F(x2), y2 = x2 + G(y1) over the two halves of `dim`; F and G keep the shape."""

    def __init__(self, f: nn.Module, g: nn.Module, dim: int = 1):
        super().__init__()
        self.f, self.g, self.dim = f, g, dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = _split(x, self.dim)
        y1 = x1 + _apply_checked(self.f, x2, "F")
        y2 = x2 + _apply_checked(self.g, y1, "G")
        return torch.cat([y1, y2], self.dim)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """The input that `forward` maps to `y`: x2 = y2 - G(y1), x1 = y1 - F(x2)."""
        y1, y2 = _split(y, self.dim)
        x2 = y2 - _apply_checked(self.g, y1, "G")
        x1 = y1 - _apply_checked(self.f, x2, "F")
        return torch.cat([x1, x2], self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class _RngState:
    """CPU (and CUDA, for CUDA inputs) generator state, captured before F or G runs forward."""

    def __init__(self, device: torch.device):
        self.cpu = torch.get_rng_state()
        self.cuda_device: int | None = None
        if device.type == "cuda":
            self.cuda_device = torch.cuda.current_device() if device.index is None else device.index
            self.cuda = torch.cuda.get_rng_state(self.cuda_device)

    @contextmanager
    def replay(self) -> Iterator[None]:
        """Run the block with the captured state, then give the caller its own RNG stream back."""
        devices = [] if self.cuda_device is None else [self.cuda_device]
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda_device is not None:
                torch.cuda.set_rng_state(self.cuda, self.cuda_device)
            yield


@contextmanager
def frozen_running_stats(module: nn.Module) -> Iterator[None]:
    """Within this block, norm layers in train mode use batch statistics but their running
    statistics (and batch counters) come out unchanged: the recomputation must not count twice."""
    norms = [m for m in module.modules()
             if isinstance(m, _NormBase) and m.training and m.track_running_stats]
    saved = [(m, {k: b.clone() for k, b in m.named_buffers(recurse=False) if b is not None}) for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, buffers in saved:
                for name, value in buffers.items():
                    getattr(m, name).copy_(value)


def _regrad(fn: nn.Module, inp: torch.Tensor, grad_out: torch.Tensor, rng: _RngState | None,
            param_slots: list[tuple[str, int]], grads: list[torch.Tensor | None]):
    """Re-run `fn` on `inp` with grad; return its output and d(out)/d(inp), and add its parameter
    gradients into `grads` at their slots."""
    # Differentiate with respect to detached stand-ins of the parameters: autograd.grad would fire
    # hooks registered on the real parameters here, and the engine fires them again on what the
    # Function returns. The stand-ins share storage, so this costs nothing.
    named = dict(fn.named_parameters())
    proxies = {name: p.detach().requires_grad_(p.requires_grad) for name, p in named.items()}
    leaf = inp.detach().requires_grad_(True)
    wanted = [(slot, proxies[name]) for name, slot in param_slots if proxies[name].requires_grad]
    # Restore running statistics only after autograd.grad: batch norm's backward reads them (and
    # checks their version), so writing them back earlier would fail the backward.
    with frozen_running_stats(fn):
        with torch.enable_grad(), rng.replay() if rng is not None else nullcontext():
            out = functional_call(fn, proxies, (leaf,))
        found = torch.autograd.grad(out, [leaf] + [p for _, p in wanted], grad_out, allow_unused=True)
    for (slot, _), g in zip(wanted, found[1:]):
        if g is not None:
            grads[slot] = g if grads[slot] is None else grads[slot] + g
    d_inp = found[0] if found[0] is not None else torch.zeros_like(inp)
    return out.detach(), d_inp


class _ReversibleFunction(torch.autograd.Function):
    """Forward without a graph, keeping only the output; backward rebuilds each coupling's input."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, seq: ReversibleSequence, *params: torch.Tensor) -> torch.Tensor:
        slot = {id(p): i for i, p in enumerate(params)}
        ctx.seq, ctx.n_params, ctx.device_type = seq, len(params), x.device.type
        ctx.slots, ctx.rng = [], []
        for block in seq.blocks:
            ctx.slots.append(tuple([(name, slot[id(p)]) for name, p in fn.named_parameters()]
                                   for fn in (block.f, block.g)))
            x1, x2 = _split(x, block.dim)
            rng_f = _RngState(x.device) if seq.preserve_rng_state else None
            y1 = x1 + _apply_checked(block.f, x2, "F")
            rng_g = _RngState(x.device) if seq.preserve_rng_state else None
            y2 = x2 + _apply_checked(block.g, y1, "G")
            ctx.rng.append((rng_f, rng_g))
            x = torch.cat([y1, y2], block.dim)
        # save_for_backward (not a ctx attribute) so that an in-place write on the output after the
        # sequence raises in backward instead of rebuilding every input from a wrong value.
        ctx.save_for_backward(x)
        return x

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: torch.Tensor):
        (y,) = ctx.saved_tensors
        grads: list[torch.Tensor | None] = [None] * ctx.n_params
        with torch.autocast(ctx.device_type, enabled=False):  # the forward ran in full precision too
            for block, (slots_f, slots_g), (rng_f, rng_g) in zip(reversed(ctx.seq.blocks), reversed(ctx.slots),
                                                                  reversed(ctx.rng)):
                y1, y2 = _split(y, block.dim)
                dy1, dy2 = _split(dy, block.dim)
                g_y1, d_y1 = _regrad(block.g, y1, dy2, rng_g, slots_g, grads)
                x2 = y2 - g_y1
                dz1 = dy1 + d_y1
                del g_y1, d_y1, y2
                f_x2, d_x2 = _regrad(block.f, x2, dz1, rng_f, slots_f, grads)
                x1 = y1 - f_x2
                dx2 = dy2 + d_x2
                del f_x2, d_x2, y1
                y, dy = torch.cat([x1, x2], block.dim), torch.cat([dz1, dx2], block.dim)
        return (dy, None, *grads)


class ReversibleSequence(nn.Module):
    """Couplings applied in order; with `reversible=True` their activations are recomputed in backward.

    Both paths run the same modules (same parameter names, same outputs); `reversible=False` uses
    plain autograd, e.g. as the memory baseline. Under autocast the sequence runs in float32 with
    autocast off, because reconstruction error in fp16/bf16 grows too fast with depth.
    `preserve_rng_state` replays the CPU/CUDA RNG for each F and G so dropout masks match.
    """

    def __init__(self, blocks: Iterable[AdditiveCoupling], reversible: bool = True,
                 preserve_rng_state: bool = True):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        for b in self.blocks:
            if not isinstance(b, AdditiveCoupling):
                raise TypeError(f"ReversibleSequence takes AdditiveCoupling blocks, got {type(b).__name__}")
        self.reversible, self.preserve_rng_state = reversible, preserve_rng_state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.blocks) == 0:
            return x
        device_type = x.device.type
        if device_type != "meta" and torch.is_autocast_enabled(device_type):  # meta: no autocast (MAC counting)
            with torch.autocast(device_type, enabled=False):
                return self._run(x.float() if x.dtype in _LOW_PRECISION else x)
        return self._run(x)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        params = list(self.parameters())
        needs_graph = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))
        if self.reversible and needs_graph:
            return _ReversibleFunction.apply(x, self, *params)
        for block in self.blocks:
            x = block(x)
        return x

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """The sequence input that produced `y` (couplings inverted from last to first)."""
        for block in reversed(self.blocks):
            y = block.inverse(y)
        return y

    def extra_repr(self) -> str:
        return f"reversible={self.reversible}, preserve_rng_state={self.preserve_rng_state}"


def set_reversible(module: nn.Module, reversible: bool) -> nn.Module:
    """Switch every ReversibleSequence inside `module` to the reversible or the plain path."""
    for m in module.modules():
        if isinstance(m, ReversibleSequence):
            m.reversible = reversible
    return module
