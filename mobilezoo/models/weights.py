"""Reading and writing model weights as safetensors, strictly, with every mismatch named."""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError


class CheckpointError(UserError, ValueError):
    """A weights file that is missing, unreadable, unsafe or does not fit the model."""


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file, or from a plain tensor dict saved by torch (weights only)."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise CheckpointError(f"{path}: no such weights file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    obj = safe_torch_load(path, "checkpoint")
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors")
    return obj


def safe_torch_load(path: Path, what: str):
    """torch.load with weights_only=True; anything else (a pickle carrying code) is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for unsafe or corrupt pickles
        reason = re.sub(r"\x1b\[[0-9;]*m", "", str(e).splitlines()[0])  # torch bolds with ANSI codes
        raise CheckpointError(f"{path}: refused: not a weights-only {what} "
                              f"(pickles carrying code are never loaded): {reason}") from None


def load_weights(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> nn.Module:
    """Load weights into `model`; with `strict`, any missing, unexpected or mis-shaped key is an error."""
    state = read_state_dict(path)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
              for k, v in own.items() if k in state and state[k].shape != v.shape]
    problems = []
    if shapes:
        problems.append("shape mismatch: " + ", ".join(shapes[:10]))
    if strict and missing:
        problems.append(f"missing {len(missing)} keys: " + ", ".join(missing[:10]))
    if strict and unexpected:
        problems.append(f"unexpected {len(unexpected)} keys: " + ", ".join(unexpected[:10]))
    if problems:
        raise CheckpointError(f"{path}: does not fit the model: " + "; ".join(problems))
    model.load_state_dict(state, strict=strict)
    return model


def save_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the model's state dict as safetensors, atomically (temp file + rename)."""
    from safetensors.torch import save_file
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: weights are written as .safetensors files")
    tmp = path.with_name(path.name + ".tmp")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(tmp))
    os.replace(tmp, path)
