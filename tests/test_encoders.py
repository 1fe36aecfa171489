"""Tests for mmlite.encoders: pooling, GRU against torch.nn.GRU, CNN, patch embedding + ViT, text encoders."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from mmlite.encoders import (
    GRU,
    CNNEncoder,
    GRUTextEncoder,
    PatchEmbedding,
    TransformerTextEncoder,
    ViTEncoder,
    cls_pool,
    gru_cell,
    last_token_pool,
    masked_mean,
)

# float32 oracle tolerance: the recurrence repeats ~10 matmuls of width <= 16 per step; the two
# implementations sum in different orders, so differences are a few float32 ulps (~1e-7) growing
# mildly with T. 1e-5 leaves a wide margin while still catching any wrong gate or bias.
TOL32 = dict(atol=1e-5, rtol=1e-5)
# exact-invariance checks (same computation, only masked inputs changed): pure float32 round-off
INVARIANT = dict(atol=1e-6, rtol=1e-5)


def lengths_to_mask(lengths: list[int], t: int) -> torch.Tensor:
    """Right-padded bool mask (B, T) from lengths."""
    return torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]


# --------------------------------------------------------------------------- pooling
def test_masked_mean_matches_manual_mean_and_handles_empty_rows():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 4, generator=g, requires_grad=True)
    mask = lengths_to_mask([5, 2, 0], 5)
    out = masked_mean(x, mask)
    torch.testing.assert_close(out[0], x[0].mean(0))
    torch.testing.assert_close(out[1], x[1, :2].mean(0))
    assert torch.equal(out[2], torch.zeros(4))
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.equal(x.grad[2], torch.zeros(5, 4))
    torch.testing.assert_close(masked_mean(x, None), x.mean(1))


def test_cls_and_last_token_pool():
    x = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)  # (B, T, D)
    assert torch.equal(cls_pool(x), x[:, 0])
    mask = lengths_to_mask([3, 0], 4)
    last = last_token_pool(x, mask)
    assert torch.equal(last[0], x[0, 2]) and torch.equal(last[1], torch.zeros(3))
    assert torch.equal(last_token_pool(x), x[:, -1])


def test_pooling_rejects_bad_masks():
    x = torch.randn(2, 4, 3)
    with pytest.raises(TypeError, match="bool"):
        masked_mean(x, torch.ones(2, 4))
    with pytest.raises(ValueError, match="mask shape"):
        masked_mean(x, torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="x must be"):
        cls_pool(torch.randn(2, 3))


# --------------------------------------------------------------------------- GRU
def _pair(input_size=5, hidden=7, layers=2, seed=0):
    torch.manual_seed(seed)
    ref = nn.GRU(input_size, hidden, num_layers=layers, batch_first=True)
    ours = GRU(input_size, hidden, num_layers=layers).copy_from_torch(ref)
    return ours, ref


def test_gru_parameter_layout_matches_torch():
    ours, ref = _pair()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}


def test_gru_matches_torch_forward_and_backward():
    ours, ref = _pair()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 6, 5, generator=g)
    h0 = torch.randn(2, 3, 7, generator=g)
    for h in (None, h0):
        out, h_n = ours(x, h)
        out_ref, h_ref = ref(x, h)
        torch.testing.assert_close(out, out_ref, **TOL32)
        torch.testing.assert_close(h_n, h_ref, **TOL32)
    # gradients of every parameter agree too (same names, same layout)
    ours(x, h0)[0].pow(2).sum().backward()
    ref(x, h0)[0].pow(2).sum().backward()
    for (name, p), (_, q) in zip(ours.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-4, msg=name)  # sums over B*T terms


def test_gru_with_padding_matches_pack_padded_sequence():
    ours, ref = _pair()
    g = torch.Generator().manual_seed(2)
    lengths = [6, 3, 1, 4]
    x = torch.randn(4, 6, 5, generator=g)
    mask = lengths_to_mask(lengths, 6)
    out, h_n = ours(x, mask=mask)
    packed = pack_padded_sequence(x, torch.tensor(lengths), batch_first=True, enforce_sorted=False)
    out_packed, h_ref = ref(packed)
    out_ref, _ = pad_packed_sequence(out_packed, batch_first=True, total_length=6)
    torch.testing.assert_close(out, out_ref, **TOL32)  # includes zeros at padded steps
    torch.testing.assert_close(h_n, h_ref, **TOL32)  # state at each row's last real step
    assert torch.equal(out[~mask], torch.zeros_like(out[~mask]))


def test_gru_batch_first_false_and_torch_gru_cell():
    torch.manual_seed(3)
    ref = nn.GRU(4, 6, batch_first=False)
    ours = GRU(4, 6, batch_first=False).copy_from_torch(ref)
    x = torch.randn(5, 2, 4)  # (T, B, I)
    torch.testing.assert_close(ours(x)[0], ref(x)[0], **TOL32)
    cell = nn.GRUCell(4, 6)
    h = torch.randn(2, 6)
    gi = F.linear(x[0], cell.weight_ih, cell.bias_ih)
    torch.testing.assert_close(gru_cell(gi, h, cell.weight_hh, cell.bias_hh), cell(x[0], h), **TOL32)


def test_gru_cell_and_gru_gradcheck_float64():
    g = torch.Generator().manual_seed(4)
    b, i, h = 2, 3, 4
    gi = torch.randn(b, 3 * h, dtype=torch.float64, generator=g, requires_grad=True)
    h0 = torch.randn(b, h, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(3 * h, h, dtype=torch.float64, generator=g, requires_grad=True)
    bias = torch.randn(3 * h, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(gru_cell, (gi, h0, w, bias))
    gru = GRU(i, h, num_layers=2).double()
    x = torch.randn(b, 3, i, dtype=torch.float64, generator=g, requires_grad=True)
    mask = lengths_to_mask([3, 2], 3)
    assert torch.autograd.gradcheck(lambda inp: gru(inp, mask=mask)[0], (x,))


def test_gru_validates_inputs():
    gru = GRU(5, 7)
    with pytest.raises(ValueError, match="input_size=5"):
        gru(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="3-D"):
        gru(torch.randn(3, 5))
    with pytest.raises(ValueError, match="h0 shape"):
        gru(torch.randn(2, 3, 5), torch.zeros(1, 3, 7))
    with pytest.raises(TypeError, match="bool"):
        gru(torch.randn(2, 3, 5), mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match="hidden_size"):
        gru.copy_from_torch(nn.GRU(5, 8, batch_first=True))


# --------------------------------------------------------------------------- CNN
@pytest.mark.parametrize("norm", ["batch", "group", "none"])
def test_cnn_shapes_for_32_and_64_images(norm):
    torch.manual_seed(0)
    cnn = CNNEncoder(width=8, d_model=16, depth=3, norm=norm)
    for size, grid in ((32, 4), (64, 8)):
        assert cnn.grid_size(size) == grid
        out, levels = cnn(torch.rand(2, 3, size, size), return_levels=True)
        assert out.tokens.shape == (2, grid * grid, 16) and out.mask.shape == (2, grid * grid) and out.mask.all()
        torch.testing.assert_close(out.pooled, out.tokens.mean(1))  # pooled = mean of the region tokens
        sides = cnn.level_grid_sizes(size)
        assert sides == [size // 2, size // 4, size // 8]
        assert [lv.shape for lv in levels] == [(2, s * s, c) for s, c in zip(sides, cnn.level_channels)]
    assert cnn(torch.rand(2, 3, 32, 32)).pooled.shape == (2, 16)


def test_cnn_tokens_are_the_row_major_grid_and_gradients_flow():
    torch.manual_seed(0)
    cnn = CNNEncoder(width=8, d_model=16, depth=2, norm="group")
    images = torch.rand(2, 3, 16, 16)
    tokens = cnn(images).tokens
    x = (images - 0.5) / 0.5  # the documented normalisation
    for stage in cnn.stages:
        x = stage(x)
    fmap = cnn.proj(x)  # (B, D, 4, 4)
    torch.testing.assert_close(tokens[:, 1 * 4 + 2], fmap[:, :, 1, 2])  # token k sits at (k // w, k % w)
    tokens.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in cnn.parameters())


def test_cnn_rejects_bad_images():
    cnn = CNNEncoder(width=8, d_model=16, depth=3)
    with pytest.raises(ValueError, match="in_channels=3"):
        cnn(torch.rand(2, 1, 32, 32))
    with pytest.raises(ValueError, match="height is 36"):
        cnn(torch.rand(2, 3, 36, 32))
    with pytest.raises(ValueError, match="image_size 20"):
        cnn.grid_size(20)
    with pytest.raises(TypeError, match="float"):
        cnn(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="norm"):
        CNNEncoder(norm="layer")


# --------------------------------------------------------------------------- patch embedding + ViT
def test_patch_embedding_equals_unfold_then_linear():
    torch.manual_seed(0)
    pe = PatchEmbedding(image_size=32, patch_size=8, in_channels=3, d_model=16)
    images = torch.rand(2, 3, 32, 32)
    patches = F.unfold(images, kernel_size=8, stride=8).transpose(1, 2)  # (B, N, C*P*P), (c, i, j) order
    linear = nn.Linear(3 * 8 * 8, 16)
    with torch.no_grad():
        linear.weight.copy_(pe.proj.weight.reshape(16, -1))  # (D, C*P*P)
        linear.bias.copy_(pe.proj.bias)
    # same dot products of length 192, summed in another order: float32 round-off only
    torch.testing.assert_close(pe(images), linear(patches), atol=1e-5, rtol=1e-5)
    assert pe.num_patches == 16 and pe.grid_size == 4


@pytest.mark.parametrize("size,patch,pool", [(32, 8, "cls"), (32, 4, "mean"), (64, 8, "cls")])
def test_vit_shapes_and_gradients(size, patch, pool):
    torch.manual_seed(0)
    vit = ViTEncoder(image_size=size, patch_size=patch, d_model=16, depth=1, n_heads=2, pool=pool)
    images = torch.rand(2, 3, size, size)
    n = (size // patch) ** 2
    tokens, mask, pooled = vit(images)
    assert tokens.shape == (2, n, 16) and vit.grid_size**2 == n and mask.shape == (2, n) and mask.all()
    if pool == "mean":
        torch.testing.assert_close(pooled, tokens.mean(1))
    else:  # the class token's output is not among the patch tokens
        assert not any(torch.allclose(pooled, tokens[:, k]) for k in range(n))
    pooled.sum().backward()
    assert all(p.grad is not None for p in vit.parameters())


def test_vit_images_are_independent_in_a_batch():
    torch.manual_seed(0)
    vit = ViTEncoder(image_size=16, patch_size=8, d_model=16, depth=2, n_heads=2)
    images = torch.rand(3, 3, 16, 16)
    a, b = vit(images), vit(images[1:])
    torch.testing.assert_close(a.tokens[1:], b.tokens, **INVARIANT)
    torch.testing.assert_close(a.pooled[1:], b.pooled, **INVARIANT)


def test_vit_rejects_bad_images():
    vit = ViTEncoder(image_size=32, patch_size=8, d_model=16, depth=1, n_heads=2)
    with pytest.raises(ValueError, match="in_channels=3"):
        vit(torch.rand(1, 4, 32, 32))
    with pytest.raises(ValueError, match="image_size=32"):
        vit(torch.rand(1, 3, 64, 64))
    with pytest.raises(ValueError, match="not divisible by patch_size 8"):
        PatchEmbedding(image_size=30, patch_size=8)
    with pytest.raises(ValueError, match="height is 30, not divisible by patch_size 8"):
        PatchEmbedding(image_size=32, patch_size=8)(torch.rand(1, 3, 30, 32))


# --------------------------------------------------------------------------- text encoders
V, PAD = 30, 0


def _ids_with_padding(g: torch.Generator, lengths: list[int], t: int) -> tuple[torch.Tensor, torch.Tensor]:
    mask = lengths_to_mask(lengths, t)
    ids = torch.randint(1, V, (len(lengths), t), generator=g)
    return ids.masked_fill(~mask, PAD), mask


def _text_encoders():
    torch.manual_seed(0)
    yield "gru", GRUTextEncoder(V, d_word=8, d_model=12, num_layers=2)
    for pool in ("cls", "first", "mean", "last", "none"):
        yield f"tf-{pool}", TransformerTextEncoder(V, d_model=16, depth=2, n_heads=2, max_len=10, pool=pool)
    yield "tf-causal", TransformerTextEncoder(V, d_model=16, depth=2, n_heads=2, max_len=10, pool="last", causal=True)


@pytest.mark.parametrize("name,enc", list(_text_encoders()))
def test_text_encoders_shapes_and_padding_invariance(name, enc):
    g = torch.Generator().manual_seed(5)
    ids, mask = _ids_with_padding(g, [7, 4, 1], 7)
    tokens, out_mask, pooled = enc(ids, mask)
    assert tokens.shape == (3, 7, enc.d_model) and torch.equal(out_mask, mask)  # tokens stay aligned with ids
    assert (pooled is None) == (name == "tf-none")
    # changing what sits at padded positions changes neither real outputs nor the pooled vector
    garbage = torch.randint(1, V, ids.shape, generator=g)
    tokens2, _, pooled2 = enc(torch.where(mask, ids, garbage), mask)
    torch.testing.assert_close(tokens2[mask], tokens[mask], **INVARIANT)
    if pooled is not None:
        torch.testing.assert_close(pooled2, pooled, **INVARIANT)
        pooled.sum().backward()
        assert enc.embed(ids).shape == (3, 7, enc.embedding.embedding_dim if name == "gru" else 16)
    # mask defaults to ids != pad_id; running from embeddings is the same computation
    torch.testing.assert_close(enc(ids).tokens, tokens)
    torch.testing.assert_close(enc.encode_embeddings(enc.embed(ids), mask).tokens, tokens)


def test_transformer_text_pooling_definitions():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(8)
    ids, mask = _ids_with_padding(g, [5, 2], 5)
    for pool in ("first", "mean", "last"):
        enc = TransformerTextEncoder(V, d_model=16, depth=1, n_heads=2, max_len=10, pool=pool)
        tokens, _, pooled = enc(ids, mask)
        expected = {"first": tokens[:, 0], "mean": masked_mean(tokens, mask), "last": last_token_pool(tokens, mask)}
        torch.testing.assert_close(pooled, expected[pool])
    torch.testing.assert_close(masked_mean(tokens, mask)[1], tokens[1, :2].mean(0))


def test_text_and_vit_encoders_agree_between_scratch_and_fused_attention():
    from mmlite.attention import set_attention_impl

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(9)
    ids, mask = _ids_with_padding(g, [6, 3], 6)
    enc = TransformerTextEncoder(V, d_model=16, depth=2, n_heads=2, max_len=10, pool="mean", causal=True)
    vit = ViTEncoder(image_size=16, patch_size=8, d_model=16, depth=2, n_heads=2)
    images = torch.rand(2, 3, 16, 16)
    tokens, _, pooled = enc(ids, mask)
    vit_tokens = vit(images).tokens
    assert set_attention_impl(enc, "fused") == 2 and set_attention_impl(vit, "fused") == 2
    tokens_f, _, pooled_f = enc(ids, mask)
    # the fused kernel sums the same dot products in another order: float32 round-off only
    torch.testing.assert_close(tokens_f[mask], tokens[mask], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled_f, pooled, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(vit(images).tokens, vit_tokens, atol=1e-5, rtol=1e-5)


def test_gru_text_encoder_pools_last_real_state():
    torch.manual_seed(0)
    enc = GRUTextEncoder(V, d_word=8, d_model=12)
    g = torch.Generator().manual_seed(6)
    ids, mask = _ids_with_padding(g, [5, 2], 5)
    tokens, _, pooled = enc(ids, mask)
    torch.testing.assert_close(pooled, tokens[torch.arange(2), torch.tensor([4, 1])])
    assert torch.equal(tokens[~mask], torch.zeros_like(tokens[~mask]))


def test_causal_text_encoder_does_not_look_ahead():
    torch.manual_seed(0)
    enc = TransformerTextEncoder(V, d_model=16, depth=2, n_heads=2, max_len=10, pool="last", causal=True)
    ids = torch.randint(1, V, (2, 6), generator=torch.Generator().manual_seed(7))
    changed = ids.clone()
    changed[:, 4] = torch.where(ids[:, 4] == 1, 2, 1)  # a different real token at position 4
    a, b = enc(ids).tokens, enc(changed).tokens
    torch.testing.assert_close(a[:, :4], b[:, :4], **INVARIANT)
    assert (a[:, 4:] - b[:, 4:]).abs().amax() > 1e-3


def test_text_encoders_validate_ids_and_length():
    tf = TransformerTextEncoder(V, d_model=16, depth=1, n_heads=2, max_len=6)
    gru = GRUTextEncoder(V, d_word=8, d_model=12)
    for enc in (tf, gru):
        with pytest.raises(ValueError, match="token id 30"):
            enc(torch.tensor([[1, 30]]))
        with pytest.raises(ValueError, match="token id -1"):
            enc(torch.tensor([[1, -1]]))
        with pytest.raises(TypeError, match="long"):
            enc(torch.ones(1, 3))
        with pytest.raises(ValueError, match="mask shape"):
            enc(torch.ones(1, 3, dtype=torch.long), torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="sequence length 7 exceeds max_len=6"):
        tf(torch.ones(1, 7, dtype=torch.long))
    for pool in ("cls", "first"):
        with pytest.raises(ValueError, match="causal"):
            TransformerTextEncoder(V, causal=True, pool=pool)


# --------------------------------------------------------------------------- degenerate inputs
def test_pooling_of_an_empty_sequence_gives_zeros():
    x = torch.randn(2, 0, 3, requires_grad=True)
    empty_mask = torch.zeros(2, 0, dtype=torch.bool)
    for out in (masked_mean(x), masked_mean(x, empty_mask), last_token_pool(x), last_token_pool(x, empty_mask)):
        assert torch.equal(out, torch.zeros(2, 3))  # as for a fully masked row, never NaN
    masked_mean(x).sum().backward()  # still attached to the graph
    with pytest.raises(ValueError, match="no class token"):
        cls_pool(x)


@pytest.mark.parametrize("name,enc", list(_text_encoders()))
def test_text_encoders_accept_an_empty_sequence(name, enc):
    from mmlite.data import build_tokenizer

    ids, mask = build_tokenizer().encode_batch(["", ""])  # (2, 0): what empty captions give
    tokens, _, pooled = enc(ids, mask)
    assert tokens.shape == (2, 0, enc.d_model)
    if name == "tf-cls":  # the class vector alone still runs through the blocks
        assert pooled.shape == (2, enc.d_model) and torch.isfinite(pooled).all()
    elif pooled is not None:
        assert torch.equal(pooled, torch.zeros(2, enc.d_model)), "no token: zeros, like a fully masked row"


def test_gru_on_an_empty_sequence_returns_h0():
    gru = GRU(3, 4, num_layers=2)
    h0 = torch.randn(2, 5, 4)
    out, h_n = gru(torch.randn(5, 0, 3), h0)
    assert out.shape == (5, 0, 4) and torch.equal(h_n, h0)
    out, h_n = gru(torch.randn(5, 0, 3))
    assert torch.equal(h_n, torch.zeros(2, 5, 4))


def test_encoders_and_pooling_reject_lists():
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got list"):
        GRU(2, 2)([[[1.0, 2.0]]])
    with pytest.raises(TypeError, match="h0 must be a torch.Tensor"):
        GRU(2, 2)(torch.zeros(1, 1, 2), h0=[[[0.0, 0.0]]])
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        masked_mean([[[1.0]]])
    with pytest.raises(TypeError, match="mask must be a torch.Tensor"):
        last_token_pool(torch.zeros(1, 2, 3), [[True, False]])
    with pytest.raises(TypeError, match="mask must be a torch.Tensor"):
        GRUTextEncoder(V, 4, 4)(torch.ones(1, 2, dtype=torch.long), [[True, True]])
    with pytest.raises(TypeError, match="embeddings must be a torch.Tensor"):
        TransformerTextEncoder(V, d_model=16, depth=1, n_heads=2).encode_embeddings([[[0.0] * 16]])


def test_vit_forward_is_normalise_patchify_prepend_cls_add_positions_blocks_norm():
    torch.manual_seed(0)
    vit = ViTEncoder(image_size=16, patch_size=8, d_model=16, depth=2, n_heads=2).eval()
    with torch.no_grad():
        vit.cls_token.normal_()  # make every term visible
    images = torch.rand(2, 3, 16, 16)
    x = vit.patch_embed.proj(2.0 * images - 1.0).flatten(2).transpose(1, 2)  # [0, 1] -> [-1, 1], then (B, 4, 16)
    x = torch.cat([vit.cls_token.expand(2, -1, -1), x], dim=1) + vit.pos_embed  # (B, 5, 16)
    for block in vit.stack.blocks:
        x = block(x)
    x = vit.stack.norm(x)
    out = vit(images)
    # the same operations: (x - 0.5) / 0.5 and 2x - 1 round differently in the last bit only
    torch.testing.assert_close(out.tokens, x[:, 1:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.pooled, x[:, 0], rtol=1e-5, atol=1e-5)  # pool="cls"
