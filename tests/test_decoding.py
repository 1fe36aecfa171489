"""Tests for the KV cache, mmlite.models.caption.TextDecoder and mmlite.models.decoding (greedy, beam search)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from mmlite.attention import AttentionCache, KVCache, MultiHeadAttention
from mmlite.blocks import TransformerStack
from mmlite.models.caption import TextDecoder
from mmlite.models.decoding import beam_search, greedy_decode, sample_decode, sampling_distribution

# float64 tolerance: the cached and the full computation do the same multiply-adds, only batched differently
# (a (T_new, T_past + T_new) score block instead of (T, T)), so they differ by a few ulps of O(1) values,
# ~1e-15; 1e-9 is a wide margin that a real error (a wrong position or mask, ~1e-2) cannot hide in.
F64 = dict(atol=1e-9, rtol=0)
# float32 tolerance against torch's layers, as in test_blocks: same ops in another order, measured <= 1e-6.
F32 = dict(atol=1e-5, rtol=1e-5)
BOS, EOS, PAD = 1, 2, 0


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _decoder(vocab=7, d_context=None, max_len=12, dropout=0.0, seed=0, dtype=torch.float64):
    """A small random decoder with peaked next-token distributions (unit-variance embeddings)."""
    torch.manual_seed(seed)
    dec = TextDecoder(vocab, d_model=16, depth=2, n_heads=4, max_len=max_len, d_context=d_context, ff_hidden=32,
                      dropout=dropout, pad_id=PAD)
    with torch.no_grad():
        dec.token_embed.weight.normal_()  # tied: logits ~ N(0, 16), so argmax and beams are far from ties
        dec.pos_embed.normal_(std=0.5)
    return dec.to(dtype).eval()


def _context(b=3, tc=5, d=12, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    ctx = torch.randn(b, tc, d, generator=g, dtype=dtype)
    cmask = torch.ones(b, tc, dtype=torch.bool)
    cmask[0, 3:] = False  # one example with padded image tokens
    return ctx, cmask


def _ids(b, t, vocab, seed=2):
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


def _cached_logits(dec, ids, chunks, **kw):
    cache = dec.new_cache()
    out, start = [], 0
    for n in chunks:
        out.append(dec.step(ids[:, start:start + n], cache, **kw))
        start += n
        assert len(cache) == start
    return torch.cat(out, dim=1)


# --------------------------------------------------------------------------- the cache


@pytest.mark.parametrize("with_context", [False, True])
def test_cached_steps_equal_full_forward(with_context):
    dec = _decoder(d_context=12 if with_context else None)
    ids = _ids(3, 9, 7)
    kw = dict(zip(("context", "context_mask"), _context())) if with_context else {}
    full = dec(ids, **kw)  # (3, 9, 7)
    assert full.shape == (3, 9, 7)
    # a multi-token first step (a prompt), then single tokens, then chunks
    torch.testing.assert_close(_cached_logits(dec, ids, [3, 1, 1, 2, 2], **kw), full, **F64)
    torch.testing.assert_close(_cached_logits(dec, ids, [1] * 9, **kw), full, **F64)


def test_cached_steps_with_a_key_mask_equal_forward():
    dec = _decoder(d_context=12)
    ctx, cmask = _context(b=2)
    ids = _ids(2, 7, 7)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, :2] = False  # left padding: the cached path takes a key mask over the past and new positions
    full = dec(ids, mask, context=ctx, context_mask=cmask)
    cache, out = dec.new_cache(), []
    for start, stop in ((0, 3), (3, 4), (4, 7)):
        out.append(dec.step(ids[:, start:stop], cache, context=ctx, context_mask=cmask, mask=mask[:, :stop]))
    torch.testing.assert_close(torch.cat(out, dim=1), full, **F64)
    assert not torch.allclose(dec(ids, context=ctx, context_mask=cmask)[1], full[1])  # the mask mattered


def test_attention_cache_self_and_cross():
    torch.manual_seed(0)
    mha = MultiHeadAttention(8, 2).double()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    full = mha(x, causal=True)
    cache = AttentionCache()
    a = mha(x[:, :2], causal=True, cache=cache)
    b, w = mha(x[:, 2:], causal=True, cache=cache, need_weights=True)
    assert len(cache) == 5 and cache.kind == "self" and w.shape == (2, 2, 3, 5)
    torch.testing.assert_close(torch.cat([a, b], dim=1), full, **F64)
    assert (w[:, :, 0, 3:] == 0).all() and (w[:, :, 1, 4:] == 0).all()  # position 2 sees 0..2, position 3 0..3
    # cross-attention: the context is projected at the first call, then its keys/values are reused
    cross = MultiHeadAttention(8, 2, d_context=6).double()
    ctx = torch.randn(2, 4, 6, dtype=torch.float64)
    ccache = AttentionCache()
    first = cross(x[:, :2], context=ctx, cache=ccache)
    k_ref = cross.k_proj(ctx).view(2, 4, 2, 4).transpose(1, 2)  # (B, heads, Tc, head_dim)
    torch.testing.assert_close(ccache.k, k_ref, rtol=0, atol=0)
    second = cross(x[:, 2:], context=ctx, cache=ccache)
    assert len(ccache) == 4
    torch.testing.assert_close(torch.cat([first, second], dim=1), cross(x, context=ctx), **F64)
    with pytest.raises(ValueError, match="cannot serve self-attention"):
        mha(x, cache=ccache)
    with pytest.raises(ValueError, match="context length is 3"):
        cross(x, context=ctx[:, :3], cache=ccache)
    with pytest.raises(ValueError, match="causal cross-attention"):
        cross(x, context=ctx, causal=True, cache=AttentionCache())


def test_cache_reorder_selects_and_repeats_rows():
    dec = _decoder(d_context=12)
    ctx, cmask = _context()
    ids = _ids(3, 6, 7)
    cache = dec.new_cache()
    dec.step(ids[:, :4], cache, context=ctx, context_mask=cmask)
    index = torch.tensor([2, 0, 0, 1])
    before = [(layer.self_attn.k.clone(), layer.cross_attn.v.clone()) for layer in cache.layers]
    cache.reorder(index)
    assert len(cache) == 4 and cache.batch_size == 4
    for layer, (k, v) in zip(cache.layers, before):
        torch.testing.assert_close(layer.self_attn.k, k[index], rtol=0, atol=0)
        torch.testing.assert_close(layer.cross_attn.v, v[index], rtol=0, atol=0)
    # continuing the reordered cache is decoding the reordered rows from scratch
    out = dec.step(ids[index, 4:6], cache, context=ctx[index], context_mask=cmask[index])
    ref = dec(ids[index], context=ctx[index], context_mask=cmask[index])[:, 4:6]
    torch.testing.assert_close(out, ref, **F64)
    with pytest.raises(TypeError, match="long"):
        cache.reorder(torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="1-D"):
        cache.reorder(torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="row 4, outside"):
        cache.reorder(torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="reorder"):
        dec.step(ids[:3, 4:5], cache, context=ctx, context_mask=cmask)  # cache has 4 rows, ids 3


# --------------------------------------------------------------------------- the decoder against torch


def _perturb(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # layers start as copies: make them differ, and the LayerNorms non-trivial
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))


@pytest.mark.parametrize("with_context", [False, True])
@pytest.mark.parametrize("tie", [True, False])
def test_decoder_matches_torch_transformer(with_context, tie):
    torch.manual_seed(0)
    d, heads, depth, vocab, t = 16, 4, 2, 11, 6
    layer_kind = torch.nn.TransformerDecoderLayer if with_context else torch.nn.TransformerEncoderLayer
    layer = layer_kind(d, heads, dim_feedforward=32, dropout=0.0, activation="gelu", norm_first=True,
                       batch_first=True)
    if with_context:
        ref = torch.nn.TransformerDecoder(layer, depth, norm=torch.nn.LayerNorm(d))
    else:
        ref = torch.nn.TransformerEncoder(layer, depth, norm=torch.nn.LayerNorm(d), enable_nested_tensor=False)
    ref.eval()
    _perturb(ref, 5)
    dec = TextDecoder(vocab, d_model=d, depth=depth, n_heads=heads, max_len=8, d_context=d if with_context else None,
                      ff_hidden=32, tie_embeddings=tie).eval()
    dec.stack.copy_from_torch(ref)
    assert (dec.lm_head.weight is dec.token_embed.weight) == tie
    ids = _ids(2, t, vocab)
    mask = torch.ones(2, t, dtype=torch.bool)
    mask[1, -2:] = False  # right padding: no query row is left without a visible key
    blocked = ~torch.ones(t, t, dtype=torch.bool).tril()  # True = blocked (torch's convention)
    x = dec.token_embed(ids) + dec.pos_embed[:, :t]
    with torch.no_grad():
        if with_context:
            ctx, cmask = _context(b=2, d=d, dtype=torch.float32)
            h = ref(x, ctx, tgt_mask=blocked, tgt_key_padding_mask=~mask, memory_key_padding_mask=~cmask)
            got = dec(ids, mask, context=ctx, context_mask=cmask)
        else:
            h = ref(x, mask=blocked, src_key_padding_mask=~mask)
            got = dec(ids, mask)
        expected = h @ dec.lm_head.weight.T  # (B, T, V)
    torch.testing.assert_close(got[mask], expected[mask], **F32)  # padded rows are meaningless in both


# --------------------------------------------------------------------------- greedy


def _greedy_by_hand(dec, n, max_len, eos, ctx=None, cmask=None):
    """Row by row, full recomputation, argmax of the last position, stop at [EOS]; padded to the longest."""
    rows = []
    for i in range(n):
        kw = {} if ctx is None else dict(context=ctx[i:i + 1], context_mask=cmask[i:i + 1])
        seq = [BOS]
        for _ in range(max_len):
            logits = dec(torch.tensor([seq]), **kw)[0, -1]
            seq.append(int(logits.argmax()))
            if seq[-1] == eos:
                break
        rows.append(seq[1:])
    length = max(len(r) for r in rows)
    return torch.tensor([r + [PAD] * (length - len(r)) for r in rows])


def test_greedy_cached_equals_recomputed_and_argmax_by_hand():
    dec = _decoder(d_context=12)
    ctx, cmask = _context()
    first = greedy_decode(dec, BOS, EOS, 8, context=ctx, context_mask=cmask)
    # choose as [EOS] a token row 0 generates at step 3, so that row ends early and the others may not
    eos = int(first[0, 2])
    cached = greedy_decode(dec, BOS, eos, 8, context=ctx, context_mask=cmask)
    plain = greedy_decode(dec, BOS, eos, 8, context=ctx, context_mask=cmask, use_cache=False)
    assert torch.equal(cached, plain)
    assert torch.equal(cached, _greedy_by_hand(dec, 3, 8, eos, ctx, cmask))
    assert (cached[0] == eos).any() and cached.shape[1] <= 8


def test_greedy_without_context_and_mode_restored():
    dec = _decoder(dropout=0.3)
    dec.train()
    out = greedy_decode(dec, BOS, EOS, 10, batch_size=2)
    assert dec.training  # mode restored
    ref = _greedy_by_hand(dec.eval(), 2, 10, EOS)  # greedy ran in eval mode: dropout off, deterministic
    assert torch.equal(out, ref)
    assert torch.equal(out[0], out[1])  # no context: every row is the same


# --------------------------------------------------------------------------- beam search


def _score(dec, tokens, length_penalty, eos, ctx=None, cmask=None):
    """sum log p(w_t | w_<t) / L ** length_penalty of one generated sequence (full recomputation)."""
    kw = {} if ctx is None else dict(context=ctx, context_mask=cmask)
    seq = torch.tensor([[BOS] + tokens])
    logp = torch.log_softmax(dec(seq[:, :-1], **kw)[0], dim=-1)  # (L, V)
    total = logp[torch.arange(len(tokens)), torch.tensor(tokens)].sum().item()
    return total / len(tokens) ** length_penalty


def _strip(row, eos):
    tokens = row.tolist()
    return tokens[:tokens.index(eos) + 1] if eos in tokens else tokens


@pytest.mark.parametrize("use_cache", [True, False])
def test_beam_of_one_is_greedy(use_cache):
    dec = _decoder(d_context=12)
    ctx, cmask = _context()
    eos = int(greedy_decode(dec, BOS, EOS, 8, context=ctx, context_mask=cmask)[1, 3])
    greedy = greedy_decode(dec, BOS, eos, 8, context=ctx, context_mask=cmask)
    ids, scores = beam_search(dec, BOS, eos, 8, beam_size=1, length_penalty=0.0, context=ctx, context_mask=cmask,
                              use_cache=use_cache)
    assert torch.equal(ids, greedy)
    for i in range(3):
        expected = _score(dec, _strip(greedy[i], eos), 0.0, eos, ctx[i:i + 1], cmask[i:i + 1])
        assert math.isclose(scores[i].item(), expected, abs_tol=1e-9)
    # with a length penalty one beam may keep going past greedy's [EOS]; greedy's caption stays a candidate
    _, scores1 = beam_search(dec, BOS, eos, 8, beam_size=1, length_penalty=1.0, context=ctx, context_mask=cmask)
    for i in range(3):
        assert scores1[i].item() >= _score(dec, _strip(greedy[i], eos), 1.0, eos, ctx[i:i + 1], cmask[i:i + 1]) - 1e-9


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_beam_cached_equals_recomputed_and_scores_are_the_formula(length_penalty):
    dec = _decoder(d_context=12)
    ctx, cmask = _context()
    kw = dict(beam_size=3, length_penalty=length_penalty, context=ctx, context_mask=cmask)
    ids, scores = beam_search(dec, BOS, 3, 8, **kw)
    ids_plain, scores_plain = beam_search(dec, BOS, 3, 8, use_cache=False, **kw)
    assert torch.equal(ids, ids_plain)
    torch.testing.assert_close(scores, scores_plain, **F64)
    for i in range(3):
        tokens = _strip(ids[i], 3)
        assert ids[i, len(tokens):].eq(PAD).all()
        expected = _score(dec, tokens, length_penalty, 3, ctx[i:i + 1], cmask[i:i + 1])
        assert math.isclose(scores[i].item(), expected, abs_tol=1e-9)
    # the batch changes nothing: each example alone gives the same answer
    for i in range(3):
        one, s = beam_search(dec, BOS, 3, 8, beam_size=3, length_penalty=length_penalty, context=ctx[i:i + 1],
                             context_mask=cmask[i:i + 1])
        assert one[0].tolist() == _strip(ids[i], 3) and math.isclose(s.item(), scores[i].item(), abs_tol=1e-9)


def _beam_reference(dec, k, max_len, eos, length_penalty, ctx, cmask):
    """The algorithm of beam_search's docstring for one example, in plain Python, always run to max_len."""
    beams, finished = [(0.0, [])], []
    for t in range(max_len):
        prefixes = torch.tensor([[BOS] + tokens for _, tokens in beams])  # (n_beams, t + 1)
        n = len(beams)
        logits = dec(prefixes, context=ctx.expand(n, -1, -1), context_mask=cmask.expand(n, -1))[:, -1]
        logp = torch.log_softmax(logits, dim=-1).tolist()  # (n_beams, V)
        candidates = [(total + lp, tokens + [w]) for (total, tokens), row in zip(beams, logp)
                      for w, lp in enumerate(row)]
        candidates.sort(key=lambda c: -c[0])
        beams = []
        for rank, (total, tokens) in enumerate(candidates[:2 * k]):
            if tokens[-1] == eos:
                if rank < k:
                    finished.append((total / (t + 1) ** length_penalty, tokens))
            elif len(beams) < k:
                beams.append((total, tokens))
    finished += [(total / max_len ** length_penalty, tokens) for total, tokens in beams]
    return max(finished, key=lambda f: f[0])


@pytest.mark.parametrize("beam_size", [1, 2])
@pytest.mark.parametrize("length_penalty", [0.0, 1.0, 2.0])
def test_beam_search_equals_a_plain_reference_run_to_the_end(length_penalty, beam_size):
    # flat distributions and a small beam: beams get reordered, [EOS] competes, stopping early is tested
    dec = _decoder(vocab=6, d_context=12, seed=5)
    with torch.no_grad():
        dec.token_embed.weight.mul_(0.4)
    ctx, cmask = _context(b=4, seed=6)
    expected = [_beam_reference(dec, beam_size, 8, EOS, length_penalty, ctx[i:i + 1], cmask[i:i + 1])
                for i in range(4)]
    for use_cache in (True, False):
        ids, scores = beam_search(dec, BOS, EOS, 8, beam_size=beam_size, length_penalty=length_penalty, context=ctx,
                                  context_mask=cmask, use_cache=use_cache)
        for i, (best_score, best) in enumerate(expected):
            assert _strip(ids[i], EOS) == best
            assert math.isclose(scores[i].item(), best_score, abs_tol=1e-9)


def _exhaustive_best(dec, vocab, max_len, eos, length_penalty, ctx=None, cmask=None):
    """Score every possible output (ended by [EOS], or max_len tokens without it); return the best."""
    others = [w for w in range(vocab) if w != eos]
    candidates = [list(p) + [eos] for n in range(max_len) for p in itertools.product(others, repeat=n)]
    candidates += [list(p) for p in itertools.product(others, repeat=max_len)]
    kw = {} if ctx is None else dict(context=ctx, context_mask=cmask)
    scored = []
    for n in range(1, max_len + 1):  # one forward per length: log p of every candidate of that length
        group = [c for c in candidates if len(c) == n]
        tokens = torch.tensor(group)  # (N, n)
        inputs = torch.cat([torch.full((len(group), 1), BOS), tokens[:, :-1]], dim=1)  # (N, n)
        expand = {key: value.expand(len(group), *value.shape[1:]) for key, value in kw.items()}
        logp = torch.log_softmax(dec(inputs, **expand), dim=-1)  # (N, n, V)
        totals = logp.gather(2, tokens[:, :, None])[:, :, 0].sum(dim=1)  # (N,)
        scored += [(total / n ** length_penalty, c) for total, c in zip(totals.tolist(), group)]
    return max(scored, key=lambda s: s[0])


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_large_beam_finds_the_exhaustive_optimum(length_penalty):
    vocab, max_len = 5, 3
    dec = _decoder(vocab=vocab, d_context=12, max_len=4, seed=3)
    with torch.no_grad():
        dec.token_embed.weight.mul_(0.5)  # flatter distributions, so that the optimum is not simply greedy's
    ctx, cmask = _context(b=2)
    # 80 >= every candidate of the last step (16 live prefixes x 5 tokens): nothing is ever pruned
    ids, scores = beam_search(dec, BOS, EOS, max_len, beam_size=80, length_penalty=length_penalty, context=ctx,
                              context_mask=cmask)
    for i in range(2):
        best_score, best = _exhaustive_best(dec, vocab, max_len, EOS, length_penalty, ctx[i:i + 1], cmask[i:i + 1])
        assert _strip(ids[i], EOS) == best
        assert math.isclose(scores[i].item(), best_score, abs_tol=1e-9)
    # and without a context (a plain language model)
    lm = _decoder(vocab=vocab, max_len=4, seed=4)
    with torch.no_grad():
        lm.token_embed.weight.mul_(0.5)
    ids, scores = beam_search(lm, BOS, EOS, max_len, beam_size=80, length_penalty=length_penalty, batch_size=1)
    best_score, best = _exhaustive_best(lm, vocab, max_len, EOS, length_penalty)
    assert _strip(ids[0], EOS) == best and math.isclose(scores[0].item(), best_score, abs_tol=1e-9)


class _PrefixCache:
    """The whole cache of _TableDecoder: the ids fed so far."""

    def __init__(self):
        self.ids = None  # (B, T_past) or None

    def __len__(self):
        return 0 if self.ids is None else self.ids.shape[1]

    def reorder(self, index):
        self.ids = self.ids[index]


class _TableDecoder(torch.nn.Module):
    """A decoder whose next-token probabilities are looked up by prefix; any prefix not in the table: [EOS] 0.9."""

    pad_id, max_len = PAD, 8

    def __init__(self, table):
        super().__init__()
        self.table = table  # prefix tuple (starting with [BOS]) -> probabilities over the 4 tokens PAD, BOS, EOS, w

    def _logp(self, prefix):
        return torch.tensor(self.table.get(tuple(prefix), [0.1 / 3, 0.1 / 3, 0.9, 0.1 / 3]), dtype=torch.float64).log()

    def forward(self, ids, mask=None, context=None, context_mask=None):
        return torch.stack([torch.stack([self._logp(row[:t + 1].tolist()) for t in range(ids.shape[1])])
                            for row in ids])  # (B, T, 4)

    def new_cache(self):
        return _PrefixCache()

    def step(self, ids_new, cache, context=None, context_mask=None):
        cache.ids = ids_new if cache.ids is None else torch.cat([cache.ids, ids_new], dim=1)
        return self(cache.ids)[:, -ids_new.shape[1]:]


W = 3  # the table decoder's one word


@pytest.mark.parametrize("use_cache", [True, False])
def test_beam_of_one_misses_what_a_beam_of_two_finds(use_cache):
    # after [BOS]: w 0.6 > [EOS] 0.3; after [BOS] w: [EOS] 0.45 > w 0.35. Greedy says "w [EOS]" (p = 0.27), while
    # "[EOS]" alone (p = 0.3) is the true optimum. A beam of one is full once w is taken at step 1, so it never
    # sets the second-ranked "[EOS]" aside and stays greedy; a beam of two keeps it and finds the optimum
    dec = _TableDecoder({(BOS,): [0.05, 0.05, 0.3, 0.6], (BOS, W): [0.1, 0.1, 0.45, 0.35]})
    assert greedy_decode(dec, BOS, EOS, 4, batch_size=1, use_cache=use_cache).tolist() == [[W, EOS]]
    ids, scores = beam_search(dec, BOS, EOS, 4, beam_size=1, length_penalty=0.0, batch_size=1, use_cache=use_cache)
    assert ids.tolist() == [[W, EOS]] and math.isclose(scores.item(), math.log(0.27), abs_tol=1e-12)
    ids, scores = beam_search(dec, BOS, EOS, 4, beam_size=2, length_penalty=0.0, batch_size=1, use_cache=use_cache)
    assert ids.tolist() == [[EOS]] and math.isclose(scores.item(), math.log(0.3), abs_tol=1e-12)
    assert _exhaustive_best(dec, 4, 4, EOS, 0.0)[1] == [EOS]


@pytest.mark.parametrize("use_cache", [True, False])
def test_beam_does_not_stop_while_a_longer_caption_can_still_win(use_cache):
    # length_penalty 1: "[EOS]" scores log 0.5 / 1 = -0.69 at step 1, and the live "w" (log 0.4 = -0.92) looks
    # worse; but it may still reach -0.92 / max_len. It does: "w w [EOS]" scores log(0.4 * 0.9 * 0.95) / 3 = -0.36.
    # Stopping on the current length (best live -0.92 / 1 < -0.69) would have returned "[EOS]".
    dec = _TableDecoder({(BOS,): [0.05, 0.05, 0.5, 0.4], (BOS, W): [0.02, 0.02, 0.06, 0.9],
                         (BOS, W, W): [0.05 / 3, 0.05 / 3, 0.95, 0.05 / 3]})
    ids, scores = beam_search(dec, BOS, EOS, 4, beam_size=1, length_penalty=1.0, batch_size=1, use_cache=use_cache)
    assert ids.tolist() == [[W, W, EOS]]
    assert math.isclose(scores.item(), math.log(0.4 * 0.9 * 0.95) / 3, abs_tol=1e-12)
    assert _exhaustive_best(dec, 4, 4, EOS, 1.0)[1] == [W, W, EOS]


# --------------------------------------------------------------------------- errors


def test_decoder_errors():
    dec = _decoder(d_context=12, max_len=6)
    lm = _decoder(max_len=6)
    ctx, _ = _context(b=1)
    with pytest.raises(ValueError, match="sequence length 7 exceeds max_len=6"):
        dec(_ids(1, 7, 7), context=ctx)
    cache = lm.new_cache()
    lm.step(_ids(1, 5, 7), cache)
    with pytest.raises(ValueError, match=r"sequence length 7 \(5 cached \+ 2 new\) exceeds max_len=6"):
        lm.step(_ids(1, 2, 7), cache)
    with pytest.raises(ValueError, match="d_context=12"):
        dec(_ids(1, 3, 7))
    with pytest.raises(ValueError, match="takes no context"):
        lm(_ids(1, 3, 7), context=ctx)
    with pytest.raises(ValueError, match=r"token id 7, outside \[0, vocab_size=7\)"):
        lm(torch.tensor([[1, 7]]))
    with pytest.raises(ValueError, match=r"len\(cache\) \+ T_new\) = \(1, 6\)"):
        lm.step(_ids(1, 1, 7), cache, mask=torch.ones(1, 1, dtype=torch.bool))  # 5 cached + 1 new positions
    with pytest.raises(TypeError, match="KVCache"):
        lm.step(_ids(1, 1, 7), None)
    with pytest.raises(ValueError, match="causal"):
        TransformerStack(8, 1, 2)(torch.randn(1, 2, 8), cache=KVCache(1))
    with pytest.raises(ValueError, match="depth=2"):
        lm.stack(torch.randn(1, 2, 16, dtype=torch.float64), cache=KVCache(1))


def test_decoding_argument_errors():
    dec = _decoder(d_context=12, max_len=6)
    ctx, cmask = _context(b=2)
    kw = dict(context=ctx, context_mask=cmask)
    for bad in (0, -1):
        with pytest.raises(ValueError, match="max_len"):
            greedy_decode(dec, BOS, EOS, bad, **kw)
        with pytest.raises(ValueError, match="beam_size"):
            beam_search(dec, BOS, EOS, 4, beam_size=bad, **kw)
    with pytest.raises(ValueError, match="built for max_len=6"):
        beam_search(dec, BOS, EOS, 7, **kw)
    with pytest.raises(TypeError, match="beam_size"):
        beam_search(dec, BOS, EOS, 4, beam_size=2.0, **kw)
    with pytest.raises(TypeError, match="max_len"):
        greedy_decode(dec, BOS, EOS, True, **kw)
    with pytest.raises(ValueError, match="length_penalty must be finite"):
        beam_search(dec, BOS, EOS, 4, length_penalty=float("nan"), **kw)
    with pytest.raises(TypeError, match="length_penalty"):
        beam_search(dec, BOS, EOS, 4, length_penalty="1", **kw)
    with pytest.raises(ValueError, match="batch_size=3 but context holds 2 rows"):
        greedy_decode(dec, BOS, EOS, 4, batch_size=3, **kw)
    with pytest.raises(ValueError, match="pass batch_size"):
        greedy_decode(_decoder(max_len=6), BOS, EOS, 4)
    with pytest.raises(ValueError, match="d_context=12"):
        beam_search(dec, BOS, EOS, 4, batch_size=2)  # the caption decoder needs its image tokens
    assert not dec.training  # an error inside leaves the mode as it was


# --------------------------------------------------------------------------- prompts


def test_a_prompt_continues_where_decoding_left_off():
    dec = _decoder(d_context=12)
    ctx, cmask = _context()
    never = 99  # an end token the decoder cannot produce: every row runs to max_len
    full = greedy_decode(dec, BOS, never, 8, context=ctx, context_mask=cmask)  # (3, 8)
    prompt = torch.cat([torch.full((3, 1), BOS), full[:, :3]], dim=1)  # [BOS] and the first 3 tokens
    kw = dict(context=ctx, context_mask=cmask, prompt=prompt)
    for use_cache in (True, False):
        assert torch.equal(greedy_decode(dec, None, never, 5, use_cache=use_cache, **kw), full[:, 3:])
        ids, _ = beam_search(dec, None, never, 5, beam_size=1, length_penalty=0.0, use_cache=use_cache, **kw)
        assert torch.equal(ids, full[:, 3:])


def test_left_padded_prompts_cached_equal_recomputed():
    dec = _decoder(d_context=12)
    ctx, cmask = _context()
    prompt = _ids(3, 4, 7, seed=8)
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[0, :2], mask[2, :1] = False, False  # left padding
    kw = dict(context=ctx, context_mask=cmask, prompt=prompt, prompt_mask=mask)
    assert torch.equal(greedy_decode(dec, None, EOS, 6, **kw), greedy_decode(dec, None, EOS, 6, use_cache=False, **kw))
    a, sa = beam_search(dec, None, EOS, 6, beam_size=2, **kw)
    b, sb = beam_search(dec, None, EOS, 6, beam_size=2, use_cache=False, **kw)
    assert torch.equal(a, b)
    torch.testing.assert_close(sa, sb, **F64)
    # the mask reaches the decoder: the first token is the argmax of the masked logits, which differ from the
    # unmasked ones in the padded rows
    logits = dec(prompt, mask, context=ctx, context_mask=cmask)[:, -1]
    assert not torch.allclose(logits[0], dec(prompt, context=ctx, context_mask=cmask)[0, -1])
    assert torch.equal(greedy_decode(dec, None, EOS, 1, **kw)[:, 0], logits.argmax(dim=-1))


def test_prompt_errors():
    dec = _decoder(d_context=12, max_len=6)
    ctx, cmask = _context(b=2)
    prompt = _ids(2, 4, 7)
    with pytest.raises(ValueError, match=r"a prompt of 4 tokens and max_len=4 generated tokens need 7 positions"):
        greedy_decode(dec, None, EOS, 4, context=ctx, prompt=prompt)
    with pytest.raises(ValueError, match="prompt_mask was given without a prompt"):
        greedy_decode(dec, BOS, EOS, 2, context=ctx, prompt_mask=torch.ones(2, 4, dtype=torch.bool))
    right = torch.ones(2, 4, dtype=torch.bool)
    right[1, -1] = False
    with pytest.raises(ValueError, match=r"left padding.*rows \[1\]"):
        greedy_decode(dec, None, EOS, 2, context=ctx, prompt=prompt, prompt_mask=right)
    with pytest.raises(ValueError, match="prompt holds 2 rows but context holds 3"):
        greedy_decode(dec, None, EOS, 2, context=_context()[0], prompt=prompt)
    with pytest.raises(TypeError, match="prompt must be a long tensor"):
        greedy_decode(dec, None, EOS, 2, context=ctx, prompt=prompt.float())
    with pytest.raises(TypeError, match="bos_id"):
        greedy_decode(dec, None, EOS, 2, context=ctx)  # without a prompt decoding starts from [BOS]


# --------------------------------------------------------------------------- sampling


def test_sampling_distribution_by_hand():
    p = torch.tensor([0.15, 0.5, 0.05, 0.2, 0.1], dtype=torch.float64)  # by probability: ids 1, 3, 0, 4, 2
    logits = p.log() + 3.0  # any shift: the softmax is p again
    # mass before each rank: 0, 0.5, 0.7, 0.85, 0.95; token k is kept iff the mass before it is < top_p
    for top_p, kept in ((0.45, [1]), (0.6, [1, 3]), (0.75, [1, 3, 0]), (0.9, [1, 3, 0, 4]), (0.97, [1, 3, 0, 4, 2]),
                        (1.0, [1, 3, 0, 4, 2])):
        expected = torch.zeros(5, dtype=torch.float64)
        expected[kept] = p[kept] / p[kept].sum()
        torch.testing.assert_close(sampling_distribution(logits, top_p=top_p), expected, **F64)
    torch.testing.assert_close(sampling_distribution(logits, temperature=2.0), torch.softmax(logits / 2, -1), **F64)
    assert sampling_distribution(logits, temperature=0.0).tolist() == [0.0, 1.0, 0.0, 0.0, 0.0]
    # the temperature comes first: at T = 2 the distribution is flatter and 0.75 of it needs four tokens
    q = torch.softmax(logits / 2, -1)  # 0.186, 0.340, 0.107, 0.215, 0.152
    expected = q * torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(sampling_distribution(logits, 2.0, 0.75), expected / expected.sum(), **F64)
    # ties go to the lower id; leading dims are kept; float32 stays float32
    tied = sampling_distribution(torch.zeros(2, 3, 3), top_p=0.5)
    assert tied.shape == (2, 3, 3) and tied.dtype == torch.float32
    assert tied[1, 2].tolist() == [0.5, 0.5, 0.0]


def _flat_decoder(seed=6):
    dec = _decoder(seed=seed)
    with torch.no_grad():
        dec.token_embed.weight.mul_(0.3)  # flat next-token distributions: sampling differs from greedy
    return dec


@pytest.mark.parametrize("top_p", [1.0, 0.7])
def test_sampling_draws_from_the_softmax_nucleus(top_p):
    dec = _flat_decoder()
    n, vocab = 20000, 7
    first = sample_decode(dec, BOS, EOS, 1, top_p=top_p, batch_size=n, generator=torch.Generator().manual_seed(0))
    p = torch.softmax(dec(torch.tensor([[BOS]]))[0, -1], dim=-1).detach()  # (V,) float64
    kept, mass = [], 0.0  # the nucleus by hand: most likely first, until the mass reaches top_p
    for w in sorted(range(vocab), key=lambda w: -float(p[w])):
        if mass >= top_p:
            break
        kept.append(w)
        mass += float(p[w])
    q = torch.zeros(vocab, dtype=torch.float64)
    q[kept] = p[kept] / p[kept].sum()
    assert (top_p == 1.0) == (len(kept) == vocab)
    freq = torch.bincount(first[:, 0], minlength=vocab).double() / n
    # each frequency is a binomial proportion: standard error sqrt(q (1 - q) / n), at most 0.0035 here; 5 of them
    # leave a false alarm at < 1e-6 per token, while a wrong distribution (e.g. the unrenormalised or the
    # untruncated one, off by >= 0.03) is far outside
    se = (q * (1 - q) / n).sqrt()
    assert ((freq - q).abs() <= 5 * se).all(), (freq, q)
    assert (freq[q == 0] == 0).all()  # nothing outside the nucleus is ever drawn


def test_sampling_is_seeded_and_cached_equals_recomputed():
    dec = _flat_decoder()
    kw = dict(temperature=1.5, top_p=0.9, batch_size=4)

    def run(seed, use_cache=True):
        return sample_decode(dec, BOS, EOS, 8, use_cache=use_cache, generator=torch.Generator().manual_seed(seed),
                             **kw)

    first = run(0)
    assert torch.equal(first, run(0)) and torch.equal(first, run(0, use_cache=False))
    assert not all(torch.equal(first, run(seed)) for seed in (1, 2, 3))  # it does draw
    for row in first.tolist():  # a row ends at its first [EOS], padding after it
        if EOS in row:
            assert all(w == PAD for w in row[row.index(EOS) + 1:])
    torch.manual_seed(3)
    a = sample_decode(dec, BOS, EOS, 8, **kw)  # the global generator
    torch.manual_seed(3)
    assert torch.equal(a, sample_decode(dec, BOS, EOS, 8, **kw))


def test_sampling_without_randomness_is_greedy():
    dec = _decoder(d_context=12)
    ctx, cmask = _context()
    greedy = greedy_decode(dec, BOS, EOS, 8, context=ctx, context_mask=cmask)
    for kw in (dict(temperature=0.0), dict(top_p=1e-9), dict(temperature=1e-4)):
        for seed in (0, 1):
            out = sample_decode(dec, BOS, EOS, 8, context=ctx, context_mask=cmask,
                                generator=torch.Generator().manual_seed(seed), **kw)
            assert torch.equal(out, greedy), kw


def test_sampling_errors():
    dec = _decoder(max_len=6)
    for kw, kind, match in ((dict(temperature=-1.0), ValueError, "temperature must be >= 0"),
                            (dict(temperature=float("nan")), ValueError, "temperature must be finite"),
                            (dict(top_p=0.0), ValueError, r"top_p must be in \(0, 1\]"),
                            (dict(top_p=1.5), ValueError, r"top_p must be in \(0, 1\]"),
                            (dict(top_p="1"), TypeError, "top_p must be a float"),
                            (dict(generator=0), TypeError, "generator must be a torch.Generator")):
        with pytest.raises(kind, match=match):
            sample_decode(dec, BOS, EOS, 4, batch_size=1, **kw)
    with pytest.raises(ValueError, match="float tensor"):
        sampling_distribution(torch.tensor([1, 2]))
