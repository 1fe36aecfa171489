"""The dual encoder: unit embeddings, contrastive training lowers the loss, split embedding."""

import math

import pytest
import torch

from mmlite.data import DataConfig, build_tokenizer, generate, make_loader
from mmlite.evaluate import embed_split
from mmlite.models import DualEncoder
from mmlite.recipes import train_dual_encoder
from mmlite.tasks import dual_loss
from mmlite.train import FitConfig


@pytest.fixture(scope="module")
def world():
    return generate(DataConfig(n_train=64, n_val=8, n_test=24, n_comp=8), seed=5)


def test_embeddings_are_unit_vectors_and_loss_is_log_b_when_all_equal():
    tok = build_tokenizer()
    torch.manual_seed(0)
    model = DualEncoder(len(tok), d_model=16, d_embed=8, cnn_width=8)
    ids, mask = tok.encode_batch(["a red circle", "two blue squares"], add_bos_eos=True)
    z_i, z_t = model(torch.rand(2, 3, 32, 32), ids, mask)
    assert z_i.shape == z_t.shape == (2, 8)
    torch.testing.assert_close(z_i.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(z_t.norm(dim=1), torch.ones(2))
    # four copies of one pair: every logit is equal, so each row's cross-entropy is log B whatever the scale
    model.eval()  # BatchNorm on identical images would otherwise normalise them to zero
    ids4, mask4 = tok.encode_batch(["a red circle"] * 4, add_bos_eos=True)
    batch = {"image": torch.rand(1, 3, 32, 32).expand(4, -1, -1, -1), "caption_ids": ids4, "caption_mask": mask4}
    loss = dual_loss(model, batch)
    assert loss.item() == pytest.approx(math.log(4), abs=1e-5)  # float32 log-softmax of 4 equal numbers
    loss.backward()  # and it is differentiable end to end
    assert model.logit_scale.value.grad is not None


def test_training_lowers_the_contrastive_loss(world):
    tok = build_tokenizer()
    torch.manual_seed(0)
    model = DualEncoder(len(tok), d_model=16, d_embed=8, cnn_width=8)
    batch = next(iter(make_loader(world["train"], tok, batch_size=32, shuffle=False)))
    before = dual_loss(model, batch).item()
    history = train_dual_encoder(model, world["train"], tok, FitConfig(steps=40, lr=3e-3, warmup=5), batch_size=32)
    assert len(history.losses) == 40
    assert dual_loss(model, batch).item() < before
    assert model.logit_scale.forward().item() <= 100.0 + 1e-4


def test_embed_split_covers_every_image(world):
    tok = build_tokenizer()
    model = DualEncoder(len(tok), d_model=16, d_embed=8, cnn_width=8)
    z_i, z_t = embed_split(model, world["test"], tok, batch_size=10)
    assert z_i.shape == z_t.shape == (24, 8)
    assert model.training, "embed_split restores the training mode"
    torch.testing.assert_close(z_i[:10], model.eval().encode_image(world["test"].image_tensor(range(10))))
    _, z_t2 = embed_split(model, world["test"], tok, caption=2, batch_size=10)  # the caption asked for
    ids, mask = tok.encode_batch([world["test"].captions[i][2] for i in range(24)], add_bos_eos=True)
    torch.testing.assert_close(z_t2, model.encode_text(ids, mask))
    assert not torch.allclose(z_t2, z_t)


def test_training_clamps_the_logit_scale_parameter_after_every_step(world):
    tok = build_tokenizer()
    torch.manual_seed(0)
    model = DualEncoder(len(tok), d_model=16, d_embed=8, cnn_width=8)
    cap = model.logit_scale.t_max  # ln 100
    with torch.no_grad():
        model.logit_scale.value.fill_(cap + 0.5)  # above the cap: forward() caps it, only clamp_() moves it back
    train_dual_encoder(model, world["train"], tok, FitConfig(steps=2, lr=1e-3, warmup=0), batch_size=32)
    # two AdamW steps of lr 1e-3 move t by at most ~2e-3, so only the clamp hook brings it back to ln 100
    assert model.logit_scale.value.item() <= cap + 1e-6


def test_split_image_tensor_layout(world):
    x = world["test"].image_tensor([0, 2])
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert torch.equal((x[1] * 255).round().byte().permute(1, 2, 0), torch.from_numpy(world["test"].images[2]))
