"""Model families; importing this registers every model (here and in timm)."""
from . import deeplabv3plus, moat, mobiledet, revunet3d, squeezetime, ssdlite  # noqa: F401  (registers the models)
from .registry import UnknownModelError, create_model, get_entry, list_models
from .weights import CheckpointError, load_weights, save_weights

__all__ = ["create_model", "list_models", "get_entry", "UnknownModelError",
           "load_weights", "save_weights", "CheckpointError"]
