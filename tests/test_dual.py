"""The dual encoder: unit embeddings, contrastive training lowers the loss, split embedding."""

import pytest
import torch

from mmlite.data import DataConfig, build_tokenizer, generate, make_loader
from mmlite.models import DualEncoder, dual_loss, embed_split, train_dual_encoder
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


def test_split_image_tensor_layout(world):
    x = world["test"].image_tensor([0, 2])
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert torch.equal((x[1] * 255).round().byte().permute(1, 2, 0), torch.from_numpy(world["test"].images[2]))
