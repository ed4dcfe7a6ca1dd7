"""Run-directory checkpoints: weights as safetensors, trainer state loaded with weights_only=True."""
from __future__ import annotations

import os
import random
from pathlib import Path

import torch

from ..models.weights import CheckpointError, load_weights, safe_torch_load, save_weights

WEIGHTS, EMA_WEIGHTS, STATE = "model.safetensors", "model_ema.safetensors", "trainer_state.pt"


def save_checkpoint(run_dir: Path, model, optimizer, scheduler, epoch: int, step: int,
                    ema=None, extra: dict | None = None) -> None:
    """Write weights and trainer state atomically (temp file + rename), weights last-but-one."""
    save_weights(model, run_dir / WEIGHTS)
    if ema is not None:
        save_weights(ema.module, run_dir / EMA_WEIGHTS)
    state = {
        "epoch": epoch, "step": step,
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "rng_torch": torch.get_rng_state(), "rng_python": random.getstate(),
        "extra": extra or {},
    }
    if ema is not None:
        state["ema_n_averaged"] = ema.n_averaged
    tmp = run_dir / (STATE + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, run_dir / STATE)


def load_checkpoint(run_dir: Path, model, optimizer, scheduler, ema=None) -> dict:
    """Restore everything `save_checkpoint` wrote; returns the trainer state dict."""
    path = run_dir / STATE
    if not path.is_file():
        raise CheckpointError(f"{path}: no trainer state to resume from")
    state = safe_torch_load(path, "trainer state")
    load_weights(model, run_dir / WEIGHTS)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if ema is not None and (run_dir / EMA_WEIGHTS).is_file():
        load_weights(ema.module, run_dir / EMA_WEIGHTS)
        ema.n_averaged.copy_(state.get("ema_n_averaged", ema.n_averaged))
    torch.set_rng_state(state["rng_torch"])
    random.setstate(_as_tuple(state["rng_python"]))
    return state


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x
