"""AIMv2 models: the vision encoder, the multimodal decoder and the pretraining objective.

Pure ``nn.Module``s and their configs: nothing here reads or writes files (loading weights is ``aimv2.weights``).
"""

from .decoder import DecoderConfig, MultimodalDecoder
from .encoder import EncoderConfig, VisionEncoder
from .pretrain import AIMv2Pretrainer, PrefixSampler, PretrainOutput, create_pretraining_model
from .registry import SIZES, build_encoder, list_models, model_config, model_size, parse_model_name

__all__ = [
    "SIZES",
    "AIMv2Pretrainer",
    "DecoderConfig",
    "MultimodalDecoder",
    "PrefixSampler",
    "PretrainOutput",
    "create_pretraining_model",
    "model_size",
    "EncoderConfig",
    "VisionEncoder",
    "build_encoder",
    "list_models",
    "model_config",
    "parse_model_name",
]
