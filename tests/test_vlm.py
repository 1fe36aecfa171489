"""Tests for the generative vision-language model: mmlite.models.vlm and mmlite.tasks.vlm (chat template, loss)."""

from __future__ import annotations

import pytest
import torch

from mmlite.blocks import TransformerStack
from mmlite.data.dataset import build_tokenizer
from mmlite.models.albef import ALBEF, ALBEFConfig
from mmlite.models.vlm import (VLM, Connector, VLMConfig, pixel_shuffle, prefix_attention_mask, splice,
                               text_positions)
from mmlite.objectives import cross_entropy
from mmlite.tasks.vlm import (ASSISTANT, CHAT_TOKENS, END, IMAGE, USER, ChatBatch, chat_tokenizer, collate_chat,
                              collate_prompts, decode_reply, encode_chat, vlm_config, vlm_loss)

# float64 tolerance of test_decoding: cached and full computations differ by a few ulps (~1e-15)
F64 = dict(atol=1e-9, rtol=0)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TOK = chat_tokenizer()
IMG, USR, AST, EOT = (TOK.token_to_id[t] for t in CHAT_TOKENS)
N_IMG = 16  # a 16x16 image through a 2-stage CNN: a 4x4 grid of image tokens


def _model(attention="causal", connector="mlp", seed=0, **kw):
    """A tiny float64 VLM in eval mode with peaked next-token distributions (unit-variance tied embeddings)."""
    torch.manual_seed(seed)
    cfg = dict(image_size=16, cnn_width=4, cnn_depth=2, d_vision=8, d_model=16, n_heads=2, depth=2, max_len=48,
               connector=connector, attention=attention)
    cfg.update(kw)
    model = VLM(vlm_config(TOK, **cfg))
    with torch.no_grad():
        model.decoder.token_embed.weight.normal_()
        model.decoder.pos_embed.normal_(std=0.5)
    return model.double().eval()


def _images(b, seed=1):
    return torch.rand(b, 3, 16, 16, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _words(ids):
    return [TOK.vocab[i] for i in ids.tolist()]


def _text_ids(rows, seed=2):
    """Rows of random word ids (no chat token) with the placeholder at the given positions: (B, T)."""
    g = torch.Generator().manual_seed(seed)
    t = max(rows) + 3
    ids = torch.randint(7, IMG, (len(rows), t), generator=g)  # base words only
    for b, p in enumerate(rows):
        ids[b, p] = IMG
    return ids


# --------------------------------------------------------------------------- chat tokenizer and template


def test_chat_tokenizer_keeps_the_base_ids_and_appends_the_chat_tokens():
    base = build_tokenizer()
    assert TOK.vocab[:len(base)] == base.vocab  # the shipped model's ids are untouched
    assert TOK.vocab[len(base):] == list(CHAT_TOKENS)
    extra = chat_tokenizer(["zebra", "circle", "zebra", "giraffe"])  # known and repeated words are skipped
    assert extra.vocab[:len(TOK)] == TOK.vocab and extra.vocab[len(TOK):] == ["zebra", "giraffe"]
    assert TOK.tokenize("<image> <user> what ? <assistant> red <end>") == [
        IMAGE, USER, "what", "?", ASSISTANT, "red", END]  # each chat token is one token
    with pytest.raises(TypeError, match="single str"):
        chat_tokenizer("zebra")
    with pytest.raises(ValueError, match="lower-case"):
        chat_tokenizer(["Zebra"])


def test_encode_chat_token_by_token():
    ex = encode_chat(TOK, [("what color is the circle ?", "red"), ("how many shapes are there ?", "two")])
    expected = [(IMAGE, 0), (USER, 0), ("what", 0), ("color", 0), ("is", 0), ("the", 0), ("circle", 0), ("?", 0),
                (ASSISTANT, 0), ("red", 1), (END, 1),
                (USER, 0), ("how", 0), ("many", 0), ("shapes", 0), ("are", 0), ("there", 0), ("?", 0),
                (ASSISTANT, 0), ("two", 1), (END, 1)]
    assert list(zip(_words(ex.ids), ex.labels.int().tolist())) == expected
    assert ex.ids.dtype == torch.long and ex.labels.dtype == torch.bool
    # a prompt: the last answer left open, nothing labelled in it; a text-only conversation has no placeholder
    prompt = encode_chat(TOK, [("what shape is red ?", "circle"), ("what color is the square ?", None)])
    assert _words(prompt.ids) == [IMAGE, USER, "what", "shape", "is", "red", "?", ASSISTANT, "circle", END,
                                  USER, "what", "color", "is", "the", "square", "?", ASSISTANT]
    assert prompt.labels.nonzero()[:, 0].tolist() == [8, 9]
    text_only = encode_chat(TOK, [("what color is the circle ?", "red")], image=False)
    assert _words(text_only.ids)[0] == USER and text_only.labels.sum() == 2


def test_collate_chat_aligns_the_labels_with_the_targets():
    convs = [[("what color is the circle ?", "red"), ("how many shapes are there ?", "two")],
             [("what shape is blue ?", "large square")]]
    batch = collate_chat([encode_chat(TOK, c) for c in convs])
    assert isinstance(batch, ChatBatch) and batch.inputs.shape == batch.targets.shape == (2, 20)
    # where the shifted label mask is True the targets are exactly the answers and their <end>, in order
    assert _words(batch.targets[0][batch.target_mask[0]]) == ["red", END, "two", END]
    assert _words(batch.targets[1][batch.target_mask[1]]) == ["large", "square", END]
    # ... and the inputs there are what precedes each: <assistant> first, then the answer so far
    assert _words(batch.inputs[0][batch.target_mask[0]]) == [ASSISTANT, "red", ASSISTANT, "two"]
    assert _words(batch.inputs[1][batch.target_mask[1]]) == [ASSISTANT, "large", "square"]
    # the targets are the inputs moved by one; padding is neither fed as real nor trained on
    torch.testing.assert_close(batch.targets[:, :-1], batch.inputs[:, 1:], rtol=0, atol=0)
    assert batch.input_mask[1].sum() == 11 and batch.target_mask[1, 9] and not batch.target_mask[1, 10:].any()
    assert batch.inputs[0, 0] == IMG and batch.inputs[1, 0] == IMG  # the placeholder is fed
    # the known failure: the unshifted labels against the shifted targets select the wrong tokens
    unshifted = encode_chat(TOK, convs[0]).labels[:-1]  # (20,): labels of the inputs, not of the targets
    assert _words(batch.targets[0][unshifted]) == [END, USER, END]  # one token late: "red" and "two" are missed


def test_collate_prompts_left_pads():
    short = encode_chat(TOK, [("what ?", None)])
    long = encode_chat(TOK, [("what color is the circle ?", None)])
    ids, mask = collate_prompts([short, long])
    assert ids.shape == (2, 9) and mask[0].tolist() == [False] * 4 + [True] * 5 and mask[1].all()
    assert ids[0, :4].eq(TOK.pad_id).all() and ids[:, -1].eq(AST).all()  # both end with <assistant>
    assert decode_reply(TOK, torch.tensor([TOK.token_to_id["red"], TOK.token_to_id["circle"], EOT, 0])) == \
        "red circle"


def test_chat_errors():
    with pytest.raises(ValueError, match="chat token"):
        encode_chat(TOK, [("what is <image> ?", "red")])
    with pytest.raises(ValueError, match="turn 0's answer.*unknown word.*'zebra'"):
        encode_chat(TOK, [("what ?", "zebra")])
    with pytest.raises(ValueError, match="only the last turn may be left open"):
        encode_chat(TOK, [("what ?", None), ("what ?", "red")])
    with pytest.raises(ValueError, match="turn 1's question is empty"):
        encode_chat(TOK, [("what ?", "red"), ("  ", "red")])
    with pytest.raises(ValueError, match="non-empty sequence"):
        encode_chat(TOK, [])
    with pytest.raises(ValueError, match="pair"):
        encode_chat(TOK, ["what ?"])
    with pytest.raises(ValueError, match="lacks the chat tokens"):
        encode_chat(build_tokenizer(), [("what ?", "red")])
    with pytest.raises(ValueError, match="example 1 has no answer token"):
        collate_chat([encode_chat(TOK, [("what ?", "red")]), encode_chat(TOK, [("what ?", None)])])


# --------------------------------------------------------------------------- connector, splicing, prefix mask


def test_pixel_shuffle_matches_a_loop():
    tokens = torch.randn(2, 16, 3, generator=torch.Generator().manual_seed(0))  # a 4x4 grid
    out = pixel_shuffle(tokens, 2)
    assert out.shape == (2, 4, 12)  # 4x fewer tokens, 4x wider
    for b in range(2):
        for r in range(2):
            for c in range(2):
                parts = [tokens[b, (2 * r + a) * 4 + (2 * c + e)] for a in range(2) for e in range(2)]
                torch.testing.assert_close(out[b, r * 2 + c], torch.cat(parts), rtol=0, atol=0)
    torch.testing.assert_close(pixel_shuffle(tokens, 1), tokens, rtol=0, atol=0)
    with pytest.raises(ValueError, match="square grid.*N=12"):
        pixel_shuffle(tokens[:, :12], 2)
    with pytest.raises(ValueError, match="4x4 grid of image tokens is not divisible by factor=3"):
        pixel_shuffle(tokens, 3)


def test_connectors():
    torch.manual_seed(0)
    x = torch.randn(2, 16, 8)
    for kind, n in (("linear", 16), ("mlp", 16), ("pixel_shuffle", 4)):
        assert Connector(kind, 8, 12).forward(x).shape == (2, n, 12)
    mlp = Connector("mlp", 8, 12)
    first, second = mlp.proj[0], mlp.proj[2]
    torch.testing.assert_close(mlp(x), second(torch.nn.functional.gelu(first(x))))  # Linear-GELU-Linear
    shuffle = Connector("pixel_shuffle", 8, 12)
    torch.testing.assert_close(shuffle(x), shuffle.proj(pixel_shuffle(x, 2)))
    assert _model(connector="pixel_shuffle").cfg.n_image_tokens == N_IMG // 4
    with pytest.raises(ValueError, match="shuffle_factor=2 does not divide the 3x3 grid"):
        vlm_config(TOK, image_size=24, cnn_depth=3, connector="pixel_shuffle")
    with pytest.raises(ValueError, match="square grid"):
        shuffle(x[:, :15])
    with pytest.raises(ValueError, match="connector must be one of"):
        vlm_config(TOK, connector="qformer")


def test_splice_matches_a_loop_with_per_row_positions():
    g = torch.Generator().manual_seed(0)
    text, image = torch.randn(3, 5, 4, generator=g), torch.randn(3, 2, 4, generator=g)
    at = torch.tensor([0, 2, 4])  # first, middle, last position
    out = splice(text, image, at)
    assert out.shape == (3, 6, 4)
    for b, p in enumerate(at.tolist()):
        rows = [text[b, t] for t in range(p)] + [image[b, k] for k in range(2)] + [text[b, t] for t in range(p + 1, 5)]
        torch.testing.assert_close(out[b], torch.stack(rows), rtol=0, atol=0)
    # each text position reads the spliced output that has seen it: before p itself, at p the last image token
    assert text_positions(at, 5, 2).tolist() == [[1, 2, 3, 4, 5], [0, 1, 3, 4, 5], [0, 1, 2, 3, 5]]


def test_prefix_attention_mask_by_hand():
    is_image = torch.tensor([[False, True, True, True, False, False]])
    expected = torch.tensor([[1, 0, 0, 0, 0, 0],
                             [1, 1, 1, 1, 0, 0],  # an image token sees the whole image
                             [1, 1, 1, 1, 0, 0],
                             [1, 1, 1, 1, 0, 0],
                             [1, 1, 1, 1, 1, 0],  # text after the image: causal
                             [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(prefix_attention_mask(is_image)[0], expected)


@pytest.mark.parametrize("impl", ["scratch", "fused"])
def test_stack_bidirectional_group_equals_an_explicit_mask_and_caches(impl):
    torch.manual_seed(0)
    causal = TransformerStack(8, 2, 2, causal=True, impl=impl).double()
    full = TransformerStack(8, 2, 2, causal=False, impl=impl).double()
    full.load_state_dict(causal.state_dict())
    x = torch.randn(2, 7, 8, dtype=torch.float64)
    group = torch.zeros(2, 7, dtype=torch.bool)
    group[0, 1:4], group[1, 3:6] = True, True  # a block of 3 at different places
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 0] = False  # a padded key
    allowed = torch.zeros(2, 7, 7, dtype=torch.bool)  # by hand: causal, or both in the group; real keys only
    for b in range(2):
        for i in range(7):
            for j in range(7):
                allowed[b, i, j] = bool(mask[b, j]) and (j <= i or bool(group[b, i] and group[b, j]))
    got = causal(x, mask=mask, bidirectional=group)
    torch.testing.assert_close(got, full(x, mask=allowed), **F64)
    # cached: the group inside the first chunk (rows 0..5), then single tokens
    cache = causal.new_cache()
    first = causal(x[:, :6], mask=mask[:, :6], cache=cache, bidirectional=group[:, :6])
    last = causal(x[:, 6:], mask=mask, cache=cache)
    torch.testing.assert_close(torch.cat([first, last], dim=1), got, **F64)
    assert not torch.allclose(got, causal(x, mask=mask))  # the group mattered
    with pytest.raises(ValueError, match="not causal"):
        full(x, bidirectional=group)
    with pytest.raises(ValueError, match=r"bidirectional shape \(2, 6\)"):
        causal(x, bidirectional=group[:, :6])


# --------------------------------------------------------------------------- the model against references


def _reference_logits(model, images, ids):
    """Row by row: splice by a Python loop, positions 0.., a non-causal copy of the stack with a mask built by
    hand (causal, plus the image block for "prefix"), logits read by a loop at each text position."""
    dec = model.decoder
    full = TransformerStack(dec.d_model, dec.stack.depth, 2, causal=False).double()
    full.load_state_dict(dec.stack.state_dict())
    image_tokens = model.image_tokens(images)  # (B, N, D)
    n = image_tokens.shape[1]
    out = []
    for b in range(ids.shape[0]):
        row = ids[b].tolist()
        p = row.index(IMG)
        emb = dec.token_embed(ids[b])
        seq = [emb[t] for t in range(p)] + [image_tokens[b, k] for k in range(n)] + \
              [emb[t] for t in range(p + 1, len(row))]
        s = len(seq)
        x = torch.stack(seq)[None] + dec.pos_embed[:, :s]
        allowed = torch.zeros(1, s, s, dtype=torch.bool)
        for i in range(s):
            for j in range(s):
                both_image = p <= i < p + n and p <= j < p + n
                allowed[0, i, j] = j <= i or (dec.attention == "prefix" and both_image)
        h = full(x, mask=allowed)[0]
        read = [t if t < p else t + n - 1 for t in range(len(row))]
        out.append(dec.lm_head(h[read]))
    return torch.stack(out)


@pytest.mark.parametrize("attention", ["causal", "prefix"])
def test_forward_equals_a_row_by_row_reference(attention):
    model = _model(attention)
    ids = _text_ids([0, 2, 4])  # the placeholder at a different position in each row
    images = _images(3)
    logits = model(images, ids)
    assert logits.shape == (3, ids.shape[1], len(TOK))
    torch.testing.assert_close(logits, _reference_logits(model, images, ids), **F64)


def test_prefix_lets_image_tokens_see_the_whole_image_and_nothing_else_changes():
    causal, prefix = _model("causal"), _model("prefix")
    prefix.load_state_dict(causal.state_dict())
    ids = _text_ids([2])
    images = _images(1)
    a, b = causal(images, ids), prefix(images, ids)
    torch.testing.assert_close(a[:, :2], b[:, :2], rtol=0, atol=0)  # text before the image: the same
    assert not torch.allclose(a[:, 2:], b[:, 2:])  # from the image on it differs
    # in causal mode the first image token ignores the others; with prefix attention it sees them
    ctx = causal.image_tokens(images)
    moved = ctx.clone()
    moved[:, -1] += torch.randn(moved.shape[-1], generator=torch.Generator().manual_seed(0), dtype=moved.dtype)
    first_image = 2  # spliced position of the first image token
    for m, sees_later in ((causal, False), (prefix, True)):
        seen = []  # the stack's outputs (B, S, D)
        hook = m.decoder.stack.register_forward_hook(lambda mod, inp, out: seen.append(out))
        m.decoder(ids, context=ctx)
        m.decoder(ids, context=moved)
        hook.remove()
        changed = not torch.equal(seen[0][:, first_image], seen[1][:, first_image])
        assert changed == sees_later, m.cfg.attention


def _left_padded():
    """Three prompts of different lengths, left-padded: ids, mask (B, P)."""
    prompts = [encode_chat(TOK, [("what color is the circle ?", None)]),
               encode_chat(TOK, [("how many ?", None)]),
               encode_chat(TOK, [("what shape is red ?", "circle"), ("what color is the square ?", None)])]
    return collate_prompts(prompts, pad_id=TOK.pad_id)


@pytest.mark.parametrize("attention", ["causal", "prefix"])
def test_cached_steps_equal_forward_with_left_padding(attention):
    model = _model(attention)
    ids, mask = _left_padded()
    images = _images(3)
    ctx = model.image_tokens(images)
    full = model.decoder(ids, mask, context=ctx)
    for chunks in ([ids.shape[1] - 3, 1, 2], [ids.shape[1] - 1, 1]):  # the prefill holds every placeholder
        cache, out, start = model.decoder.new_cache(), [], 0
        for n in chunks:
            out.append(model.decoder.step(ids[:, start:start + n], cache, context=ctx, mask=mask[:, :start + n]))
            start += n
            assert len(cache) == start
        assert len(cache.kv) == start - 1 + N_IMG
        torch.testing.assert_close(torch.cat(out, dim=1)[mask], full[mask], **F64)
    # left padding changes nothing: each prompt alone gives the same logits at its real positions
    for b in range(3):
        alone = model.decoder(ids[b, mask[b]][None], context=ctx[b:b + 1])
        torch.testing.assert_close(full[b, mask[b]], alone[0], **F64)


def _greedy_by_hand(model, images, prompt, steps):
    """One prompt (P,), full recomputation through forward, argmax of the last position, stop at <end>."""
    seq = prompt.tolist()
    for _ in range(steps):
        seq.append(int(model(images, torch.tensor([seq]))[0, -1].argmax()))
        if seq[-1] == EOT:
            break
    return seq[len(prompt):]


@pytest.mark.parametrize("attention", ["causal", "prefix"])
def test_generate_cached_equals_uncached_and_each_prompt_alone(attention):
    model = _model(attention, connector="pixel_shuffle")
    ids, mask = _left_padded()
    images = _images(3)
    greedy = model.generate(images, ids, mask, max_new_tokens=6)
    assert torch.equal(greedy, model.generate(images, ids, mask, max_new_tokens=6, use_cache=False))
    for b in range(3):
        by_hand = _greedy_by_hand(model, images[b:b + 1], ids[b, mask[b]], 6)
        assert greedy[b, :len(by_hand)].tolist() == by_hand
        assert greedy[b, len(by_hand):].eq(TOK.pad_id).all()
    for strategy, kw in (("beam", dict(beam_size=3)), ("sample", dict(temperature=1.5, top_p=0.9))):
        runs = [model.generate(images, ids, mask, max_new_tokens=6, strategy=strategy, use_cache=use_cache,
                               generator=torch.Generator().manual_seed(7), **kw) for use_cache in (True, False)]
        assert torch.equal(runs[0], runs[1])
    one = model.generate(images, ids, mask, max_new_tokens=6, strategy="beam", beam_size=1, length_penalty=0.0)
    assert torch.equal(one, greedy)  # a beam of one is greedy


# --------------------------------------------------------------------------- vision encoder, loss


@pytest.mark.parametrize("encoder", ["cnn", "vit"])
def test_init_vision_from_albef(encoder):
    torch.manual_seed(1)  # not _model's seed: the two encoders start different
    albef = ALBEF(ALBEFConfig(vocab_size=len(TOK), n_answers=3, image_size=16, image_encoder=encoder, cnn_width=4,
                              cnn_depth=2, patch_size=4, vit_depth=1, d_model=8, n_heads=2, text_depth=1,
                              fusion_depth=1, decoder_depth=1, d_embed=8)).eval()
    model = _model(image_encoder=encoder, patch_size=4, vit_depth=1, vision_heads=2).float()
    images = _images(2).float()
    assert not torch.allclose(model.encode_image(images).tokens, albef.encode_image(images).tokens)
    assert model.init_vision_from(albef) is model
    torch.testing.assert_close(model.encode_image(images).tokens, albef.encode_image(images).tokens, rtol=0, atol=0)
    other = _model(image_encoder=encoder, patch_size=4, vit_depth=1, vision_heads=2, d_vision=16, cnn_width=8)
    with pytest.raises(ValueError, match="d_vision=16 but ALBEFConfig.d_model=8"):
        other.init_vision_from(albef)
    with pytest.raises(TypeError, match="ALBEF"):
        model.init_vision_from(model)


def test_freeze_vision_keeps_the_encoder_fixed():
    model = _model(freeze_vision=True).float().train()
    assert not model.image_encoder.training and model.decoder.training  # BatchNorm statistics stay fixed
    assert all(not p.requires_grad for p in model.image_encoder.parameters())
    before = {k: v.clone() for k, v in model.image_encoder.state_dict().items()}
    batch = collate_chat([encode_chat(TOK, [("what color is the circle ?", "red")])] * 2)
    vlm_loss(model, _images(2).float(), batch).backward()
    assert all(p.grad is None for p in model.image_encoder.parameters())
    assert all(p.grad is not None for p in model.connector.parameters())
    for k, v in model.image_encoder.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    trainable = _model().float().train()
    assert trainable.image_encoder.training
    vlm_loss(trainable, _images(2).float(), batch).backward()
    assert all(p.grad is not None for p in trainable.image_encoder.parameters())


def test_vlm_loss_is_cross_entropy_over_the_answers_only():
    model = _model()
    convs = [[("what color is the circle ?", "red"), ("how many ?", "two")], [("what shape is blue ?", "square")]]
    batch = collate_chat([encode_chat(TOK, c) for c in convs])
    images = _images(2)
    logits = model(images, batch.inputs, batch.input_mask)
    rows, cols = batch.target_mask.nonzero(as_tuple=True)
    assert len(rows) == 4 + 2
    expected = torch.nn.functional.cross_entropy(logits[rows, cols], batch.targets[rows, cols])
    torch.testing.assert_close(vlm_loss(model, images, batch), expected, **F64)
    # the prompt is never a target: changing a question's target ids changes nothing
    changed = batch._replace(targets=torch.where(batch.target_mask, batch.targets, torch.zeros_like(batch.targets)))
    torch.testing.assert_close(vlm_loss(model, images, changed), expected, **F64)
    # text-only conversations go through the same model without images
    text = collate_chat([encode_chat(TOK, c, image=False) for c in convs])
    loss = vlm_loss(model, None, text)
    all_logits = model(None, text.inputs, text.input_mask)
    masked = torch.where(text.target_mask, text.targets, torch.full_like(text.targets, -100))
    torch.testing.assert_close(loss, cross_entropy(all_logits, masked), **F64)
    with pytest.raises(ValueError, match="no labelled target"):
        vlm_loss(model, images, batch._replace(target_mask=torch.zeros_like(batch.target_mask)))


# --------------------------------------------------------------------------- errors


def test_model_errors():
    model = _model()
    images = _images(2)
    ids = _text_ids([0, 1])
    none = ids.clone()
    none[1, 1] = 8
    with pytest.raises(ValueError, match=r"rows \[1\] of ids have no <image> placeholder"):
        model(images, none)
    two = ids.clone()
    two[0, 2] = IMG
    with pytest.raises(ValueError, match=r"rows \[0\] of ids hold more than one <image> placeholder"):
        model(images, two)
    with pytest.raises(ValueError, match="no image tokens were given"):
        model(None, ids)
    with pytest.raises(ValueError, match=r"images must be a float tensor \(B, 3, 16, 16\).*image_size=16"):
        model(torch.rand(2, 3, 32, 32, dtype=torch.float64), ids)
    with pytest.raises(ValueError, match="2 images but 1 rows"):
        model(images, ids[:1])
    with pytest.raises(ValueError, match="padded position"):
        model(images, ids, torch.tensor([[False] + [True] * 3, [True] * 4]))
    long = torch.full((2, 40), 8)
    long[:, 0] = IMG
    with pytest.raises(ValueError, match=r"sequence length 55 \(40 ids, the placeholder replaced by 16 image tokens\)"
                                         r" exceeds max_len=48"):
        model(images, long)
    with pytest.raises(ValueError, match="the prompt is longer than max_len: 40 ids .* 55 positions"):
        model.generate(images, long)
    prompt, mask = _left_padded()
    with pytest.raises(ValueError, match="lower max_new_tokens to at most 16"):
        model.generate(_images(3), prompt, mask, max_new_tokens=40)
    with pytest.raises(ValueError, match="left padding"):
        model.generate(_images(3), prompt, mask.flip(1))
    with pytest.raises(ValueError, match="strategy must be one of"):
        model.generate(_images(3), prompt, mask, strategy="topk")
    cache = model.decoder.new_cache()
    ctx = model.image_tokens(images)
    model.decoder.step(ids, cache, context=ctx)
    with pytest.raises(ValueError, match="after the first call"):
        model.decoder.step(ids[:, :1], cache, context=ctx)
    with pytest.raises(TypeError, match="VLMCache"):
        model.decoder.step(ids, model.decoder.stack.new_cache(), context=ctx)


def test_config_errors():
    with pytest.raises(ValueError, match="attention must be one of"):
        vlm_config(TOK, attention="full")
    with pytest.raises(ValueError, match="must be three different tokens"):
        VLMConfig(vocab_size=len(TOK), image_id=IMG, end_id=IMG)
    with pytest.raises(ValueError, match="end_id 99 is outside"):
        VLMConfig(vocab_size=len(TOK), image_id=IMG, end_id=99)
    with pytest.raises(ValueError, match="max_len=16 leaves no position for text beside the 16 image tokens"):
        vlm_config(TOK, max_len=16)
    with pytest.raises(TypeError, match="freeze_vision must be a bool"):
        vlm_config(TOK, freeze_vision=1)
    with pytest.raises(ValueError, match="image_size=20 is not a multiple of 2\\*\\*cnn_depth=8"):
        vlm_config(TOK, image_size=20)
    with pytest.raises(ValueError, match="d_vision=10 is not divisible by vision_heads=4"):
        vlm_config(TOK, image_encoder="vit", d_vision=10)
