"""Tasks: a data-world batch turned into model inputs and a loss, the only layer that knows both (chapters 2-5)."""

from mmlite.tasks.albef import ALBEFObjectives, ALBEFPretraining, add_truth, albef_loss
from mmlite.tasks.contrastive import dual_loss
from mmlite.tasks.matching import matching_loss, matching_pairs, pair_loss

__all__ = ["ALBEFObjectives", "ALBEFPretraining", "add_truth", "albef_loss", "dual_loss", "matching_pairs", "matching_loss", "pair_loss"]
