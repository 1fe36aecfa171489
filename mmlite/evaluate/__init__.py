"""Evaluation: trained models run over a split, scored by mmlite.metrics (chapters 3-8)."""

from mmlite.evaluate.embeddings import embed_split
from mmlite.evaluate.matching import evaluate_matching, score_pairs

__all__ = ["embed_split", "evaluate_matching", "score_pairs"]
