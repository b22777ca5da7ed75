"""aimv2: AIMv2 multimodal autoregressive pre-training of vision encoders, in PyTorch."""

from .models import EncoderConfig, VisionEncoder, create_model, list_models

__version__ = "0.1.0"

__all__ = ["EncoderConfig", "VisionEncoder", "__version__", "create_model", "list_models"]
