"""AIMv2 models: pure modules (the vision encoder, the multimodal decoder, the text tower, pooling heads, sizes)
and their configs: nothing here reads or writes files (loading weights is ``aimv2.weights``)."""

from .decoder import DecoderConfig, MultimodalDecoder
from .encoder import EncoderConfig, VisionEncoder
from .registry import SIZES, build_encoder, list_models, model_config, model_size, parse_model_name

__all__ = [
    "SIZES",
    "DecoderConfig",
    "MultimodalDecoder",
    "model_size",
    "EncoderConfig",
    "VisionEncoder",
    "build_encoder",
    "list_models",
    "model_config",
    "parse_model_name",
]
