"""Evaluation metrics, each written here from tensor or Python operations (used from chapter 5 on).

One module per family: retrieval, classification, vqa, captioning, scene (exact scoring against the
world's truth), binding, stats (bootstrap intervals, paired tests) and efficiency.
"""

from mmlite.metrics.binding import (CHANCE_GROUP, CHANCE_IMAGE, CHANCE_TEXT, WinogroundGroups, binding_accuracy,
                                    score_groups, winoground_groups, winoground_scores)
from mmlite.metrics.captioning import bleu, bleu_from_statistics, bleu_statistics, cider_d
from mmlite.metrics.classification import (CalibrationBins, accuracy, calibration_bins, confusion_matrix,
                                          expected_calibration_error, per_class_accuracy, roc_auc)
from mmlite.metrics.efficiency import (FlopCount, Latency, PeakMemory, attention_flops, cnn_encoder_flops,
                                      conv2d_flops, decoder_block_flops, encoder_block_flops, feed_forward_flops,
                                      gru_flops, latency, linear_flops, measured_flops, parameter_count, peak_memory,
                                      training_flops_rule, transformer_text_encoder_flops, vit_encoder_flops)
from mmlite.metrics.retrieval import (Reranked, as_fraction_of_ceiling, recall_ceiling, rerank_topk,
                                     retrieval_per_query, retrieval_recall, truth_matrix)
from mmlite.metrics.scene import (caption_mentions, caption_precision, caption_recall, hallucination, pope_summary,
                                  pope_yes_ratio)
from mmlite.metrics.stats import Interval, PairedResult, bootstrap_ci, format_ci, paired_test
from mmlite.metrics.vqa import normalize_answer, vqa_exact_accuracy, vqa_soft_accuracy, vqa_soft_score

__all__ = [
    # retrieval, classification, stats, efficiency
    "retrieval_recall", "retrieval_per_query", "rerank_topk", "Reranked", "recall_ceiling", "truth_matrix",
    "as_fraction_of_ceiling",
    "accuracy", "per_class_accuracy", "confusion_matrix", "roc_auc", "calibration_bins", "CalibrationBins",
    "expected_calibration_error",
    "bootstrap_ci", "paired_test", "format_ci", "Interval", "PairedResult",
    "parameter_count", "measured_flops", "FlopCount", "training_flops_rule", "linear_flops", "attention_flops",
    "feed_forward_flops", "encoder_block_flops", "decoder_block_flops", "conv2d_flops", "cnn_encoder_flops",
    "vit_encoder_flops", "transformer_text_encoder_flops", "gru_flops", "latency", "Latency", "peak_memory",
    "PeakMemory",
    # captioning, vqa, scene, binding
    "bleu", "bleu_statistics", "bleu_from_statistics", "cider_d",
    "normalize_answer", "vqa_exact_accuracy", "vqa_soft_score", "vqa_soft_accuracy",
    "caption_precision", "caption_recall", "caption_mentions", "hallucination", "pope_yes_ratio", "pope_summary",
    "winoground_scores", "winoground_groups", "score_groups", "WinogroundGroups", "binding_accuracy",
    "CHANCE_TEXT", "CHANCE_IMAGE", "CHANCE_GROUP",
]
