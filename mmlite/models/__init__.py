"""Complete models assembled from the building blocks (chapters 2, 3, 4.3 and 5).

Models only: the tasks that feed them are in mmlite.tasks, their training in mmlite.recipes, their
evaluation in mmlite.evaluate.
"""

from mmlite.models.albef import ALBEF, ALBEFConfig
from mmlite.models.caption import TextDecoder
from mmlite.models.decoding import beam_search, greedy_decode
from mmlite.models.dual import DualEncoder
from mmlite.models.matching import MatchingConfig, MatchingModel

__all__ = ["ALBEF", "ALBEFConfig", "TextDecoder", "greedy_decode", "beam_search", "DualEncoder", "MatchingConfig", "MatchingModel"]
