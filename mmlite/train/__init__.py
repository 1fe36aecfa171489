"""Training: the optimisation loop, its learning-rate schedule and parameter groups (chapters 3, 4 and 5)."""

from mmlite.train.groups import param_groups, uses_weight_decay
from mmlite.train.loop import FitConfig, cycle, fit, warmup_cosine
from mmlite.train.modes import evaluating

__all__ = ["FitConfig", "fit", "cycle", "warmup_cosine", "param_groups", "uses_weight_decay", "evaluating"]
