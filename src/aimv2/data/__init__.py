"""Data: image transforms (uint8 out), local image folders, and the pretraining data pipelines."""
