"""mobilezoo: efficient vision models (MOAT, MobileDets, SqueezeTime, reversible 3D U-Net) end to end."""
from .models import create_model, list_models

__version__ = "0.1.0"
__all__ = ["create_model", "list_models", "__version__"]
