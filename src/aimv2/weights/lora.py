"""LoRA on a VLM's language model, through peft (the field's implementation): stage 2 trains the projector and
rank-r adapters instead of the whole LM (``vlm.lora.rank`` > 0).

The adapters are applied to ``model.lm`` after the VLM is built (and after stage 1's projector is read), so the
LM's own weights keep their values and stay frozen; peft marks only the adapters trainable. The trainer then sees
one more module tree: its checkpoints hold the adapters with everything else, and ``vlm.safetensors`` (the
parameters that train, weights/lm.py) holds the projector and the adapters, under peft's names
(``lm.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight``). :func:`merge_lora` folds them into
the LM's weights (W + B A * alpha / r) for export.
"""

from __future__ import annotations

from torch import nn

from .errors import CheckpointError


def _peft():
    try:
        import peft
    except ImportError as e:  # pragma: no cover - the vlm and test extras install it
        raise CheckpointError("vlm.lora needs peft: pip install 'peft==0.21.2'") from e
    return peft


def apply_lora(model: nn.Module, rank: int, alpha: float, dropout: float, target_modules) -> nn.Module:
    """Wrap ``model.lm`` (a transformers causal LM) in peft's LoRA; returns ``model``."""
    peft = _peft()
    config = peft.LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, task_type="CAUSAL_LM"
    )
    try:
        model.lm = peft.get_peft_model(model.lm, config)
    except ValueError as e:  # peft's words: no default target modules for this LM, or none of the names matched
        raise CheckpointError(
            f"vlm.lora: {e} (set vlm.lora.target_modules, e.g. [q_proj, v_proj] or all-linear)"
        ) from None
    return model


def has_lora(model: nn.Module) -> bool:
    return hasattr(model.lm, "merge_and_unload")


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold the adapters into the LM's weights and drop them (in place): ``model.lm`` is the plain LM again."""
    if has_lora(model):
        model.lm = model.lm.merge_and_unload()
    return model
