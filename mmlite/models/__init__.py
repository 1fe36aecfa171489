"""Complete models assembled from the building blocks (chapters 2, 3, 4.3 and 5).

Models only: the tasks that feed them are in mmlite.tasks, their training in mmlite.recipes, their
evaluation in mmlite.evaluate.
"""

from mmlite.models.dual import DualEncoder
from mmlite.models.matching import MatchingConfig, MatchingModel

__all__ = ["DualEncoder", "MatchingConfig", "MatchingModel"]
