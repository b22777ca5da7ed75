"""aimv2: AIMv2 multimodal autoregressive pre-training of vision encoders, in PyTorch."""

from .models import EncoderConfig, VisionEncoder, list_models
from .objectives import PretrainOutput, create_pretraining_model
from .weights import create_model, preprocessing

__version__ = "0.1.0"

__all__ = [
    "EncoderConfig",
    "PretrainOutput",
    "VisionEncoder",
    "__version__",
    "create_model",
    "create_pretraining_model",
    "list_models",
    "preprocessing",
]
