"""Training: one trainer (trainer.py) for every objective, the tasks it runs (tasks.py), and what it is made of:
config-driven data streams (data.py, sources.py, native.py), the optimizer (optim.py), parallelism applied from
outside (parallelize.py, distributed.py), checkpoints and resume (checkpointing.py, resume.py), the non-finite
guard (guard.py) and metrics (metrics.py)."""

from .guard import TrainingError
from .tasks import train, train_lit

__all__ = ["TrainingError", "train", "train_lit"]
