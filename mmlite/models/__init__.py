"""Complete models assembled from the building blocks (chapters 3, 4.3 and 5)."""

from mmlite.models.matching import (MatchingConfig, MatchingModel, evaluate_matching, matching_loss, matching_pairs,
                                   train_matching)

__all__ = ["MatchingConfig", "MatchingModel", "matching_pairs", "matching_loss", "train_matching",
           "evaluate_matching"]
