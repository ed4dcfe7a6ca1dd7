"""Controller: REINFORCE with an EMA baseline converges to the best choice on a toy reward."""
import pytest
import torch

from mobilezoo.errors import UserError
from mobilezoo.nas.controller import Controller, abs_reward


def test_converges_to_the_best_choice_on_a_toy_reward():
    best = [2, 0, 4]
    ctl = Controller([3, 2, 5], lr=0.05)
    gen = torch.Generator().manual_seed(0)
    for _ in range(600):
        c = ctl.sample(gen)
        reward = sum(float(a == b) for a, b in zip(c, best)) + 0.1 * torch.randn((), generator=gen).item()
        ctl.update(c, reward)
    assert ctl.argmax() == best
    assert all(p[b] > 0.9 for p, b in zip(ctl.probs(), best))


def test_leave_one_out_advantages_by_hand():
    ctl = Controller([2, 3])
    adv = ctl.update_group([[0, 0], [1, 2], [0, 1]], [1.0, 4.0, 7.0])
    assert adv == pytest.approx([1.0 - 5.5, 4.0 - 4.0, 7.0 - 2.5])
    assert float(ctl.baseline) == pytest.approx(4.0)  # starts at the first group's mean
    with pytest.raises(UserError, match="K >= 2"):
        ctl.update_group([[0, 0]], [1.0])


def test_group_update_cancels_the_noise_shared_by_a_batch():
    # Each reward batch shifts every architecture's reward alike, by 20x the quality differences;
    # scored on the same batch, the leave-one-out advantages see only the differences.
    best = [2, 0, 4]
    ctl = Controller([3, 2, 5], lr=0.05)
    gen = torch.Generator().manual_seed(0)
    for _ in range(150):
        group = [ctl.sample(gen) for _ in range(4)]
        batch_shift = 20.0 * torch.randn((), generator=gen).item()
        ctl.update_group(group, [sum(float(a == b) for a, b in zip(c, best)) + batch_shift for c in group])
    assert ctl.argmax() == best
    assert all(p[b] > 0.9 for p, b in zip(ctl.probs(), best))


def test_latency_reward_finds_the_option_nearest_the_target():
    # One decision: option latencies 10, 20, 30 ms with equal quality; target 20 ms.
    ctl = Controller([3], lr=0.05)
    gen = torch.Generator().manual_seed(1)
    for _ in range(400):
        c = ctl.sample(gen)
        ctl.update(c, abs_reward(1.0, [10.0, 20.0, 30.0][c[0]], 20.0, tau=-1.0))
    assert ctl.argmax() == [1]


def test_adam_settings_baseline_and_state_round_trip():
    ctl = Controller([2, 3])
    g = ctl.optimizer.param_groups[0]
    assert g["betas"] == (0.0, 0.999) and g["eps"] == 1e-8 and g["lr"] == 5e-3
    assert ctl.update([0, 1], 2.0) == 0.0  # the baseline starts at the first reward
    assert ctl.update([0, 1], 3.0) == pytest.approx(1.0)
    assert float(ctl.baseline) == pytest.approx(0.95 * 2.0 + 0.05 * 3.0)
    other = Controller([2, 3])
    other.load_full_state(ctl.full_state())
    gen_a, gen_b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for _ in range(3):
        ca, cb = ctl.sample(gen_a), other.sample(gen_b)
        assert ca == cb
        ctl.update(ca, 1.0)
        other.update(cb, 1.0)
    for a, b in zip(ctl.logits, other.logits):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_reward_formula_and_tau_sign():
    assert abs_reward(0.5, 30.0, 20.0, -0.2) == pytest.approx(0.5 - 0.2 * 0.5)
    assert abs_reward(0.5, 10.0, 20.0, -0.2) == pytest.approx(0.5 - 0.2 * 0.5)
    with pytest.raises(UserError, match="tau must be negative"):
        abs_reward(0.5, 10.0, 20.0, 0.1)


def test_final_architecture_is_the_most_likely_one_within_the_latency_target():
    import itertools
    c = Controller([3, 3, 3])
    with torch.no_grad():  # every decision prefers option 0 (latency 0): the argmax misses the target
        for lg in c.logits:
            lg.copy_(torch.tensor([1.0, 0.5, 0.0]))
    latency = lambda ch: 10.0 + 10.0 * sum(ch)  # noqa: E731  ms
    assert latency(c.argmax()) == 10.0
    choice, met = c.most_likely_within(latency, target=40.0, tolerance=0.1, samples=500)
    feasible = [list(x) for x in itertools.product(range(3), repeat=3) if abs(latency(x) / 40 - 1) <= 0.1]
    best = max(feasible, key=lambda x: float(c.log_prob(x)))
    assert met and latency(choice) == 40.0 and float(c.log_prob(choice)) == float(c.log_prob(best))
    assert c.most_likely_within(latency, target=1000.0, tolerance=0.1) == (c.argmax(), False)
