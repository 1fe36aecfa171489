"""Complete models assembled from the building blocks (chapters 2, 3, 4.3 and 5)."""

from mmlite.models.dual import DualEncoder, dual_loss, embed_split, train_dual_encoder
from mmlite.models.matching import (MatchingConfig, MatchingModel, evaluate_matching, matching_loss, matching_pairs,
                                   score_pairs, train_matching)

__all__ = ["DualEncoder", "dual_loss", "train_dual_encoder", "embed_split", "MatchingConfig", "MatchingModel", "matching_pairs", "matching_loss", "train_matching",
           "evaluate_matching", "score_pairs"]
