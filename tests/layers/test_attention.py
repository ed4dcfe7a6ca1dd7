"""Rel-pos attention, bias-table resize, window partitioning (spec §1.3, §1.4, §5)."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from mobilezoo.layers import RelPosAttention2d, relative_position_index, window_merge, window_partition


def bias_by_formula(table, h, w):
    """bias[n, (i,j), (x,y)] = table[n, x-i+h-1, y-j+w-1]: (i,j) query, (x,y) key."""
    heads = table.shape[0]
    out = torch.empty(heads, h * w, h * w, dtype=table.dtype)
    for i in range(h):
        for j in range(w):
            for x in range(h):
                for y in range(w):
                    out[:, i * w + j, x * w + y] = table[:, x - i + h - 1, y - j + w - 1]
    return out


@pytest.mark.parametrize("h, w", [(1, 1), (3, 3), (2, 5), (4, 3)])
def test_relative_position_index_formula(h, w):
    table = torch.randn(2, 2 * h - 1, 2 * w - 1)
    idx = relative_position_index(h, w)
    assert idx.shape == (h * w, h * w)
    torch.testing.assert_close(table.flatten(1)[:, idx], bias_by_formula(table, h, w))


@pytest.mark.parametrize("h, w", [(3, 3), (2, 5), (5, 2)])
def test_relative_bias_without_resize(h, w):
    m = RelPosAttention2d(64, pos_size=3)
    with torch.no_grad():  # table already the window's size: used as is (non-square too)
        m.rel_table = torch.nn.Parameter(torch.randn(2, 2 * h - 1, 2 * w - 1))
    torch.testing.assert_close(m.relative_bias(h, w), bias_by_formula(m.rel_table.detach(), h, w))


def test_relative_bias_window_equal_to_pos_size_uses_table_unchanged():
    torch.manual_seed(0)
    m = RelPosAttention2d(96, pos_size=4)
    torch.nn.init.normal_(m.rel_table, std=0.02)
    assert m.rel_table.shape == (3, 7, 7)
    torch.testing.assert_close(m.relative_bias(4, 4), bias_by_formula(m.rel_table.detach(), 4, 4),
                               rtol=0, atol=0)


@pytest.mark.parametrize("h, w", [(6, 6), (2, 2), (3, 6), (5, 1)])
def test_relative_bias_resizes_bilinear_half_pixel(h, w):
    torch.manual_seed(0)
    m = RelPosAttention2d(64, pos_size=4)
    torch.nn.init.normal_(m.rel_table, std=1.0)
    resized = F.interpolate(m.rel_table.detach()[None], size=(2 * h - 1, 2 * w - 1),
                            mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(m.relative_bias(h, w), bias_by_formula(resized, h, w))


def test_relative_bias_gets_gradients():
    m = RelPosAttention2d(64, pos_size=4)
    m.relative_bias(6, 6).sum().backward()
    assert m.rel_table.grad is not None and m.rel_table.grad.abs().sum() > 0


@settings(deadline=None, max_examples=50)
@given(n=st.integers(1, 3), nh=st.integers(1, 4), nw=st.integers(1, 4), h=st.integers(1, 5),
       w=st.integers(1, 5), c=st.integers(1, 4))
def test_window_partition_merge_round_trip(n, nh, nw, h, w, c):
    x = torch.randn(n, nh * h, nw * w, c)
    win = window_partition(x, (h, w))
    assert win.shape == (n * nh * nw, h * w, c)
    # window k of image b is the (r, s) tile, row-major, flattened row-major
    b, r, s = n - 1, nh - 1, nw // 2
    k = b * nh * nw + r * nw + s
    torch.testing.assert_close(win[k], x[b, r * h:(r + 1) * h, s * w:(s + 1) * w].reshape(h * w, c))
    torch.testing.assert_close(window_merge(win, (h, w), (nh * h, nw * w)), x, rtol=0, atol=0)


def test_window_partition_not_divisible_raises():
    with pytest.raises(ValueError, match=r"15\D+14.*7\D+7|15x14.*7x7"):
        window_partition(torch.zeros(1, 15, 14, 8), (7, 7))


def test_window_equal_to_map_is_global():
    torch.manual_seed(0)
    a = RelPosAttention2d(64, window=(6, 4), pos_size=3).eval()
    torch.nn.init.normal_(a.rel_table)
    g = RelPosAttention2d(64, window=None, pos_size=3).eval()
    g.load_state_dict(a.state_dict())
    x = torch.randn(2, 64, 6, 4)
    torch.testing.assert_close(a(x), g(x))


def reference_attention(m, x, window):
    """LN -> windows -> softmax(q k^T / sqrt(32) + bias) v -> proj, from the module's weights. A window
    cut by the map's edge attends over its real positions, with the bias of their offsets."""
    n, c, hh, ww = x.shape
    h, w = window
    heads, d = c // 32, 32
    t = F.layer_norm(x.permute(0, 2, 3, 1), (c,), m.norm.weight, m.norm.bias, 1e-5)
    out = torch.zeros(n, hh, ww, c, dtype=x.dtype)
    bias = bias_by_formula(F.interpolate(m.rel_table[None], size=(2 * h - 1, 2 * w - 1),
                                         mode="bilinear", align_corners=False)[0], h, w)
    wq, wk, wv = m.qkv.weight.split(c)  # [q; k; v], each head-major
    bq, bk, bv = m.qkv.bias.split(c)
    for b in range(n):
        for r in range(0, hh, h):
            for s in range(0, ww, w):
                rh, rw = min(h, hh - r), min(w, ww - s)
                tok = t[b, r:r + rh, s:s + rw].reshape(rh * rw, c)
                real = torch.tensor([i * w + j for i in range(rh) for j in range(rw)])
                q = (tok @ wq.T + bq).view(rh * rw, heads, d).transpose(0, 1)
                k = (tok @ wk.T + bk).view(rh * rw, heads, d).transpose(0, 1)
                v = (tok @ wv.T + bv).view(rh * rw, heads, d).transpose(0, 1)
                attn = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(32) + bias[:, real][:, :, real], -1)
                o = (attn @ v).transpose(0, 1).reshape(rh * rw, c) @ m.proj.weight.T + m.proj.bias
                out[b, r:r + rh, s:s + rw] = o.view(rh, rw, c)
    return out.permute(0, 3, 1, 2)


@pytest.mark.parametrize("window, hw", [((2, 3), (4, 6)), (None, (3, 5)), ((3, 4), (7, 6)), ((4, 4), (6, 8))])
def test_attention_matches_explicit_reference(window, hw):
    torch.manual_seed(0)
    m = RelPosAttention2d(64, window=window, pos_size=3).double().eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(2, 64, *hw, dtype=torch.float64)
    with torch.no_grad():
        ref = reference_attention(m, x, window or hw)
        torch.testing.assert_close(m(x), ref)


def test_attention_without_rel_pos():
    m = RelPosAttention2d(64, pos_size=None)
    assert m.rel_table is None
    assert m(torch.randn(1, 64, 3, 3)).shape == (1, 64, 3, 3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("grad", [False, True])  # in-place CPU path for inference, SDPA for training
def test_reduced_precision_attention_matches_reference(dtype, grad):
    torch.manual_seed(0)
    m = RelPosAttention2d(64, window=(3, 3), pos_size=3).double().eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(2, 64, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        ref = reference_attention(m, x, (3, 3))
    low, xl = m.to(dtype), x.to(dtype)
    with torch.set_grad_enabled(grad):
        out = low(xl.requires_grad_(grad))
    assert out.requires_grad == grad
    torch.testing.assert_close(out.double(), ref, atol=0.05 * ref.abs().max().item(), rtol=0)
