"""AIMv2 models: pure modules (the vision encoder, the multimodal decoder, the text tower, pooling heads, sizes)."""

from .decoder import DecoderConfig, MultimodalDecoder
from .encoder import EncoderConfig, VisionEncoder
from .registry import SIZES, build_encoder, list_models, model_config, model_size, parse_model_name


def create_model(name: str, *, checkpoint=None, **overrides) -> VisionEncoder:
    """The AIMv2 vision encoder ``name`` (``aimv2-{size}-patch{p}-{res|native}``).

    checkpoint: a ``.safetensors`` file in Apple's, transformers' or our layout, a transformers
        ``save_pretrained`` folder, or a training run folder; the layout is detected and every key
        must match (no silent partial load).
    overrides: config fields, e.g. ``img_size=336`` (learned position embeddings are resized on load)
        or ``depth=6``.
    """
    if checkpoint is None:
        return build_encoder(name, **overrides)
    from ..checkpoints import load_encoder_checkpoint

    return load_encoder_checkpoint(checkpoint, name=name, **overrides)


__all__ = [
    "SIZES",
    "DecoderConfig",
    "MultimodalDecoder",
    "model_size",
    "EncoderConfig",
    "VisionEncoder",
    "build_encoder",
    "create_model",
    "list_models",
    "model_config",
    "parse_model_name",
]
