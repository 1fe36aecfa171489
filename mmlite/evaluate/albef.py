"""The complete model evaluated on a split: retrieval (ITC, then ITM re-ranking), ITM, VQA, captions (chapter 5).

Every figure comes with a 95 % percentile-bootstrap interval over the split's images (mmlite.metrics.bootstrap_ci):
a text query, a question and a caption are resampled together with their image, since they share it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from mmlite.data import ANSWERS
from mmlite.encoders import EncoderOutput
from mmlite.metrics import (bleu_from_statistics, bleu_statistics, bootstrap_ci, caption_precision, cider_d,
                            recall_ceiling, rerank_topk, retrieval_per_query, roc_auc, truth_matrix)
from mmlite.models.decoding import beam_search, greedy_decode
from mmlite.text import Tokenizer
from mmlite.train import model_device
from mmlite.train.modes import evaluating


@dataclass
class Evaluation:
    """What evaluate_albef measured on one split: figures with intervals, and the raw outputs behind them."""

    metrics: dict[str, dict[str, float]]  # name -> {"value", "low", "high"} (95 % bootstrap interval)
    similarity: np.ndarray  # (images, texts) ITC cosine similarities
    text_to_image: np.ndarray  # (texts,) the image each caption belongs to
    captions: list[str] = field(default_factory=list)  # the decoder's caption per image
    answers: list[list[str]] = field(default_factory=list)  # the VQA head's answer to each question of each image


def _interval(metric_fn: Callable[..., float], *arrays: np.ndarray, clusters: np.ndarray | None, n: int,
              seed: int) -> dict[str, float]:
    ci = bootstrap_ci(metric_fn, *arrays, n=n, seed=seed, clusters=clusters)
    return {"value": ci.estimate, "low": ci.low, "high": ci.high}


def _batches(n: int, size: int) -> list[list[int]]:
    return [list(range(s, min(s + size, n))) for s in range(0, n, size)]


def _cat(outs: list[EncoderOutput]) -> EncoderOutput:
    return EncoderOutput(torch.cat([o.tokens for o in outs]), torch.cat([o.mask for o in outs]),
                         torch.cat([o.pooled for o in outs]))


def _take(out: EncoderOutput, index: Sequence[int] | np.ndarray, device: torch.device) -> EncoderOutput:
    idx = torch.as_tensor(np.asarray(index), dtype=torch.long)
    return EncoderOutput(out.tokens[idx].to(device), out.mask[idx].to(device), out.pooled[idx].to(device))


def _encode_texts(model: nn.Module, tokenizer: Tokenizer, texts: list[str], device: torch.device,
                  batch_size: int) -> EncoderOutput:
    """All texts through the text encoder, padded to one common length, kept on the CPU."""
    ids, mask = tokenizer.encode_batch(texts, add_bos_eos=True)
    outs = [model.encode_text(ids[r].to(device), mask[r].to(device)) for r in _batches(len(texts), batch_size)]
    return EncoderOutput(*(torch.cat([getattr(o, f) for o in outs]).cpu() for f in EncoderOutput._fields))


def decode_captions(model: nn.Module, images: Tensor, tokenizer: Tokenizer, beam_size: int = 1,
                    max_len: int | None = None) -> list[str]:
    """Captions for images (B, 3, H, W) on the model's device: greedy (beam_size 1) or beam search."""
    image = model.encode_image(images)
    max_len = max_len or model.cfg.max_len - 1
    kw = dict(context=image.tokens, context_mask=image.mask)
    if beam_size == 1:
        ids = greedy_decode(model.decoder, tokenizer.bos_id, tokenizer.eos_id, max_len, **kw)
    else:
        ids, _ = beam_search(model.decoder, tokenizer.bos_id, tokenizer.eos_id, max_len, beam_size=beam_size, **kw)
    return [tokenizer.decode(row) for row in ids.cpu()]


def evaluate_albef(model: nn.Module, split: Any, tokenizer: Tokenizer, k_rerank: int = 16, batch_size: int = 250,
                   n_bootstrap: int = 1000, seed: int = 0, beam_size: int = 1, margin: int = 15,
                   parts: Sequence[str] = ("retrieval", "itm", "vqa", "caption")) -> Evaluation:
    """Run the model over a split of the shapes world (a mmlite.data.Split) or of pairs from disk.

    retrieval: ITC recall both ways, then ITM re-ranking of the top k_rerank (ALBEF's protocol,
      mmlite.metrics.rerank_topk, keys "..._itm"), and the gallery's recall ceiling when the scenes are known
      ("..._ceiling"), over two galleries: every caption of every image (COCO's protocol), and each image's
      first caption, the listing of all its objects (keys "..._first...").
    itm: each image with its first caption (label 1) and one of the world's hard negatives (label 0; a
      seeded draw among its kinds): accuracy at P(match) > 0.5 and ROC AUC.
    vqa: every question of every image, accuracy of the answer head.
    caption: one caption per image (greedy, or beam search), BLEU-4 and CIDEr-D against its captions, and,
      with scenes, caption precision: the share of generated captions that are true of the scene.
    Parts whose data the split lacks (questions, scenes) are skipped.
    """
    device = model_device(model)
    n = len(split)
    has_scenes = hasattr(split, "objects")
    rng = np.random.default_rng(seed)
    metrics: dict[str, dict[str, float]] = {}
    texts = [c for caps in split.captions for c in caps]
    t2i = np.repeat(np.arange(n), [len(c) for c in split.captions])
    evaluation = Evaluation(metrics, np.zeros((0, 0)), t2i)
    with evaluating(model):
        image = _cat([model.encode_image(split.image_tensor(r).to(device)) for r in _batches(n, batch_size)])
        image = EncoderOutput(image.tokens.cpu(), image.mask.cpu(), image.pooled.cpu())

        def match(img_idx: np.ndarray, txt_idx: np.ndarray, text: EncoderOutput) -> np.ndarray:
            out = []
            for r in _batches(len(img_idx), 1024):
                fused = model.fuse(_take(text, txt_idx[r], device), _take(image, img_idx[r], device))
                out.append(torch.softmax(model.itm_logits(fused).float(), -1)[:, 1].cpu())
            return torch.cat(out).numpy().astype(np.float64)

        if "retrieval" in parts:
            text = _encode_texts(model, tokenizer, texts, device, batch_size)
            z_i = model.image_embedding(_take(image, np.arange(n), device)).cpu()
            z_t = torch.cat([model.text_embedding(_take(text, r, device)).cpu()
                             for r in _batches(len(texts), 1000)])
            sim = (z_i.double() @ z_t.double().T).numpy()  # (images, texts)
            evaluation.similarity = sim
            truth = truth_matrix(split.objects, texts, margin) if has_scenes else None
            # two galleries: every caption (COCO's protocol) and each image's first caption only, the listing of
            # all its objects (one text per image, specific enough that the ceiling is near 1)
            first = np.r_[0, np.cumsum([len(c) for c in split.captions])[:-1]]
            galleries = {"": np.arange(len(texts)), "_first": first}
            for gallery, cols in galleries.items():
                g_sim, g_t2i = sim[:, cols], t2i[cols]
                ranked = rerank_topk(g_sim, lambda i, j: match(i, cols[j], text), k=min(k_rerank, n, len(cols)))
                per = {"": retrieval_per_query(g_sim, g_t2i, ks=(1, 5)),
                       "_itm": retrieval_per_query(ranked.i2t, g_t2i, ks=(1, 5), t2i_similarity=ranked.t2i)}
                for how, hits in per.items():
                    for d in ("i2t", "t2i"):
                        for k in (1, 5):
                            clusters = np.arange(n) if d == "i2t" else g_t2i
                            metrics[f"{d}_r{k}{gallery}{how}"] = _interval(np.mean, hits[f"{d}_r{k}"],
                                                                           clusters=clusters, n=n_bootstrap,
                                                                           seed=seed)
                if truth is not None:
                    ceiling = recall_ceiling(g_t2i, truth[:, cols], ks=(1, 5))
                    for key in ("t2i_r1", "t2i_r5", "i2t_r1", "i2t_r5"):
                        value = ceiling[key]
                        metrics[f"{key}{gallery}_ceiling"] = {"value": value, "low": value, "high": value}
        if "itm" in parts and has_scenes and getattr(split, "negatives", None):
            owners = np.array([i for i in range(n) if split.negatives[i]])  # (a rare scene has no negative)
            negs = [split.negatives[i][int(rng.integers(len(split.negatives[i])))][0] for i in owners]
            pair_text = _encode_texts(model, tokenizer, [split.captions[i][0] for i in owners] + negs, device,
                                      batch_size)
            clusters = np.concatenate([owners, owners])
            scores = match(clusters, np.arange(2 * len(owners)), pair_text)
            labels = np.concatenate([np.ones(len(owners), int), np.zeros(len(owners), int)])
            metrics["itm_acc"] = _interval(lambda s, y: float(np.mean((s > 0.5) == y)), scores, labels,
                                           clusters=clusters, n=n_bootstrap, seed=seed)
            metrics["itm_auc"] = _interval(roc_auc, scores, labels, clusters=clusters, n=n_bootstrap, seed=seed)
        if "vqa" in parts and getattr(split, "questions", None):
            owners = np.repeat(np.arange(n), [len(q) for q in split.questions])
            qs = [q for qs in split.questions for q in qs]
            ids, mask = tokenizer.encode_batch([q[0] for q in qs], add_bos_eos=True, strict=True)
            pred = []
            for r in _batches(len(qs), batch_size):
                fused = model.fuse(model.encode_text(ids[r].to(device), mask[r].to(device)),
                                   _take(image, owners[r], device))
                pred.append(model.vqa_logits(fused).argmax(-1).cpu())
            predicted = [ANSWERS[int(p)] for p in torch.cat(pred)]
            correct = np.array([p == q[1] for p, q in zip(predicted, qs)], float)
            metrics["vqa_acc"] = _interval(np.mean, correct, clusters=owners, n=n_bootstrap, seed=seed)
            ends = np.cumsum([len(q) for q in split.questions])
            evaluation.answers = [predicted[e - len(q):e] for e, q in zip(ends, split.questions)]
        if "caption" in parts:
            captions: list[str] = []
            for r in _batches(n, batch_size):
                captions += decode_captions(model, split.image_tensor(r).to(device), tokenizer, beam_size=beam_size)
            evaluation.captions = captions
            refs = split.captions
            stats = [bleu_statistics([h], [rs]) for h, rs in zip(captions, refs)]
            m = np.array([s["matches"] for s in stats], float)  # (N, 4)
            t = np.array([s["totals"] for s in stats], float)  # (N, 4)
            c = np.array([s["hyp_len"] for s in stats], float)
            r_ = np.array([s["ref_len"] for s in stats], float)
            bleu4 = lambda m, t, c, r: bleu_from_statistics(m.sum(0), t.sum(0), c.sum(), r.sum())["bleu_4"]  # noqa: E731
            metrics["bleu4"] = _interval(bleu4, m, t, c, r_, clusters=None, n=n_bootstrap, seed=seed)
            _, per_image = cider_d(captions, refs)  # IDF from the whole split, kept fixed in the resamples
            metrics["cider"] = _interval(np.mean, np.asarray(per_image, float), clusters=None, n=n_bootstrap,
                                         seed=seed)
            if has_scenes:
                truth = caption_precision(captions, split.objects, margin)["truth"]
                metrics["caption_precision"] = _interval(np.mean, np.array([v is True for v in truth], float),
                                                         clusters=None, n=n_bootstrap, seed=seed)
    return evaluation
