"""Reversible couplings (spec revunet3d.md §1): equations, inverse, gradients, and the §1.5 guards.

Expected values come from the spec's equations computed here by hand, or from plain autograd on
the same modules (`reversible=False`); the reversible path must reproduce those.
"""
import copy

import pytest
import torch
from torch import nn

from mobilezoo.layers.mbconv3d import MBConv3d
from mobilezoo.layers.reversible import AdditiveCoupling, ReversibleSequence, frozen_running_stats, set_reversible
from mobilezoo.layers.squeeze_excite import SqueezeExcite

torch.set_num_threads(1)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error ||a - b|| / ||b||."""
    return ((a - b).norm() / b.norm()).item()


def block2d(c: int) -> nn.Module:
    """A small shape-preserving 2D F or G."""
    return nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(2, c), nn.SiLU(), nn.Conv2d(c, c, 1))


def seq2d(depth: int = 3, **kwargs) -> ReversibleSequence:
    """Couplings on 8 channels (F, G on 4)."""
    return ReversibleSequence([AdditiveCoupling(block2d(4), block2d(4)) for _ in range(depth)], **kwargs)


def seq3d(depth: int = 3, **kwargs) -> ReversibleSequence:
    """Couplings of MBConv3d on 16 channels (F, G on 8, hidden 16)."""
    return ReversibleSequence([AdditiveCoupling(MBConv3d(8, 2), MBConv3d(8, 2)) for _ in range(depth)], **kwargs)


CASES = {"2d": (seq2d, (2, 8, 12, 12)), "3d": (seq3d, (2, 16, 6, 6, 6))}


def make(case: str, dtype=torch.float64, seed: int = 0, **kwargs):
    """A sequence, an input and a fixed random output weighting (so the loss is not symmetric)."""
    build, shape = CASES[case]
    torch.manual_seed(seed)
    seq = build(**kwargs).to(dtype)
    x = torch.randn(shape, dtype=dtype)
    w = torch.randn(shape, dtype=dtype)
    return seq, x, w


def step(seq: nn.Module, x: torch.Tensor, w: torch.Tensor, reversible: bool):
    """One forward + backward of sum(w * seq(x)); returns output, input grad and parameter grads."""
    set_reversible(seq, reversible)
    seq.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    out = seq(x)
    (out * w).sum().backward()
    return out.detach(), x.grad, [p.grad for p in seq.parameters()]


# ----------------------------------------------------------------------------- equations and inverse


def test_coupling_follows_the_revnet_equations():
    torch.manual_seed(0)
    f, g = block2d(4).double(), block2d(4).double()
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    x1, x2 = x[:, :4], x[:, 4:]
    y1 = x1 + f(x2)  # spec §1.1: y1 = x1 + F(x2); y2 = x2 + G(y1)
    y2 = x2 + g(y1)
    torch.testing.assert_close(AdditiveCoupling(f, g)(x), torch.cat([y1, y2], 1), rtol=0, atol=1e-14)


@pytest.mark.parametrize("case", ["2d", "3d"])
def test_inverse_of_forward_is_identity(case):
    seq, x, _ = make(case)
    with torch.no_grad():
        y = seq(x)
        assert rel(y, x) > 0.1  # the couplings do change the input
        torch.testing.assert_close(seq.blocks[0].inverse(seq.blocks[0](x)), x, rtol=0, atol=1e-12)
        torch.testing.assert_close(seq.inverse(y), x, rtol=0, atol=1e-12)


def test_odd_split_is_rejected():
    seq = seq2d(1)
    with pytest.raises(ValueError, match="even size"):
        seq(torch.randn(1, 7, 4, 4, requires_grad=True))


# ----------------------------------------------------------------------------- gradients vs plain autograd


@pytest.mark.parametrize("case", ["2d", "3d"])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_gradients_match_plain_autograd(case, dtype, tol):
    seq, x, w = make(case, dtype)
    out_r, gx_r, gp_r = step(seq, x, w, reversible=True)
    out_p, gx_p, gp_p = step(seq, x, w, reversible=False)
    assert rel(out_r, out_p) <= tol
    assert rel(gx_r, gx_p) <= tol
    assert len(gp_r) == len(gp_p) == len(list(seq.parameters()))
    for a, b in zip(gp_r, gp_p):
        assert a is not None and rel(a, b) <= tol


@pytest.mark.parametrize("depth", [1, 4])
def test_reversible_path_saves_only_its_output(depth):
    """What autograd keeps for backward: the output alone, whatever the depth (plain: grows with it)."""
    seq, x, _ = make("3d", torch.float32)
    seq = seq3d(depth)
    x.requires_grad_(True)

    def saved_bytes(reversible: bool):
        set_reversible(seq, reversible)
        total = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: total.append(t.numel() * t.element_size()) or t,
                                                      lambda t: t):
            out = seq(x)
        return sum(total), out

    rev, out = saved_bytes(True)
    assert type(out.grad_fn).__name__.startswith("_ReversibleFunction")
    assert rev == out.numel() * out.element_size()
    plain, _ = saved_bytes(False)
    assert plain > 5 * depth * out.numel() * out.element_size()  # >= 2 MBConvs' internals per coupling


def test_frozen_parameters_get_no_gradient():
    seq, x, w = make("2d")
    for p in seq.blocks[0].f.parameters():
        p.requires_grad_(False)
    _, gx_r, gp_r = step(seq, x, w, reversible=True)
    _, gx_p, gp_p = step(seq, x, w, reversible=False)
    assert rel(gx_r, gx_p) <= 1e-10
    for p, a, b in zip(seq.parameters(), gp_r, gp_p):
        assert (a is None) == (b is None) == (not p.requires_grad)
        if a is not None:
            assert rel(a, b) <= 1e-10


def test_backward_twice_with_retain_graph_accumulates():
    seq, x, w = make("2d")
    _, gx_p, gp_p = step(seq, x, w, reversible=False)
    set_reversible(seq, True)
    seq.zero_grad(set_to_none=True)
    out = seq(x.requires_grad_(True))
    out.backward(w, retain_graph=True)
    out.backward(w)
    for p, b in zip(seq.parameters(), gp_p):
        assert rel(p.grad, 2 * b) <= 1e-10


# ----------------------------------------------------------------------------- §1.5 guards


def bn_block(c: int, momentum) -> nn.Module:
    """A 2D F or G with BatchNorm (running statistics)."""
    return nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c, momentum=momentum), nn.ReLU())


@pytest.mark.parametrize("momentum", [0.1, None])
def test_batchnorm_running_stats_update_once_per_step(momentum):
    torch.manual_seed(0)
    seq = ReversibleSequence([AdditiveCoupling(bn_block(4, momentum), bn_block(4, momentum)) for _ in range(2)])
    seq = seq.double().train()
    x, w = torch.randn(4, 8, 6, 6, dtype=torch.float64) + 1.0, torch.randn(4, 8, 6, 6, dtype=torch.float64)
    reference = copy.deepcopy(seq)
    set_reversible(reference, False)
    with torch.no_grad():
        ref_out = reference(x)  # one plain forward: the statistics one training step should leave

    out, _, grads = step(seq, x, w, reversible=True)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-14)
    bns = [m for m in seq.modules() if isinstance(m, nn.BatchNorm2d)]
    ref_bns = [m for m in reference.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 4
    for bn, ref in zip(bns, ref_bns):
        assert bn.num_batches_tracked.item() == 1
        assert bn.running_mean.abs().max() > 1e-3  # updated at all
        torch.testing.assert_close(bn.running_mean, ref.running_mean, rtol=0, atol=1e-14)
        torch.testing.assert_close(bn.running_var, ref.running_var, rtol=0, atol=1e-14)
    # and the gradients (batch statistics in the recomputation) are the plain ones
    _, _, plain = step(reference, x, w, reversible=False)
    for a, b in zip(grads, plain):
        assert rel(a, b) <= 1e-10


def test_frozen_running_stats_restores_buffers():
    bn = nn.BatchNorm1d(3).train()
    with frozen_running_stats(bn):
        bn(torch.randn(5, 3) + 4)
        assert bn.num_batches_tracked.item() == 1  # inside, BN behaves as usual
    assert bn.num_batches_tracked.item() == 0
    torch.testing.assert_close(bn.running_mean, torch.zeros(3), rtol=0, atol=0)


def dropout_block(c: int) -> nn.Module:
    """A 2D F or G with dropout, i.e. with randomness that must be replayed in backward."""
    return nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.Dropout(0.3), nn.SiLU(), nn.Conv2d(c, c, 1))


def dropout_step(reversible: bool, preserve_rng_state: bool = True):
    """Seeded build + step; also returns the next numbers of the CPU RNG after the step."""
    torch.manual_seed(0)
    seq = ReversibleSequence([AdditiveCoupling(dropout_block(4), dropout_block(4)) for _ in range(2)],
                             preserve_rng_state=preserve_rng_state).double().train()
    x, w = torch.randn(2, 8, 6, 6, dtype=torch.float64), torch.randn(2, 8, 6, 6, dtype=torch.float64)
    torch.manual_seed(1)
    out, gx, gp = step(seq, x, w, reversible)
    return out, gx, gp, torch.rand(4)


def test_dropout_is_replayed_identically():
    out_r, gx_r, gp_r, next_r = dropout_step(True)
    out_p, gx_p, gp_p, next_p = dropout_step(False)
    torch.testing.assert_close(out_r, out_p, rtol=0, atol=0)
    assert rel(gx_r, gx_p) <= 1e-10
    for a, b in zip(gp_r, gp_p):
        assert rel(a, b) <= 1e-10
    torch.testing.assert_close(next_r, next_p, rtol=0, atol=0)  # backward left the caller's RNG stream alone
    # without the replay the recomputed masks differ and the gradients are wrong: the check above has teeth
    _, gx_n, _, _ = dropout_step(True, preserve_rng_state=False)
    assert rel(gx_n, gx_p) > 1e-3


def test_forced_fp32_under_bf16_autocast():
    seq, x, w = make("3d", torch.float32)
    _, gx_ref, gp_ref = step(seq, x, w, reversible=True)
    with torch.no_grad():
        ref = seq(x)
    dtypes = []
    for m in seq.modules():
        if isinstance(m, nn.Conv3d):
            m.register_forward_hook(lambda mod, inp, out: dtypes.append(out.dtype))
    seq.zero_grad(set_to_none=True)
    xg = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert nn.Conv3d(16, 16, 1)(x).dtype == torch.bfloat16  # autocast is on here
        out = seq(xg)
        assert out.dtype == torch.float32
        (out * w).sum().backward()  # backward inside the context: the recomputation must stay fp32 too
        from_bf16 = seq(x.bfloat16())
    n_convs = sum(isinstance(m, nn.Conv3d) for m in seq.modules())
    assert len(dtypes) >= 2 * n_convs + 1  # forward and recomputation both seen
    assert set(dtypes[:-1]) == {torch.float32}
    assert rel(out.detach(), ref) <= 1e-6
    assert rel(xg.grad, gx_ref) <= 1e-5
    for p, b in zip(seq.parameters(), gp_ref):
        assert rel(p.grad, b) <= 1e-5
    with torch.no_grad():
        assert from_bf16.dtype == torch.float32
        assert rel(from_bf16, seq(x.bfloat16().float())) <= 1e-6


def test_gradient_hooks_and_clipping_see_parameter_grads():
    seq, x, w = make("2d")
    _, _, plain = step(seq, x, w, reversible=False)
    params = list(seq.parameters())
    seen = {i: [] for i in range(len(params))}
    accumulated = {i: 0 for i in range(len(params))}
    for i, p in enumerate(params):
        p.register_hook(lambda g, i=i: seen[i].append(g.clone()))
        p.register_post_accumulate_grad_hook(lambda p, i=i: accumulated.__setitem__(i, accumulated[i] + 1))
    scaled = params[0]
    scaled.register_hook(lambda g: 2 * g)
    step(seq, x, w, reversible=True)
    for i in range(len(params)):
        assert len(seen[i]) == 1 and accumulated[i] == 1  # each hook fires exactly once
        assert rel(seen[i][0], plain[i]) <= 1e-10
    assert rel(scaled.grad, 2 * plain[0]) <= 1e-10  # the hook's return value is what lands in .grad

    # clipping: the same total norm and the same clipped gradients as plain autograd
    seq2, _, _ = make("2d")
    step(seq2, x, w, reversible=False)
    norm_p = nn.utils.clip_grad_norm_(seq2.parameters(), 0.5)
    clipped_p = [p.grad.clone() for p in seq2.parameters()]
    step(seq2, x, w, reversible=True)
    norm_r = nn.utils.clip_grad_norm_(seq2.parameters(), 0.5)
    assert norm_p > 0.5 and abs(norm_r - norm_p) <= 1e-10 * norm_p
    for p, b in zip(seq2.parameters(), clipped_p):
        assert rel(p.grad, b) <= 1e-10


class InPlace(nn.Module):
    """A bad F: writes into its input."""

    def forward(self, x):
        return x.mul_(2)


@pytest.mark.parametrize("reversible", [True, False])
def test_in_place_write_on_coupling_input_is_refused(reversible):
    seq = ReversibleSequence([AdditiveCoupling(InPlace(), block2d(2))], reversible=reversible)
    with pytest.raises(RuntimeError, match="in ?place"):  # ours, or autograd's own check on the plain path
        seq(torch.randn(1, 4, 3, 3, requires_grad=True))


def test_in_place_write_on_sequence_output_fails_backward():
    seq, x, w = make("2d")
    out = seq(x.requires_grad_(True))
    out.add_(1)  # the stored output no longer is what the inputs are rebuilt from
    with pytest.raises(RuntimeError, match="inplace"):
        (out * w).sum().backward()


def test_no_grad_and_eval_take_the_plain_path():
    seq, x, _ = make("2d")
    with torch.no_grad():
        out = seq(x)
    assert out.grad_fn is None
    torch.testing.assert_close(seq.inverse(out), x, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- MBConv3d (spec §1.2)


def trace(module: nn.Module, x: torch.Tensor) -> list[nn.Module]:
    """Leaf modules in the order they run."""
    order = []
    hooks = [m.register_forward_hook(lambda m, i, o: order.append(m)) for m in module.modules()
             if not list(m.children()) and not isinstance(m, nn.Identity)]
    module(x)
    for h in hooks:
        h.remove()
    return order


def test_mbconv3d_structure():
    x = torch.randn(1, 8, 4, 4, 4)
    ran = trace(MBConv3d(8, 4), x)
    kinds = [type(m) for m in ran]
    assert kinds == [nn.Conv3d, nn.GroupNorm, nn.SiLU, nn.Conv3d, nn.GroupNorm, nn.SiLU, nn.Conv3d, nn.GroupNorm]
    expand, dw, project = ran[0], ran[3], ran[6]
    assert (expand.in_channels, expand.out_channels, expand.kernel_size) == (8, 32, (1, 1, 1))
    assert (dw.in_channels, dw.out_channels, dw.kernel_size, dw.groups, dw.stride) == (32, 32, (3, 3, 3), 32, (1, 1, 1))
    assert (project.in_channels, project.out_channels, project.kernel_size) == (32, 8, (1, 1, 1))
    assert all(c.bias is None for c in (expand, dw, project))
    assert ran[-1].num_groups == 8  # linear projection: a norm, no activation, ends the block
    assert MBConv3d(8, 4)(x).shape == x.shape
    # t = 1: no expansion conv
    assert [type(m) for m in trace(MBConv3d(8, 1), x)][:3] == [nn.Conv3d, nn.GroupNorm, nn.SiLU]
    assert trace(MBConv3d(8, 1), x)[0].groups == 8
    # SE (EfficientNet): squeeze to max(1, int(0.25 * in_channels)) after the depthwise stage
    se = [m for m in MBConv3d(8, 4, se_ratio=0.25).modules() if isinstance(m, SqueezeExcite) and m.dims == 3]
    assert len(se) == 1 and se[0].reduce.out_channels == 2 and se[0].reduce.in_channels == 32


def test_mbconv3d_coupling_parameter_count_matches_spec():
    # spec §7.1: 4 couplings on 16 channels (F, G: 8 -> 32 -> 8, GN(8)) have 12,160 parameters
    seq = ReversibleSequence([AdditiveCoupling(MBConv3d(8, 4), MBConv3d(8, 4)) for _ in range(4)])
    assert sum(p.numel() for p in seq.parameters()) == 12_160
