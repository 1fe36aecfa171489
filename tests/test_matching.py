"""The image-text matching model, its training pairs and its evaluation."""

import pytest
import torch

from mmlite.data import NEGATIVE_KINDS, DataConfig, build_tokenizer, caption_truth, generate, make_loader
from mmlite.evaluate import evaluate_matching, score_pairs
from mmlite.models import MatchingConfig, MatchingModel
from mmlite.recipes import train_matching
from mmlite.tasks import matching_pairs
from mmlite.train import FitConfig, fit, warmup_cosine


@pytest.fixture(scope="module")
def world():
    return generate(DataConfig(n_train=64, n_val=16, n_test=16, n_comp=16), seed=3)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.mark.parametrize("fusion", ["concat", "gated", "hierarchical", "cross_attention"])
@pytest.mark.parametrize("text_encoder", ["gru", "transformer"])
def test_every_fusion_and_text_encoder_gives_logits(fusion, text_encoder, tok):
    model = MatchingModel(MatchingConfig(vocab_size=len(tok), fusion=fusion, text_encoder=text_encoder, d_model=16,
                                         cnn_width=8, hidden=8, n_heads=2))
    ids, mask = tok.encode_batch(["a red circle", "two blue squares left of a star"], add_bos_eos=True)
    logits = model(torch.rand(2, 3, 32, 32), ids, mask)
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_attention_weights_only_with_cross_attention(tok):
    ids, mask = tok.encode_batch(["a red circle"], add_bos_eos=True)
    model = MatchingModel(MatchingConfig(vocab_size=len(tok), d_model=16, cnn_width=8, n_heads=2))
    _, weights = model(torch.rand(1, 3, 32, 32), ids, mask, return_weights=True)
    assert weights[0][1].shape == (1, 2, ids.shape[1], 16)  # text -> 4x4 image regions
    with pytest.raises(ValueError, match="cross_attention"):
        MatchingModel(MatchingConfig(vocab_size=len(tok), fusion="concat"))(
            torch.rand(1, 3, 32, 32), ids, mask, return_weights=True)


def test_config_errors():
    with pytest.raises(ValueError, match="fusion must be one of"):
        MatchingConfig(vocab_size=10, fusion="sum")
    with pytest.raises(ValueError, match="hierarchical"):
        MatchingConfig(vocab_size=10, fusion="hierarchical", image_encoder="vit")


def test_matching_pairs_labels_follow_the_scene(world, tok):
    loader = make_loader(world["train"], tok, batch_size=32, shuffle=True, seed=0)
    batch = next(iter(loader))
    pairs = matching_pairs(batch, tok, torch.Generator().manual_seed(0))
    assert pairs["image"].shape[0] == pairs["ids"].shape[0] == 64
    assert pairs["label"][:32].eq(1).all()
    hard = pairs["kind"] >= 0
    assert hard.any() and (~hard[32:]).any()
    assert pairs["label"][hard].eq(0).all(), "hard negatives are always false"
    for row in range(64):  # every label agrees with the scene
        text = tok.decode(pairs["ids"][row])
        truth = caption_truth(text, batch["objects"][row % 32].numpy())
        assert truth is not None and int(truth) == int(pairs["label"][row]), (row, text)


def test_fit_lowers_the_loss_and_evaluation_reports_every_kind(world, tok):
    torch.manual_seed(0)
    model = MatchingModel(MatchingConfig(vocab_size=len(tok), d_model=16, cnn_width=8, n_heads=2, hidden=16))
    history = train_matching(model, world["train"], tok, FitConfig(steps=30, lr=3e-3, warmup=5), batch_size=16,
                             hard_fraction=0.0)
    assert len(history.losses) == 30
    assert sum(history.losses[-5:]) / 5 < sum(history.losses[:5]) / 5
    report = evaluate_matching(model, world["test"], tok, batch_size=32)
    assert report["n_images"] == 16
    for key in ["accuracy", "positive", "easy", "hard"] + [f"binding/{k}" for k in NEGATIVE_KINDS]:
        assert 0.0 <= report[key] <= 1.0, key


class _KnownScorer(torch.nn.Module):
    """A stand-in model whose P(match) is a known function of (which image, which text), to check the report.

    It finds the image by its pixels and decodes the text; then P = KIND_P[kind] (+0.1 for odd images) for one
    of the image's hard negatives, 0.8 / 0.4 for a true caption or negative source with an even / odd number of
    words, and 0.3 for any other text (the easy negatives) on every third image, else 0.7.
    """

    KIND_P = {"swap_attribute": 0.2, "swap_relation": 0.6, "change_color": 0.45}

    def __init__(self, split, tok):
        super().__init__()
        self.split, self.tok = split, tok
        self.images = split.image_tensor()  # (N, 3, H, W)

    def p(self, i: int, text: str) -> float:
        kinds = dict(self.split.negatives[i])
        if text in kinds:
            return self.KIND_P[kinds[text]] + 0.1 * (i % 2)
        if text in self.split.captions[i] or text in self.split.negative_sources[i]:
            return 0.8 if len(text.split()) % 2 == 0 else 0.4
        return 0.3 if i % 3 == 0 else 0.7

    def match_probability(self, images, ids, mask):
        same = (images[:, None] == self.images[None]).flatten(2).all(-1)  # (b, N)
        assert same.sum(1).eq(1).all(), "every image of the split is unique"
        return torch.tensor([self.p(int(i), self.tok.decode(row)) for i, row in zip(same.float().argmax(1), ids)])


def test_evaluate_matching_reports_known_rates_and_binding_against_each_source(world, tok):
    split = world["test"]
    model = _KnownScorer(split, tok)
    n = len(split)
    positive = [model.p(i, split.captions[i][0]) > 0.5 for i in range(n)]
    easy = [model.p(i, split.captions[(i + 1) % n][0]) <= 0.5 for i in range(n)
            if caption_truth(split.captions[(i + 1) % n][0], split.objects[i]) is False]
    rejected = {k: [] for k in NEGATIVE_KINDS}
    binding = {k: [] for k in NEGATIVE_KINDS}
    for i in range(n):
        for (caption, kind), source in zip(split.negatives[i], split.negative_sources[i]):
            rejected[kind].append(model.p(i, caption) <= 0.5)
            binding[kind].append(model.p(i, source) > model.p(i, caption))  # against its own source only
    report = evaluate_matching(model, split, tok, batch_size=7)

    def rate(xs):
        return pytest.approx(sum(xs) / len(xs))

    assert 0 < sum(positive) < n and 0 < sum(easy) < len(easy), "the stub gives both answers"
    assert report["positive"] == rate(positive) and report["easy"] == rate(easy)
    assert report["accuracy"] == pytest.approx((sum(positive) / n + sum(easy) / len(easy)) / 2)
    assert report["positive"] != report["easy"], "so a swap of the two, or accuracy = positive, shows"
    for kind in NEGATIVE_KINDS:
        assert report[f"hard/{kind}"] == rate(rejected[kind]), kind
        assert report[f"binding/{kind}"] == rate(binding[kind]), kind
    assert report["hard"] == rate([r for k in NEGATIVE_KINDS for r in rejected[k]])
    assert len({report[f"hard/{k}"] for k in NEGATIVE_KINDS}) == 3, "every kind has its own rate"
    assert len({report[f"binding/{k}"] for k in NEGATIVE_KINDS}) == 3
    # comparing with the image's first caption instead of each negative's source would give other numbers
    first = {k: [] for k in NEGATIVE_KINDS}
    for i in range(n):
        for caption, kind in split.negatives[i]:
            first[kind].append(model.p(i, split.captions[i][0]) > model.p(i, caption))
    assert any(rate(first[k]) != report[f"binding/{k}"] for k in NEGATIVE_KINDS)
    assert report["n_images"] == n


def test_score_pairs_equals_one_call_per_pair_in_any_batch_size(world, tok):
    torch.manual_seed(0)
    model = MatchingModel(MatchingConfig(vocab_size=len(tok), d_model=16, cnn_width=8, n_heads=2, hidden=16)).train()
    split = world["test"]
    owners = [3, 0, 3, 7, 15]
    texts = [split.captions[3][0], split.captions[1][2], split.negatives[3][0][0], "a red circle", "a star"]
    with torch.no_grad():
        model.eval()
        one_by_one = torch.cat([model.match_probability(split.image_tensor([i]), *tok.encode_batch([t], add_bos_eos=True))
                                for i, t in zip(owners, texts)])
        model.train()
    for batch_size in (1, 2, 5, 256):
        scores = score_pairs(model, split, owners, texts, tok, batch_size=batch_size)
        torch.testing.assert_close(scores, one_by_one, rtol=1e-5, atol=1e-6)  # float32, other paddings
    assert model.training and not scores.requires_grad  # mode restored, nothing kept for backward
    assert score_pairs(model, split, [], [], tok).shape == (0,)
    with pytest.raises(ValueError, match="2 image indices but 1 texts"):
        score_pairs(model, split, [0, 1], ["a star"], tok)
    with pytest.raises(ValueError, match="batch_size"):
        score_pairs(model, split, [0], ["a star"], tok, batch_size=0)
    with pytest.raises(ValueError, match="magenta"):  # an error while scoring (a word not in the vocabulary) ...
        score_pairs(model, split, [0], ["a magenta star"], tok)
    assert model.training  # ... still gives the model back in training mode


def test_schedule_warms_up_then_decays():
    cfg = FitConfig(steps=100, warmup=10, min_lr_ratio=0.1)
    values = [warmup_cosine(s, cfg) for s in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values[10:], values[11:]))
    assert values[-1] == pytest.approx(0.1, abs=1e-3)
    with pytest.raises(ValueError, match="steps"):
        FitConfig(steps=0)


def test_fit_says_when_batches_run_out(tok):
    model = torch.nn.Linear(2, 1)
    with pytest.raises(ValueError, match="ran out after 2 steps"):
        fit(model, [torch.ones(2), torch.ones(2)], lambda m, b: m(b).sum(), FitConfig(steps=3, warmup=0))
