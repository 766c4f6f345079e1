"""ssamba: self-supervised audio representation learning with bidirectional Mamba and SSAST."""
from .api import load, save_pretrained
from .models import build_encoder, encoder_from_config, list_models

__version__ = "0.1.0"
__all__ = ["build_encoder", "encoder_from_config", "list_models", "load", "save_pretrained", "__version__"]
