"""mobilezoo: efficient vision models (MOAT, MobileDets, SqueezeTime, reversible 3D U-Net) end to end."""
import logging

from .models import create_model, list_models

# MONAI's networks import transformers where installed (the LiteRT extra brings it), which imports
# torchao, whose registrations make torch log two deprecation warnings on every run that uses MONAI.
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)

__version__ = "0.1.0"
__all__ = ["create_model", "list_models", "__version__"]
