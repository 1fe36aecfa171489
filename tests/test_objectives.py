"""Tests for mmlite.objectives: cross-entropy, CLIP contrastive loss, ITM hard negatives, masked and captioning LM."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmlite.objectives import (
    IGNORE_INDEX,
    LogitScale,
    build_itm_batch,
    caption_loss,
    contrastive_loss,
    cross_entropy,
    explicit_negative_index,
    itm_loss,
    mask_tokens,
    mlm_loss,
    sample_hard_negatives,
    shift_for_lm,
)

# Our cross-entropy and F.cross_entropy both compute logsumexp in float32 over <= 50 classes and
# average <= 200 terms of size ~5: agreement to a few float32 ulps of the result (~1e-6); 1e-5 is a
# margin that still catches a wrong smoothing weight (which changes the value by > 1e-3).
TOL = dict(atol=1e-5, rtol=1e-5)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- cross-entropy
@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
def test_cross_entropy_matches_torch(smoothing):
    g = gen(0)
    logits = torch.randn(40, 7, generator=g) * 3
    targets = torch.randint(0, 7, (40,), generator=g)
    targets[::5] = IGNORE_INDEX
    for reduction in ("mean", "sum", "none"):
        ours = cross_entropy(logits, targets, label_smoothing=smoothing, reduction=reduction)
        ref = F.cross_entropy(logits, targets, label_smoothing=smoothing, reduction=reduction)
        torch.testing.assert_close(ours, ref, **TOL)
    # sequence logits (B, T, V): classes last here, at dim 1 for torch; a custom ignore_index
    logits3 = torch.randn(4, 6, 50, generator=g)
    t3 = torch.randint(0, 50, (4, 6), generator=g)
    t3[:, -2:] = 7
    ours = cross_entropy(logits3, t3, label_smoothing=smoothing, ignore_index=7)
    ref = F.cross_entropy(logits3.transpose(1, 2), t3, label_smoothing=smoothing, ignore_index=7)
    torch.testing.assert_close(ours, ref, **TOL)


def test_cross_entropy_gradcheck_and_edge_cases():
    g = gen(1)
    logits = torch.randn(5, 4, dtype=torch.float64, generator=g, requires_grad=True)
    targets = torch.tensor([0, 3, IGNORE_INDEX, 1, 2])
    assert torch.autograd.gradcheck(lambda x: cross_entropy(x, targets, label_smoothing=0.2), (logits,))
    # everything ignored: 0 with a zero gradient (torch returns NaN here)
    all_ignored = torch.full((5,), IGNORE_INDEX)
    loss = cross_entropy(logits, all_ignored)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))
    with pytest.raises(ValueError, match="class 4"):
        cross_entropy(logits, torch.tensor([0, 4, 1, 1, 1]))
    with pytest.raises(ValueError, match="targets shape"):
        cross_entropy(logits, torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="long"):
        cross_entropy(logits, torch.zeros(5))


# --------------------------------------------------------------------------- logit scale
def test_logit_scale_init_and_clamp():
    ls = LogitScale()
    assert ls.value.item() == pytest.approx(math.log(1 / 0.07))
    assert ls().item() == pytest.approx(1 / 0.07, rel=1e-6)  # 14.2857
    # below the cap the gradient is d exp(t) / dt = exp(t): the clamp does not block it
    ls().backward()
    assert ls.value.grad.item() == pytest.approx(1 / 0.07, rel=1e-6)
    # above the cap: the forward value is capped at 100 and the gradient is zero
    with torch.no_grad():
        ls.value.fill_(6.0)
    ls.value.grad = None
    out = ls()
    out.backward()
    assert out.item() == pytest.approx(100.0, rel=1e-6) and ls.value.grad.item() == 0.0
    ls.clamp_()  # open_clip style in-place clamp after an optimizer step
    assert ls.value.item() == pytest.approx(math.log(100))
    with torch.no_grad():
        ls.value.fill_(-1.0)
    ls.clamp_()
    assert ls.value.item() == 0.0
    with pytest.raises(ValueError, match="init"):
        LogitScale(init=5.0)


# --------------------------------------------------------------------------- contrastive
def _reference_clip_loss(img, txt, scale):
    logits = scale * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T
    labels = torch.arange(img.shape[0])
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def test_contrastive_loss_matches_reference_and_returns_logits():
    g = gen(2)
    img, txt = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    loss, logits = contrastive_loss(img, txt, 14.0, return_logits=True)
    torch.testing.assert_close(loss, _reference_clip_loss(img, txt, 14.0), **TOL)
    torch.testing.assert_close(logits, 14.0 * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T, **TOL)
    # with a LogitScale module the gradient reaches its parameter
    ls = LogitScale()
    contrastive_loss(img, txt, ls).backward()
    assert ls.value.grad is not None and ls.value.grad.item() != 0.0


def test_contrastive_loss_properties():
    g = gen(3)
    img, txt = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
    loss = contrastive_loss(img, txt, 10.0)
    # symmetric in the two modalities
    torch.testing.assert_close(contrastive_loss(txt, img, 10.0), loss, **TOL)
    # invariant to a joint permutation of the batch
    perm = torch.randperm(8, generator=g)
    torch.testing.assert_close(contrastive_loss(img[perm], txt[perm], 10.0), loss, **TOL)
    # but not to permuting one side only (pairs broken)
    assert abs(contrastive_loss(img[perm], txt, 10.0).item() - loss.item()) > 1e-3
    # identical features -> uniform logits -> log B exactly
    same = torch.randn(1, 16, generator=g).expand(8, 16)
    assert contrastive_loss(same, same, 10.0).item() == pytest.approx(math.log(8), rel=1e-6)


def test_contrastive_loss_decreases_as_pairs_align():
    b = 4
    img = torch.eye(b)  # orthonormal image features
    shared = torch.full((b,), 0.5)  # a direction common to all texts
    losses = []
    for alpha in torch.linspace(0, 1, 11):
        txt = alpha * img + (1 - alpha) * shared  # text i moves from the shared direction to image i
        losses.append(contrastive_loss(img, txt, 10.0).item())
    assert losses[0] == pytest.approx(math.log(b), rel=1e-6)
    assert all(a > b_ for a, b_ in zip(losses, losses[1:]))
    assert losses[-1] < 0.01


def test_contrastive_loss_gradcheck_float64():
    g = gen(4)
    img = torch.randn(4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    txt = torch.randn(4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    scale = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, s: contrastive_loss(a, b, s, label_smoothing=0.1), (img, txt, scale))


def test_contrastive_loss_validates_shapes():
    with pytest.raises(ValueError, match="must match"):
        contrastive_loss(torch.randn(4, 8), torch.randn(5, 8), 1.0)
    with pytest.raises(ValueError, match="image_feats must be"):
        contrastive_loss(torch.randn(4), torch.randn(4), 1.0)


# --------------------------------------------------------------------------- hard negatives / ITM
def test_hard_negatives_never_the_positive():
    g = gen(5)
    cases = [torch.randn(8, 8, generator=g) * 5, torch.zeros(8, 8), torch.zeros(2, 2),
             torch.eye(6) * 1e4, torch.randn(3, 3, generator=g) * 100]
    for sim in cases:
        own = torch.arange(sim.shape[0])
        for _ in range(200):
            neg_t, neg_i = sample_hard_negatives(sim, generator=g)
            assert not (neg_t == own).any() and not (neg_i == own).any()
    neg_t, neg_i = sample_hard_negatives(torch.zeros(2, 2), generator=g)
    assert neg_t.tolist() == [1, 0] and neg_i.tolist() == [1, 0]  # B=2: the other one, always
    with pytest.raises(ValueError, match="B >= 2"):
        sample_hard_negatives(torch.zeros(1, 1))
    with pytest.raises(ValueError, match="square"):
        sample_hard_negatives(torch.zeros(2, 3))


def test_hard_negatives_follow_softmax_weights():
    sim = torch.tensor([[0.0, 1.0, 0.0, -1.0],
                        [2.0, 9.0, 0.5, 0.0],
                        [0.3, 0.3, 0.0, 1.2],
                        [1.0, -0.5, 0.0, 0.0]])
    n = 3000
    g = gen(6)
    counts_t = torch.zeros(4, 4)
    counts_i = torch.zeros(4, 4)
    rows = torch.arange(4)
    for _ in range(n):
        neg_t, neg_i = sample_hard_negatives(sim, generator=g)
        counts_t[rows, neg_t] += 1
        counts_i[rows, neg_i] += 1
    off = ~torch.eye(4, dtype=torch.bool)
    for counts, s in ((counts_t, sim), (counts_i, sim.T)):
        # softmax(sim) with the diagonal given zero weight, renormalised
        p = torch.softmax(s.masked_fill(~off, float("-inf")), dim=1)
        assert counts[~off].sum() == 0
        expected = n * p
        chi2 = ((counts - expected) ** 2 / expected.clamp_min(1e-12))[off].view(4, 3).sum(1)
        # each row: 3 categories -> 2 degrees of freedom, P(chi2 > x) = exp(-x / 2); x = 18.4 is a 1e-4 tail
        assert (chi2 < 18.4).all(), chi2


def test_build_itm_batch_and_explicit_negatives():
    neg_t = torch.tensor([1, 2, 0])
    neg_i = torch.tensor([2, 0, 1])
    batch = build_itm_batch(neg_t, neg_i)
    assert batch.image_index.tolist() == [0, 1, 2, 2, 0, 1, 0, 1, 2]
    assert batch.text_index.tolist() == [0, 1, 2, 0, 1, 2, 1, 2, 0]
    assert batch.labels.tolist() == [1, 1, 1, 0, 0, 0, 0, 0, 0]
    # every label-1 pair is matched and every label-0 pair is not
    matched = batch.image_index == batch.text_index
    assert torch.equal(matched, batch.labels.bool())
    explicit = build_itm_batch(explicit_negative_index(3), neg_i)
    assert explicit.text_index[6:].tolist() == [3, 4, 5]  # after the batch's 3 captions in the text pool
    with pytest.raises(ValueError, match="own positive"):
        build_itm_batch(torch.tensor([0, 2, 1]), neg_i)


def test_itm_loss_matches_torch():
    g = gen(7)
    logits = torch.randn(9, 2, generator=g)
    labels = torch.tensor([1, 1, 1, 0, 0, 0, 0, 0, 0])
    torch.testing.assert_close(itm_loss(logits, labels), F.cross_entropy(logits, labels), **TOL)
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        itm_loss(torch.randn(9, 3), labels)


# --------------------------------------------------------------------------- masked LM
SPECIAL = [0, 1, 2, 3]  # [PAD], [BOS], [EOS], [MASK]
MASK_ID, VOCAB = 3, 40


def _random_batch(g, b=2000, t=24):
    lengths = torch.randint(0, t + 1, (b,), generator=g)  # some rows empty
    mask = torch.arange(t)[None] < lengths[:, None]
    ids = torch.randint(4, VOCAB, (b, t), generator=g)
    ids[:, 0] = 1  # BOS at the start of every row (special: never selected)
    ids[torch.arange(b), (lengths - 1).clamp_min(0)] = 2  # EOS at the last real position
    return ids.masked_fill(~mask, 0), mask


def test_mask_tokens_rates_within_binomial_bounds():
    g = gen(8)
    ids, mask = _random_batch(g)
    inp, labels = mask_tokens(ids, mask, MASK_ID, VOCAB, SPECIAL, prob=0.15, generator=g)
    candidates = mask & (ids >= 4)
    selected = labels != IGNORE_INDEX
    n = candidates.sum(1).double()  # candidates per row
    p = 0.15
    # E[selected] per row = n p + (1 - p)^n for rows with n >= 1 (the forced pick), 0 otherwise
    expected = torch.where(n > 0, n * p + (1 - p) ** n, torch.zeros_like(n)).sum()
    sd = (n * p * (1 - p)).sum().sqrt()  # binomial standard deviation (the forced pick only lowers it)
    assert abs(selected.sum().item() - expected.item()) < 5 * sd.item()  # 5 sigma: false alarm < 1e-6
    # split of the selected positions: 80% [MASK], 10% random word, 10% unchanged
    s = selected.sum().item()
    n_allowed = VOCAB - len(SPECIAL)
    to_mask = (inp == MASK_ID)[selected].sum().item()
    same = (inp == ids)[selected].sum().item()
    other = s - to_mask - same
    for count, rate in ((to_mask, 0.8), (other, 0.1 * (1 - 1 / n_allowed)), (same, 0.1 + 0.1 / n_allowed)):
        assert abs(count - s * rate) < 5 * math.sqrt(s * rate * (1 - rate)), (count, s * rate)


def test_mask_tokens_never_touches_specials_or_padding():
    g = gen(9)
    ids, mask = _random_batch(g, b=500)
    inp, labels = mask_tokens(ids, mask, MASK_ID, VOCAB, SPECIAL, prob=0.3, generator=g)
    candidates = mask & (ids >= 4)
    selected = labels != IGNORE_INDEX
    assert not (selected & ~candidates).any()  # only real, non-special tokens
    assert torch.equal(inp[~selected], ids[~selected])  # nothing else changes
    assert torch.equal(labels[selected], ids[selected])  # labels are the original ids
    replaced = selected & (inp != ids) & (inp != MASK_ID)
    assert replaced.any() and (inp[replaced] >= 4).all()  # random words are never special
    has_cand = candidates.any(1)
    assert (selected.any(1) == has_cand).all()  # at least one per row when possible, none otherwise
    # same generator seed, same corruption
    a = mask_tokens(ids, mask, MASK_ID, VOCAB, SPECIAL, generator=gen(1))
    b = mask_tokens(ids, mask, MASK_ID, VOCAB, SPECIAL, generator=gen(1))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_mask_tokens_validates():
    ids = torch.tensor([[1, 5, 6, 2]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="prob"):
        mask_tokens(ids, mask, MASK_ID, VOCAB, SPECIAL, prob=0.0)
    with pytest.raises(ValueError, match="mask_id 40"):
        mask_tokens(ids, mask, 40, VOCAB, SPECIAL)
    with pytest.raises(ValueError, match="vocab_size=6"):
        mask_tokens(ids, mask, MASK_ID, 6, SPECIAL)
    with pytest.raises(ValueError, match="bool"):
        mask_tokens(ids, mask.long(), MASK_ID, VOCAB, SPECIAL)


def test_mlm_loss_matches_torch():
    g = gen(10)
    logits = torch.randn(3, 5, 11, generator=g)
    labels = torch.full((3, 5), IGNORE_INDEX)
    labels[0, 1], labels[1, 3], labels[2, 0] = 4, 10, 0
    ref = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100)
    torch.testing.assert_close(mlm_loss(logits, labels), ref, **TOL)


# --------------------------------------------------------------------------- captioning LM
def test_shift_for_lm_and_caption_loss():
    ids = torch.tensor([[1, 7, 8, 9, 2, 0], [1, 5, 2, 0, 0, 0]])
    mask = ids != 0
    batch = shift_for_lm(ids, mask)
    assert batch.inputs.tolist() == [[1, 7, 8, 9, 2], [1, 5, 2, 0, 0]]
    assert batch.targets.tolist() == [[7, 8, 9, 2, 0], [5, 2, 0, 0, 0]]
    assert batch.target_mask.sum().item() == 4 + 2  # real targets: words and EOS, never padding
    g = gen(11)
    logits = torch.randn(2, 5, 12, generator=g)
    for smoothing in (0.0, 0.1):
        ours = caption_loss(logits, batch.targets, batch.target_mask, label_smoothing=smoothing)
        ref = F.cross_entropy(logits[batch.target_mask], batch.targets[batch.target_mask], label_smoothing=smoothing)
        torch.testing.assert_close(ours, ref, **TOL)
    with pytest.raises(ValueError, match="T >= 2"):
        shift_for_lm(ids[:, :1], mask[:, :1])
    with pytest.raises(ValueError, match="bool"):
        caption_loss(logits, batch.targets, batch.target_mask.long())


# --------------------------------------------------------------------------- degenerate inputs
def test_mask_tokens_on_empty_sequences_selects_nothing_and_draws_nothing():
    g = gen(0)
    state = g.get_state()
    for shape in ((3, 0), (0, 4)):
        ids, mask = torch.zeros(shape, dtype=torch.long), torch.zeros(shape, dtype=torch.bool)
        inputs, labels = mask_tokens(ids, mask, mask_id=3, vocab_size=20, special_ids=[0, 1, 2], generator=g)
        assert inputs.shape == labels.shape == shape and labels.dtype == torch.long
    assert torch.equal(g.get_state(), state), "no random numbers were consumed"


def test_build_itm_batch_rejects_negative_and_non_integer_indices():
    with pytest.raises(ValueError, match="neg_text_for_image holds the negative index -1"):
        build_itm_batch(torch.tensor([1, -1, 0]), torch.tensor([1, 2, 0]))
    with pytest.raises(ValueError, match="neg_image_for_text holds the negative index -3"):
        build_itm_batch(torch.tensor([1, 2, 0]), torch.tensor([1, -3, 0]))
    with pytest.raises(TypeError, match="integer"):
        build_itm_batch(torch.tensor([1.0, 0.0]), torch.tensor([1, 0]))
    with pytest.raises(TypeError, match="neg_image_for_text must be a torch.Tensor, got list"):
        build_itm_batch(torch.tensor([1, 0]), [1, 0])
    batch = build_itm_batch(torch.tensor([1, 0], dtype=torch.int32), torch.tensor([1, 0]))  # any integer dtype
    assert batch.text_index.tolist() == [0, 1, 0, 1, 1, 0]


@pytest.mark.parametrize("call, name", [
    (lambda L: cross_entropy(L, torch.tensor([0, 1])), "logits"),
    (lambda L: cross_entropy(torch.tensor(L), [0, 1]), "targets"),
    (lambda L: contrastive_loss(L, torch.tensor(L), 1.0), "image_feats"),
    (lambda L: sample_hard_negatives(L), "sim"),
    (lambda L: itm_loss(L, torch.tensor([0, 1])), "logits"),
    (lambda L: mask_tokens([[1, 2]], torch.ones(1, 2, dtype=torch.bool), 3, 10, [0]), "ids"),
    (lambda L: mlm_loss(L, torch.tensor([0, 1])), "logits"),
    (lambda L: shift_for_lm(torch.ones(1, 2, dtype=torch.long), [[True, True]]), "mask"),
    (lambda L: caption_loss(torch.zeros(1, 2, 3), torch.zeros(1, 2, dtype=torch.long), [[True, True]]), "mask"),
])
def test_objectives_name_an_argument_that_is_not_a_tensor(call, name):
    with pytest.raises(TypeError, match=f"{name} must be a torch.Tensor, got list"):
        call([[1.0, 2.0], [3.0, 4.0]])
