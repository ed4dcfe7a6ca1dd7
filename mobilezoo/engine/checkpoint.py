"""Run-directory checkpoints: weights as safetensors, trainer state loaded with weights_only=True.

An epoch's checkpoint is one unit. Its files are first written beside the current ones
(`*.tmp`), the trainer state last as `trainer_state.pt.pending`, holding the SHA-256 of every
weights file it belongs to; then the weights are renamed into place and the state's rename
commits the checkpoint. A run killed (or a disk that fills) anywhere in between leaves either
the previous checkpoint untouched or a complete pending state whose weights are all on disk,
which `load_checkpoint` finishes committing. A state whose weights do not match it is refused.
"""
from __future__ import annotations

import hashlib
import io
import os
import random
from pathlib import Path

import torch

from ..models.weights import CheckpointError, load_weights, safe_torch_load

WEIGHTS, EMA_WEIGHTS, STATE = "model.safetensors", "model_ema.safetensors", "trainer_state.pt"
PENDING = STATE + ".pending"
RUN_FILES = (WEIGHTS, EMA_WEIGHTS, STATE, PENDING, WEIGHTS + ".tmp", EMA_WEIGHTS + ".tmp", "metrics.jsonl")


def _tensor_bytes(module: torch.nn.Module) -> bytes:
    from safetensors.torch import save
    return save({k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()})


def _write(path: Path, data: bytes) -> None:
    """Write and flush to the disk, so that a rename after it never exposes a partial file."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _digest(path: Path) -> str | None:
    if not path.is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def save_checkpoint(run_dir: Path, model, optimizer, scheduler, epoch: int, step: int,
                    ema=None, extra: dict | None = None) -> None:
    """Write the weights (and EMA weights) and the trainer state as one unit (see the module doc).

    A write that fails (full disk, read-only folder) removes what it wrote, keeps the previous
    checkpoint intact and raises a CheckpointError naming the file."""
    run_dir = Path(run_dir)
    modules = {WEIGHTS: model, **({EMA_WEIGHTS: ema.module} if ema is not None else {})}
    state = {
        "epoch": epoch, "step": step,
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "rng_torch": torch.get_rng_state(), "rng_python": random.getstate(),
        "extra": extra or {}, "weights_sha256": {},
    }
    if ema is not None:
        state["ema_n_averaged"] = ema.n_averaged
    written: list[Path] = []
    path = run_dir / PENDING
    try:
        for name, module in modules.items():
            data = _tensor_bytes(module)
            state["weights_sha256"][name] = hashlib.sha256(data).hexdigest()
            path = run_dir / (name + ".tmp")
            written.append(path)
            _write(path, data)
        buffer = io.BytesIO()
        torch.save(state, buffer)
        path = run_dir / PENDING
        written.append(path)
        _write(path, buffer.getvalue())
    except OSError as e:
        for p in written:
            p.unlink(missing_ok=True)
        raise CheckpointError(f"{path}: cannot write the epoch-{epoch} checkpoint ({e.strerror or e}); "
                              f"the previous checkpoint in {run_dir} is kept") from None
    _commit(run_dir, state["weights_sha256"])


def _commit(run_dir: Path, digests: dict[str, str]) -> None:
    """Rename the written weights into place, then the pending state: the state's rename commits."""
    for name in digests:
        tmp = run_dir / (name + ".tmp")
        if tmp.is_file():
            os.replace(tmp, run_dir / name)
    os.replace(run_dir / PENDING, run_dir / STATE)


def _finish_pending(run_dir: Path) -> None:
    """Commit a pending checkpoint whose weights are all on disk (killed between the renames);
    otherwise (killed while writing) drop it and its files: the previous checkpoint stands."""
    pending = run_dir / PENDING
    if not pending.is_file():
        return
    try:
        digests = safe_torch_load(pending, "trainer state").get("weights_sha256", {})
    except CheckpointError:
        digests = None
    complete = digests and all(d in (_digest(run_dir / (n + ".tmp")), _digest(run_dir / n))
                               for n, d in digests.items())
    if complete:
        _commit(run_dir, digests)
        return
    for name in (PENDING, WEIGHTS + ".tmp", EMA_WEIGHTS + ".tmp"):
        (run_dir / name).unlink(missing_ok=True)


def checkpoint_epoch(run_dir: Path) -> int | None:
    """The epoch of the run's last committed checkpoint, or None if it has none."""
    run_dir = Path(run_dir)
    _finish_pending(run_dir)
    path = run_dir / STATE
    return safe_torch_load(path, "trainer state")["epoch"] if path.is_file() else None


def load_checkpoint(run_dir: Path, model, optimizer, scheduler, ema=None) -> dict:
    """Restore everything `save_checkpoint` wrote, after checking that the weights on disk are the
    ones the trainer state was saved with; returns the trainer state dict."""
    run_dir = Path(run_dir)
    _finish_pending(run_dir)
    path = run_dir / STATE
    if not path.is_file():
        raise CheckpointError(f"{path}: no trainer state to resume from")
    state = safe_torch_load(path, "trainer state")
    for name, digest in state.get("weights_sha256", {}).items():
        if _digest(run_dir / name) != digest:
            raise CheckpointError(f"{run_dir / name}: not the weights the trainer state of epoch {state['epoch']} "
                                  f"was saved with (changed or replaced since); refusing to resume from a "
                                  f"mismatched pair")
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
