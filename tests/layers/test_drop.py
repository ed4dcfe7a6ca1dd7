"""Stochastic depth and its schedule (spec §1.5)."""
import pytest
import torch

from mobilezoo.layers import DropPath, drop_path, survival_schedule


@pytest.mark.parametrize("rate, n", [(0.2, 14), (0.7, 44), (0.1, 1)])
def test_survival_schedule_is_rate_i_over_n(rate, n):
    s = survival_schedule(rate, n)
    assert len(s) == n
    assert s[0] == 1.0
    assert s[-1] == pytest.approx(1 - rate * (n - 1) / n)
    assert s == pytest.approx([1 - rate * i / n for i in range(n)])


def test_survival_schedule_is_not_linspace():
    s = survival_schedule(0.2, 14)
    linspace = [1 - x for x in torch.linspace(0, 0.2, 14).tolist()]
    assert s[-1] != pytest.approx(linspace[-1])  # 1 - 0.2*13/14, not 0.8


def test_drop_path_identity_in_eval_and_for_zero():
    x = torch.randn(8, 3, 4, 4)
    torch.testing.assert_close(drop_path(x, 0.5, training=False), x, rtol=0, atol=0)
    torch.testing.assert_close(drop_path(x, 0.0, training=True), x, rtol=0, atol=0)
    m = DropPath(0.5).eval()
    torch.testing.assert_close(m(x), x, rtol=0, atol=0)
    torch.testing.assert_close(DropPath(0.0).train()(x), x, rtol=0, atol=0)


def test_drop_path_zero_survival_is_noop():
    # spec §1.5: "drop path does nothing unless 0 < survival < 1" (survival 0 <=> drop_prob 1)
    x = torch.randn(8, 3)
    torch.testing.assert_close(drop_path(x, 1.0, training=True), x, rtol=0, atol=0)


def test_drop_path_training_drops_whole_samples_and_keeps_expectation():
    torch.manual_seed(0)
    p, n = 0.3, 20000
    x = torch.ones(n, 3, 2, 2)
    y = DropPath(p).train()(x)
    per_sample = y.flatten(1)
    # every sample is either all zero or all scaled by 1 / (1 - p)
    zero = (per_sample == 0).all(1)
    kept = torch.isclose(per_sample, torch.tensor(1 / (1 - p))).all(1)
    assert bool((zero | kept).all())
    assert kept.float().mean().item() == pytest.approx(1 - p, abs=0.015)
    assert y.mean().item() == pytest.approx(1.0, abs=0.02)
    assert 0 < zero.sum() < n
