"""The TuNAS controller (google-research `tunas/`): independent categorical distributions, REINFORCE, EMA baseline.

One logit vector per decision, all zero at the start (uniform sampling). Each update takes one
sampled choice vector and its reward R: advantage = R - baseline, loss = -advantage * log p(choices),
one Adam step with betas (0, 0.999), eps 1e-8; then baseline <- m * baseline + (1 - m) * R
(TuNAS' momentum 0.95). The baseline starts at the first reward, so the first advantage is 0.

`update_group` is the lower-variance variant (an option of the search, not TuNAS'): K >= 2
architectures scored on the *same* reward batch, each one's advantage its reward minus the mean of
the other K - 1 (the leave-one-out baseline, still unbiased). The difficulty of the batch, which
moves every architecture's loss alike and is most of a one-batch reward's variance, cancels.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..errors import UserError


def abs_reward(quality: float, latency: float, target: float, tau: float) -> float:
    """TuNAS' absolute-value reward R = quality + tau * |latency / target - 1| (tau < 0)."""
    if tau >= 0:
        raise UserError(f"tau must be negative (it trades quality for latency), got {tau}")
    if target <= 0:
        raise UserError(f"latency target must be positive, got {target}")
    return quality + tau * abs(latency / target - 1)


class Controller(nn.Module):
    """Independent categorical distributions over decisions of the given sizes, trained by REINFORCE."""

    def __init__(self, sizes: list[int], lr: float = 5e-3, baseline_momentum: float = 0.95):
        super().__init__()
        if not sizes or any(n < 1 for n in sizes):
            raise UserError(f"every decision needs at least one option, got sizes {sizes}")
        self.logits = nn.ParameterList(nn.Parameter(torch.zeros(n)) for n in sizes)
        self.momentum = baseline_momentum
        self.register_buffer("baseline", torch.zeros(()))
        self.register_buffer("has_baseline", torch.zeros((), dtype=torch.bool))
        self.optimizer = torch.optim.Adam(self.parameters(), lr=lr, betas=(0.0, 0.999), eps=1e-8)

    def probs(self) -> list[list[float]]:
        """Current probabilities of every option of every decision."""
        return [torch.softmax(lg.detach(), 0).tolist() for lg in self.logits]

    def sample(self, generator: torch.Generator | None = None) -> list[int]:
        """A choice vector drawn from the current distributions."""
        return [int(torch.multinomial(torch.softmax(lg.detach(), 0), 1, generator=generator)) for lg in self.logits]

    def log_prob(self, choices: list[int]) -> torch.Tensor:
        """log p(choices), differentiable in the logits."""
        return sum(torch.log_softmax(lg, 0)[c] for lg, c in zip(self.logits, choices))

    def argmax(self) -> list[int]:
        """The most likely option of each decision (the final architecture of a search)."""
        return [int(lg.detach().argmax()) for lg in self.logits]

    def most_likely_within(self, latency, target: float, tolerance: float, samples: int = 2000,
                           seed: int = 0) -> tuple[list[int], bool]:
        """The most likely architecture whose `latency(choices)` is within `tolerance` of `target`.

        Candidates: the argmax and `samples` draws from the controller. After a short search the
        distributions are still broad and their per-decision argmax can land far from the target
        (each decision's mode ignores the others); the best-scoring candidate that meets the
        target is what the search has learnt. Returns (choices, met); met is False when no
        candidate is within tolerance (then the argmax)."""
        g = torch.Generator().manual_seed(seed)
        best, best_lp = None, -float("inf")
        with torch.no_grad():
            for c in [self.argmax()] + [self.sample(g) for _ in range(samples)]:
                if abs(latency(c) / target - 1) <= tolerance:
                    lp = float(self.log_prob(c))
                    if lp > best_lp:
                        best, best_lp = c, lp
        return (best, True) if best is not None else (self.argmax(), False)

    def update(self, choices: list[int], reward: float, lr_scale: float = 1.0) -> float:
        """One REINFORCE step on one sample; returns the advantage used."""
        if not bool(self.has_baseline):  # the first advantage is 0
            self.baseline.fill_(reward)
            self.has_baseline.fill_(True)
        advantage = float(reward - self.baseline)
        self._step([choices], [advantage], lr_scale)
        self._track_baseline(reward)
        return advantage

    def update_group(self, choices: list[list[int]], rewards: list[float], lr_scale: float = 1.0) -> list[float]:
        """One REINFORCE step on K >= 2 samples scored on one batch, leave-one-out baseline; returns
        the advantages. The EMA baseline follows the mean reward (for `update` and the log)."""
        k = len(choices)
        if k < 2 or len(rewards) != k:
            raise UserError(f"update_group needs K >= 2 samples and as many rewards, got {k} and {len(rewards)}")
        total = sum(rewards)
        advantages = [r - (total - r) / (k - 1) for r in rewards]
        self._step(choices, advantages, lr_scale)
        self._track_baseline(total / k)
        return advantages

    def _step(self, choices: list[list[int]], advantages: list[float], lr_scale: float) -> None:
        """One Adam step on the loss -mean(advantage * log p(choices))."""
        for g in self.optimizer.param_groups:
            g.setdefault("base_lr", g["lr"])
            g["lr"] = g["base_lr"] * lr_scale
        self.optimizer.zero_grad()
        (-sum(a * self.log_prob(c) for a, c in zip(advantages, choices)) / len(choices)).backward()
        self.optimizer.step()

    def _track_baseline(self, reward: float) -> None:
        """EMA of the rewards; it starts at the first one."""
        if not bool(self.has_baseline):
            self.baseline.fill_(reward)
            self.has_baseline.fill_(True)
        self.baseline.mul_(self.momentum).add_((1 - self.momentum) * reward)

    def full_state(self) -> dict:
        """Logits, baseline and Adam state (for resumable searches); a copy, not views of live tensors."""
        return copy.deepcopy({"module": self.state_dict(), "optimizer": self.optimizer.state_dict()})

    def load_full_state(self, state: dict) -> None:
        """Restore what `full_state` returned."""
        self.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
