"""How far two sets of outputs (a torch model's and an exported graph's) are apart."""
from __future__ import annotations

import numpy as np
import torch

from ..errors import ParityError


def max_abs_diff(ref, got) -> tuple[float, float]:
    """(largest absolute difference, largest absolute reference output) over paired outputs;
    `ref` is a tensor or a sequence of them, `got` a sequence of arrays or tensors. NaN propagates."""
    refs = [ref] if isinstance(ref, torch.Tensor) else list(ref)
    if len(refs) != len(got):
        raise ParityError(f"the exported graph has {len(got)} outputs, the torch model {len(refs)}")
    diff, scale = 0.0, 0.0
    for r, g in zip(refs, got):
        r = r.detach().float().cpu().numpy()
        g = g.detach().float().cpu().numpy() if isinstance(g, torch.Tensor) else np.asarray(g)
        if r.shape != g.shape:
            raise ParityError(f"exported output shape {g.shape} differs from the torch model's {r.shape}")
        d = float(np.abs(r - g).max()) if r.size else 0.0
        diff = d if np.isnan(d) else max(diff, d)
        scale = max(scale, float(np.abs(r).max()) if r.size else 0.0)
    return diff, scale
