"""The one training / evaluation loop every task uses, with devices, precision, DDP and checkpoints."""
from .loop import Context, evaluate, fit, resolve_device

__all__ = ["Context", "fit", "evaluate", "resolve_device"]
