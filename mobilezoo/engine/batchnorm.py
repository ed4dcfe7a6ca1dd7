"""BatchNorm in the loop: statistics recomputed before evaluation, and one-sample batches."""
from __future__ import annotations

from collections.abc import Collection
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.data import DataLoader


def _batchnorms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def recalibrate_bn(model: nn.Module, loader: DataLoader, num_batches: int, task, ctx,
                   keep: Collection[str] = ()) -> None:
    """Recompute BatchNorm running statistics as a plain average over `num_batches` batches; the
    BatchNorms named in `keep` (a frozen backbone's) run in eval mode and keep theirs.

    Short from-scratch runs with the official momentum (0.01) leave running statistics far from
    the data (variances off by up to 1400x were measured on digits); this restores them. Under DDP
    the synced BatchNorm already averages over ranks, so every rank must see the same number of
    batches."""
    kept = [m for n, m in model.named_modules() if n in keep]
    bns = [bn for bn in _batchnorms(model) if bn not in kept]
    if not bns or num_batches <= 0 or len(loader) == 0:
        return
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average
    was_training = model.training
    model.train()
    for bn in kept:
        bn.eval()
    with torch.random.fork_rng(devices=[]):  # drop path would consume the training RNG
        for i, batch in enumerate(loader):
            if i >= num_batches:
                break
            batch.pop("skipped", 0)
            if batch:
                with ctx.autocast():
                    task.forward(model, ctx.batch(batch))
    for bn, m in zip(bns, momenta):
        bn.momentum = m
    model.train(was_training)


def _single_value_per_channel(x: torch.Tensor) -> bool:
    return x.dim() >= 2 and x.numel() == x.shape[1]


@contextmanager
def one_sample_batchnorm(model: nn.Module):
    """While active, a training-mode BatchNorm that receives one value per channel (a one-sample
    batch reaching a 1x1 map, where batch statistics do not exist and PyTorch raises) normalises
    that call with its running statistics, as in evaluation; its affine weights still train.
    Every other call is untouched."""
    def before(bn, args):
        if bn.training and _single_value_per_channel(args[0]):
            bn.train(False)
            switched.add(bn)

    def after(bn, args, out):
        if bn in switched:
            switched.discard(bn)
            bn.train(True)

    switched: set[nn.Module] = set()
    handles = [h for bn in _batchnorms(model)
               for h in (bn.register_forward_pre_hook(before), bn.register_forward_hook(after))]
    try:
        yield model
    finally:
        for h in handles:
            h.remove()
        for bn in switched:
            bn.train(True)
