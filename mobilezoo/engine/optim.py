"""AdamW without decay on norms/biases/position tables, and a per-step warm-up + cosine schedule."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import UserError


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas,
                    name: str = "adamw", layer_decay: float | None = None) -> torch.optim.Optimizer:
    """AdamW (or SGD with Nesterov momentum betas[0]); 1-D parameters (norms, biases) and
    relative-position tables get no weight decay. With `layer_decay`, timm's layer-wise lr decay."""
    if layer_decay is not None:
        groups = layer_decay_groups(model, lr, weight_decay, layer_decay)
    else:
        decay, no_decay = [], []
        for pname, p in model.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim <= 1 or "rel_table" in pname else decay).append(p)
        groups = [{"params": decay, "weight_decay": weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=betas[0], nesterov=True)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas))


def layer_decay_groups(model: nn.Module, lr: float, weight_decay: float, layer_decay: float) -> list[dict]:
    """timm's `param_groups_layer_decay` over the model's `group_matcher` (head at `lr`, the layer
    d below it at lr x layer_decay^d), with our no-decay rule; each group's lr set here, since the
    LambdaLR schedule scales the groups' own lrs (timm's schedulers apply `lr_scale` themselves)."""
    from timm.optim import param_groups_layer_decay
    if not hasattr(model, "group_matcher"):
        raise UserError(f"optim.layer_decay: {type(model).__name__} has no layer grouping (group_matcher); "
                        "leave optim.layer_decay null for this model")
    groups = param_groups_layer_decay(model, weight_decay, no_weight_decay_list=("*rel_table*",),
                                      layer_decay=layer_decay)
    for g in groups:
        g["lr"] = lr * g["lr_scale"]
    return groups


def warmup_cosine(total_steps: int, warmup_steps: int, min_ratio: float):
    """LR multiplier: linear warm-up from ~0 to 1, then cosine down to `min_ratio`."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
    return factor


def build_scheduler(optimizer, total_steps: int, warmup_steps: int, min_ratio: float):
    """LambdaLR stepping once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps, warmup_steps,
                                                                      min_ratio))
