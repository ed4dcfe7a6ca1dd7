"""Multi-head self-attention over 2D windows with a resizable relative-position bias (CoAtNet/MOAT)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def relative_position_index(h: int, w: int, device=None) -> torch.Tensor:
    """[h*w, h*w] indices into a flattened (2h-1, 2w-1) table: key minus query, offset to >= 0."""
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device),
                            indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    dy = ys[None, :] - ys[:, None] + h - 1  # rows are queries, columns keys
    dx = xs[None, :] - xs[:, None] + w - 1
    return dy * (2 * w - 1) + dx


def window_partition(x: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """(N, H, W, C) -> (N * windows, h * w, C) for non-overlapping h x w windows."""
    n, hh, ww, c = x.shape
    h, w = window
    if hh % h or ww % w:
        raise ValueError(f"feature map {hh}x{ww} is not divisible by the attention window {h}x{w}")
    x = x.view(n, hh // h, h, ww // w, w, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h * w, c)


def window_merge(x: torch.Tensor, window: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """Inverse of `window_partition`: (N * windows, h * w, C) -> (N, H, W, C)."""
    (h, w), (hh, ww) = window, size
    c = x.shape[-1]
    x = x.view(-1, hh // h, ww // w, h, w, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, hh, ww, c)


def padding_mask(n: int, size: tuple[int, int], window: tuple[int, int], dtype, device) -> torch.Tensor:
    """[n * windows, 1, 1, h*w] additive mask: -inf on the keys that pad an (H, W) map to whole windows,
    so that every real query attends to real keys only, as on the unpadded map."""
    (hh, ww), (h, w) = size, window
    real = torch.zeros(1, hh + -hh % h, ww + -ww % w, 1, dtype=torch.bool, device=device)
    real[:, :hh, :ww] = True
    keys = window_partition(real, window)[..., 0]  # (windows, h*w)
    mask = torch.zeros(keys.shape, dtype=dtype, device=device).masked_fill_(~keys, float("-inf"))
    return mask.repeat(n, 1)[:, None, None, :]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + bias) v over [batch, heads, length, d].

    PyTorch's fused CPU kernel is no faster in bf16/fp16 than in fp32 for these short windows, so
    reduced-precision CPU inference (no autograd) runs the two batched matmuls instead, with the
    scale, bias and softmax applied in place on the scores (a fresh [b, heads, L, L] tensor per op
    costs more than the ops). The scores are rounded to q's dtype before the softmax, which
    computes in fp32. Otherwise SDPA, whose fused kernel takes a 4-D mask (a 3-D one falls back
    to the slow math path).
    """
    if q.device.type != "cpu" or q.dtype not in (torch.bfloat16, torch.float16) or q.requires_grad:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    scores = torch.matmul(q, k.transpose(-1, -2)).mul_(q.shape[-1] ** -0.5)
    if bias is not None:
        scores.add_(bias)
    return torch.matmul(torch.softmax(scores, -1, out=scores), v)


class RelPosAttention2d(nn.Module):
    """Pre-LN window (or global) attention on an NCHW map; returns the attention branch, NCHW.

    The bias table has a fixed size (2P-1)^2 per head and is bilinearly resized to (2h-1, 2w-1)
    for each window (h, w) at run time, so one set of weights serves every input size.
    `window=None` (or a window at least as large as the map) attends over the whole runtime feature
    map. A map that the window does not divide is padded to whole windows at its bottom and right,
    and the padded keys are masked out: every real position attends to the real positions of its
    window only.
    """

    def __init__(self, dim: int, head_dim: int = 32, window: tuple[int, int] | int | None = None,
                 pos_size: int | None = 14, ln_eps: float = 1e-5):
        super().__init__()
        if dim % head_dim:
            raise ValueError(f"attention width {dim} is not a multiple of the head size {head_dim}")
        self.num_heads, self.head_dim = dim // head_dim, head_dim
        self.window = (window, window) if isinstance(window, int) else window
        self.norm = nn.LayerNorm(dim, eps=ln_eps)
        self.qkv = nn.Linear(dim, 3 * dim)  # [q; k; v], each head-major: TF q/k/v concatenated
        self.proj = nn.Linear(dim, dim)
        self.rel_table = (nn.Parameter(torch.zeros(self.num_heads, 2 * pos_size - 1, 2 * pos_size - 1))
                          if pos_size else None)
        self._index_cache: dict = {}

    def relative_bias(self, h: int, w: int) -> torch.Tensor:
        """[heads, h*w, h*w] bias for an h x w window, from the resized table."""
        table = self.rel_table
        if table.shape[-2:] != (2 * h - 1, 2 * w - 1):
            table = F.interpolate(table[None], size=(2 * h - 1, 2 * w - 1), mode="bilinear",
                                  align_corners=False)[0]
        key = (h, w, table.device)
        if key not in self._index_cache:
            self._index_cache[key] = relative_position_index(h, w, table.device)
        return table.flatten(1)[:, self._index_cache[key]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, hh, ww = x.shape
        # A window at least as large as the map is global attention over the map.
        window = (min(self.window[0], hh), min(self.window[1], ww)) if self.window else (hh, ww)
        t = self.norm(x.permute(0, 2, 3, 1))
        pad_h, pad_w = -hh % window[0], -ww % window[1]
        if pad_h or pad_w:  # the last windows of a row / column stick out: pad, and mask the padding
            t = F.pad(t, (0, 0, 0, pad_w, 0, pad_h))
        t = window_partition(t, window)
        b, length, _ = t.shape
        q, k, v = self.qkv(t).view(b, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        bias = None if self.rel_table is None else self.relative_bias(*window).to(q.dtype)[None]
        if pad_h or pad_w:
            mask = padding_mask(n, (hh, ww), window, q.dtype, q.device)
            bias = mask if bias is None else bias + mask
        out = attend(q, k, v, bias)
        out = self.proj(out.transpose(1, 2).reshape(b, length, c))
        out = window_merge(out, window, (hh + pad_h, ww + pad_w))
        return out[:, :hh, :ww].permute(0, 3, 1, 2)
