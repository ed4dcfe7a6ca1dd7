"""Interleaved timing of many configurations ("cells") in one process, and how a cell runs torch."""
from __future__ import annotations

import copy
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn

from .timing import interleaved_rounds, share, time_calls


@dataclass(eq=False)
class Cell:
    """One timed configuration: the callable, its batch-1 input and optional batch input, how many
    timed runs of each it gets in all, its wall times in seconds, and the suite's own fields."""

    run: Callable[[object], object]
    x1: object
    xb: object = None
    n1: int = 0
    nb: int = 0
    info: dict = field(default_factory=dict)
    lat: list[float] = field(default_factory=list)
    bat: list[float] = field(default_factory=list)


def time_interleaved(cells: Sequence[Cell], rounds: int, *, warm_each_round: bool = False,
                     pause: Callable[[], None] | None = None, log: Callable[[str], None] | None = None) -> None:
    """Time every cell over `rounds` interleaved rounds, its `n1` batch-1 and `nb` batch runs spread over
    them. `pause` runs before each cell's chunk (e.g. to wait for an idle CPU); `warm_each_round` gives
    each cell one untimed call first, as its caches went cold while the others ran."""
    for i, order in interleaved_rounds(cells, rounds):
        for c in order:
            if pause is not None:
                pause()
            if warm_each_round:
                c.run(c.x1)
            c.lat += time_calls(c.run, c.x1, share(c.n1, rounds, i))
            if c.xb is not None:
                c.bat += time_calls(c.run, c.xb, share(c.nb, rounds, i))
        if log is not None:
            log(f"round {i + 1}/{rounds} done")


def inference(net: Callable, bf16_autocast: bool = False) -> Callable[[object], object]:
    """A callable that runs `net` under inference mode (and CPU bf16 autocast when asked)."""
    def run(x):
        with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16) if bf16_autocast else nullcontext():
            return net(x)
    return run


def bf16_cell_parts(model: nn.Module, network: Callable[[nn.Module], Callable], x1: torch.Tensor, xb,
                    autocast: bool, memory_format: torch.memory_format | None = None):
    """(run, x1, xb) of a bf16 cell: a copy of `model` with bfloat16 weights (in `memory_format`) on
    bfloat16 inputs, as a bf16 deployment runs (autocast would re-cast every weight on every call); with
    `autocast`, the fp32 model under autocast instead."""
    if autocast:
        return inference(network(model), bf16_autocast=True), x1, xb
    copy16 = copy.deepcopy(model).to(torch.bfloat16)
    if memory_format is not None:
        copy16 = copy16.to(memory_format=memory_format)
    return inference(network(copy16)), x1.bfloat16(), None if xb is None else xb.bfloat16()
