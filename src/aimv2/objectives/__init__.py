"""Objectives: model parts + loss, one module per kind of training (objectives/base.py says what they share).

aimv2.py       AIMv2: prefix encoder + one causal multimodal decoder, next patch + next token
generative.py  the paper's generative baselines: captioning (Cap), image-only (AIMv1), separate decoders
distill.py     a student encoder on a frozen teacher encoder's patch features (+ optionally AIMv2)
lit.py         two contrastive towers: LiT (frozen encoder) and the CLIP baseline
build.py       the objective a run config describes
"""

from .aimv2 import AIMv2Pretrainer, PrefixSampler, PretrainOutput, create_pretraining_model
from .base import LossTerms
from .build import build_lit_model, build_model
from .distill import Distiller
from .generative import OBJECTIVES, GenerativeBaseline, create_baseline_model
from .lit import CLIPBaseline, LiT, LiTConfig, LiTOutput, LiTTower, contrastive_loss

__all__ = [
    "OBJECTIVES",
    "AIMv2Pretrainer",
    "CLIPBaseline",
    "Distiller",
    "GenerativeBaseline",
    "LiT",
    "LiTConfig",
    "LiTOutput",
    "LiTTower",
    "LossTerms",
    "PrefixSampler",
    "PretrainOutput",
    "build_lit_model",
    "build_model",
    "contrastive_loss",
    "create_baseline_model",
    "create_pretraining_model",
]
