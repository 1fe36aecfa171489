"""Training: the optimisation loop and its learning-rate schedule (chapters 3, 4 and 5)."""

from mmlite.train.loop import FitConfig, cycle, fit, warmup_cosine

__all__ = ["FitConfig", "fit", "cycle", "warmup_cosine"]
