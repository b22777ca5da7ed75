"""Evaluation of frozen encoders: feature extraction (with an on-disk cache) and probes."""
