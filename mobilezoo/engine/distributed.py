"""torch.distributed under torchrun: init, rank helpers, sum-reduction, sharding, synced BatchNorm."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Sampler


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """True on the rank that writes files and prints."""
        return self.rank == 0


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group torchrun describes in the environment (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def shutdown() -> None:
    """Leave the process group, if any."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    """True inside an initialised multi-process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks in place (no-op when not distributed)."""
    if is_distributed():
        dist.all_reduce(t)
    return t


def broadcast_object(obj):
    """Rank 0's value of `obj` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class ShardSampler(Sampler[int]):
    """Rank r takes items r, r + W, r + 2W, ...: every item exactly once over all ranks, no padding."""

    def __init__(self, length: int, rank: int = 0, world_size: int = 1):
        self.indices = list(range(rank, length, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class DistBatchNorm(nn.BatchNorm2d):
    """BatchNorm whose training statistics are summed over all ranks through a differentiable
    all-reduce, so a W-process run with batch B per rank normalises like one process with W*B.
    Works on any backend (torch's SyncBatchNorm needs a GPU)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_distributed()):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce
        c = x.shape[1]
        dims = [0] + list(range(2, x.ndim))
        xf = x.float()
        # Two passes (mean, then squared deviations) keep the variance as exact as BatchNorm's.
        count = torch.full((1,), x.numel() // c, dtype=torch.float32, device=x.device)
        stats = all_reduce(torch.cat([xf.sum(dims), count]))
        n = stats[-1]
        mean = stats[:c] / n
        shape = (1, c) + (1,) * (x.ndim - 2)
        centred = xf - mean.view(shape)
        var = all_reduce((centred * centred).sum(dims)) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean, m)
                self.running_var.lerp_(var * n / (n - 1).clamp_min(1), m)
        y = centred * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Make every BatchNorm2d share statistics across ranks (torch's SyncBatchNorm on CUDA)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if type(child) is nn.BatchNorm2d:
            new = DistBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                child.track_running_stats)
            new.load_state_dict(child.state_dict())
            setattr(model, name, new)
        else:
            convert_sync_batchnorm(child, device)
    return model
