"""timm's conventions for a stem -> stages -> pooled-head network: features_only, feature_info, classifier reset."""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
from torch import nn


def linear_classifier(in_features: int, num_classes: int) -> nn.Module:
    """A Linear layer to `num_classes` logits, or Identity for 0 classes (pooled features out)."""
    return nn.Linear(in_features, num_classes) if num_classes else nn.Identity()


class StagedNet(nn.Module):
    """Base of a classifier / multi-scale backbone: a stem, a list of stages, then `forward_head`.

    Subclasses provide `forward_stem`, `feature_stages` and `forward_head`, set `init_weights`
    (their per-module init, applied to a fresh classifier too) and call `setup_outputs` once
    their stages exist. `features_only=True` returns the outputs of the stages in `out_indices`."""

    init_weights: Callable[[nn.Module], None] = staticmethod(lambda m: None)

    def setup_outputs(self, widths: Sequence[int], reductions: Sequence[int], modules: Sequence[str],
                      num_classes: int, features_only: bool, out_indices: Sequence[int]) -> None:
        """Record feature_info and the output mode; without features_only, add the classifier `head`."""
        self.num_classes, self.features_only, self.out_indices = num_classes, features_only, tuple(out_indices)
        self.feature_info = [dict(num_chs=w, reduction=r, module=m) for w, r, m in zip(widths, reductions, modules)]
        self.num_features = widths[-1]
        if not features_only:
            self.head = linear_classifier(self.num_features, num_classes)

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        """The stem, before the first stage."""
        raise NotImplementedError

    def feature_stages(self) -> Iterable[nn.Module]:
        """The stages, in order."""
        raise NotImplementedError

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pooled features -> logits (or the pooled features with `pre_logits`)."""
        raise NotImplementedError

    def stage_output(self, x: torch.Tensor) -> torch.Tensor:
        """What `features_only` returns for a stage's output (the output itself unless overridden)."""
        return x

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every stage's output, first to last."""
        x, outs = self.forward_stem(x), []
        for stage in self.feature_stages():
            x = stage(x)
            outs.append(x)
        return outs

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's output, N x num_features x H/32 x W/32."""
        x = self.forward_stem(x)
        for stage in self.feature_stages():
            x = stage(x)
        return x

    def forward(self, x: torch.Tensor):
        if self.features_only:
            outs = self.forward_stages(x)
            return [self.stage_output(outs[i]) for i in self.out_indices]
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier with a fresh one for `num_classes` classes (timm convention)."""
        self.num_classes = num_classes
        self.head = linear_classifier(self.num_features, num_classes)
        self.head.apply(self.init_weights)

    def get_classifier(self) -> nn.Module:
        """The final Linear layer (timm convention)."""
        return self.head

    def head_keys(self) -> list[str]:
        """State-dict keys of the classifier (timm's `pretrained_cfg['classifier']`): left freshly
        initialised by `load_pretrained` for another class count, trained alone while the backbone is frozen."""
        return [] if self.features_only else [f"head.{k}" for k in self.head.state_dict()]
