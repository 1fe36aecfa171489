"""Tests for mmlite.adapt: freezing, linear probe, zero-shot templates, soft prompts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mmlite.adapt import (
    LinearProbe,
    SoftPrompt,
    check_gradients_only_reach,
    fit_linear_probe,
    freeze,
    prompted_class_embeddings,
    trainable_parameters,
    unfreeze,
    zero_shot_classify,
    zero_shot_weights,
)
from mmlite.alignment import l2_normalize
from mmlite.encoders import CNNEncoder, GRUTextEncoder, TransformerTextEncoder
from mmlite.objectives import LogitScale, cross_entropy


class TinyDualEncoder(nn.Module):
    """A small model with every kind of parameter the decay rule distinguishes."""

    def __init__(self) -> None:
        super().__init__()
        self.image_encoder = CNNEncoder(width=4, d_model=8, depth=2, norm="group")
        self.text_encoder = TransformerTextEncoder(20, d_model=8, depth=1, n_heads=2, max_len=8)
        self.image_proj = nn.Linear(8, 4, bias=False)
        self.text_proj = nn.Linear(8, 4)
        self.logit_scale = LogitScale()


# --------------------------------------------------------------------------- freezing
def test_freeze_unfreeze_and_trainable_parameters():
    model = TinyDualEncoder()
    n_all = len(list(model.parameters()))
    assert freeze(model) is model and trainable_parameters(model) == []
    unfreeze(model.text_proj)
    assert trainable_parameters(model) == list(model.text_proj.parameters())
    unfreeze(model)
    assert len(trainable_parameters(model)) == n_all


# --------------------------------------------------------------------------- linear probe
def test_linear_probe_fits_separable_features_on_frozen_encoder():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 6, generator=g) * 4
    labels = torch.arange(3).repeat(40)
    raw = centers[labels] + torch.randn(120, 6, generator=g)
    encoder = nn.Linear(6, 6)
    features = encoder(raw)  # a graph back to the encoder: the probe must not use it
    torch.manual_seed(0)
    probe, losses = fit_linear_probe(features, labels, epochs=150, lr=0.05)
    assert isinstance(probe, LinearProbe)
    acc = (probe(features.detach()).argmax(1) == labels).float().mean().item()
    assert acc == 1.0 and losses[-1] < 0.1 * losses[0]
    assert all(p.grad is None for p in encoder.parameters())
    torch.manual_seed(0)
    strong, _ = fit_linear_probe(features, labels, epochs=150, lr=0.05, weight_decay=1.0)
    assert strong.linear.weight.norm() < probe.linear.weight.norm()  # L2 shrinks the weights
    with pytest.raises(ValueError, match="d_in=6"):
        probe(torch.randn(2, 5))


# --------------------------------------------------------------------------- zero-shot
CLASSES = ["circle", "square", "triangle"]
TEMPLATES = ["a photo of a {}", "a drawing of a {}", "a {} shape"]


def fake_encode_text(texts: list[str]) -> torch.Tensor:
    """Orthogonal class directions plus a template-dependent offset and scale (a stand-in text encoder)."""
    out = []
    for t in texts:
        v = torch.zeros(5)
        v[next(i for i, c in enumerate(CLASSES) if c in t)] = 1.0
        v[3 + ("drawing" in t)] = 0.3 * (1 + ("shape" in t))  # template noise, orthogonal to the classes
        out.append(v * (1 + len(t) % 3))  # different norms per template
    return torch.stack(out)


def test_zero_shot_picks_the_right_class():
    w = zero_shot_weights(fake_encode_text, CLASSES, TEMPLATES)
    assert w.shape == (3, 5)
    torch.testing.assert_close(w.norm(dim=-1), torch.ones(3))
    images = torch.eye(5)[:3] * 2.0 + 0.05  # image c points at class c's direction
    logits = zero_shot_classify(images, w)
    assert logits.argmax(1).tolist() == [0, 1, 2]
    torch.testing.assert_close(logits, 100.0 * l2_normalize(images) @ w.T)


def test_template_ensemble_is_mean_of_normalised_embeddings():
    w = zero_shot_weights(fake_encode_text, CLASSES, TEMPLATES)
    for c, name in enumerate(CLASSES):
        per_template = torch.stack([l2_normalize(fake_encode_text([t.format(name)])[0]) for t in TEMPLATES])
        mean = per_template.mean(0)
        torch.testing.assert_close(w[c], mean / mean.norm())
    # it differs from normalising the mean of raw embeddings when norms differ
    raw = fake_encode_text([t.format("circle") for t in TEMPLATES]).mean(0)
    assert (w[0] - raw / raw.norm()).abs().max() > 1e-3


def test_zero_shot_validates_templates_and_encoder_output():
    with pytest.raises(ValueError, match="exactly one"):
        zero_shot_weights(fake_encode_text, CLASSES, ["a photo of a thing"])
    with pytest.raises(ValueError, match="exactly one"):
        zero_shot_weights(fake_encode_text, CLASSES, ["{} and {}"])
    with pytest.raises(ValueError, match="empty"):
        zero_shot_weights(fake_encode_text, CLASSES, [])
    with pytest.raises(ValueError, match="expected"):
        zero_shot_weights(lambda texts: torch.zeros(1, 5), CLASSES, TEMPLATES)
    with pytest.raises(ValueError, match="same D"):
        zero_shot_classify(torch.randn(2, 4), torch.randn(3, 5))


# --------------------------------------------------------------------------- soft prompts
def test_soft_prompt_shapes_and_insert_position():
    torch.manual_seed(0)
    prompt = SoftPrompt(n_ctx=3, d_model=4, insert_at=1)
    emb = torch.randn(2, 5, 4)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    x, m = prompt(emb, mask)
    assert x.shape == (2, 8, 4) and m.shape == (2, 8)
    assert torch.equal(x[:, 0], emb[:, 0]) and torch.equal(x[:, 4:], emb[:, 1:])
    assert torch.equal(x[1, 1:4], prompt.ctx.detach())
    assert m[1].tolist() == [True, True, True, True, True, False, False, False]
    with pytest.raises(ValueError, match="d_model=4"):
        prompt(torch.randn(2, 5, 3))


@pytest.mark.parametrize("encoder_kind", ["transformer", "gru"])
def test_soft_prompt_gradients_reach_only_the_context(encoder_kind):
    torch.manual_seed(0)
    if encoder_kind == "transformer":
        text = TransformerTextEncoder(20, d_model=8, depth=1, n_heads=2, max_len=10, pool="mean")
        d = 8
    else:
        text = GRUTextEncoder(20, d_word=6, d_model=8)
        d = 6
    proj = nn.Linear(8, 4)
    freeze(text)
    freeze(proj)
    prompt = SoftPrompt(n_ctx=2, d_model=d)
    class_ids = torch.tensor([[5, 6, 0], [7, 0, 0], [8, 9, 10]])
    class_mask = class_ids != 0
    image_feats = torch.randn(6, 4)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    opt = torch.optim.Adam(trainable_parameters(prompt), lr=0.05)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        w = prompted_class_embeddings(prompt, text, class_ids, class_mask, projection=proj)  # (C, 4)
        loss = cross_entropy(zero_shot_classify(image_feats, w, 10.0), labels)
        loss.backward()
        check_gradients_only_reach(prompt, text, proj)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]  # the context alone can move the class embeddings
    unfreeze(proj)
    with pytest.raises(RuntimeError, match="frozen"):
        check_gradients_only_reach(prompt, text, proj)


def test_linear_probe_needs_examples_and_tensors():
    with pytest.raises(ValueError, match="at least one example"):
        fit_linear_probe(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), n_classes=2)
    with pytest.raises(TypeError, match="features must be a torch.Tensor, got list"):
        fit_linear_probe([[1.0, 2.0]], torch.tensor([0]))
    with pytest.raises(TypeError, match="labels must be a long tensor"):
        fit_linear_probe(torch.zeros(2, 4), torch.tensor([0.0, 1.0]))
    with pytest.raises(TypeError, match="features must be a torch.Tensor"):
        LinearProbe(2, 2)([[1.0, 2.0]])
    with pytest.raises(TypeError, match="image_feats must be a torch.Tensor"):
        zero_shot_classify([[1.0, 2.0]], torch.ones(3, 2))
    with pytest.raises(TypeError, match="mask must be a torch.Tensor"):
        SoftPrompt(2, 4)(torch.zeros(1, 3, 4), [[True, True, True]])
