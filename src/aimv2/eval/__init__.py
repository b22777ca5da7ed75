"""Evaluation of frozen encoders: features (and their cache), probes (the whole protocol, callable in-process),
zero-shot classification with LiT, captioning with a pretraining run's decoder, and reports.

The probe protocol in one call::

    from aimv2.eval import ProbeConfig, load_frozen_encoder, run_probe

    encoder = load_frozen_encoder("runs/tiny-synthetic")
    result = run_probe(encoder, "probe/train", "probe/val", ProbeConfig(method="attentive"))
    result.top1, result.metrics["per_class"]
"""

from .frozen_encoder import FeatureSettings, load_frozen_encoder
from .probe import ProbeConfig
from .probe_protocol import ProbeResult, ProbeSettings, run_probe

__all__ = ["FeatureSettings", "ProbeConfig", "ProbeResult", "ProbeSettings", "load_frozen_encoder", "run_probe"]
