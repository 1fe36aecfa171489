"""Greedy, beam-search and sampled decoding of a text decoder, with or without its KV cache (chapter 5).

The functions work with any decoder shaped like mmlite.models.caption.TextDecoder (the `Decoder` protocol
below): forward(ids, mask, context, context_mask) -> logits (B, T, V), new_cache(), step(ids_new, cache,
context, context_mask) -> logits (B, T_new, V), and the ints pad_id and max_len. Generation starts from [BOS]
(or from a prompt, e.g. a chat template, see `prompt`) and stops at [EOS] or after max_len generated tokens.
use_cache=True feeds only the newest token at each step; use_cache=False recomputes the whole prefix every step
(slower, the reference the cached path must equal).

Sampling draws w_t from the softmax of the logits divided by a temperature, cut to the nucleus (top-p): the
smallest set of most likely tokens whose probability reaches p (`sampling_distribution`).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator, Protocol

import torch
from torch import Tensor, nn


class Decoder(Protocol):
    """What the decoding functions need from a decoder (mmlite.models.caption.TextDecoder has it)."""

    pad_id: int  # written after [EOS]
    max_len: int  # longest sequence the decoder takes

    def __call__(self, ids: Tensor, mask: Tensor | None = None, context: Tensor | None = None,
                 context_mask: Tensor | None = None) -> Tensor: ...

    def new_cache(self) -> object: ...

    def step(self, ids_new: Tensor, cache: object, context: Tensor | None = None,
             context_mask: Tensor | None = None) -> Tensor: ...

    # With a prompt_mask the decoding functions also pass mask= (B, T) to the call and to step, a key mask over
    # every token fed so far (TextDecoder takes it); without one they never do.


def _check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return value


def _check_prompt(prompt: Tensor, prompt_mask: Tensor | None) -> None:
    """Raise unless prompt is (B, P) long, P >= 1, and prompt_mask None or (B, P) bool left padding."""
    if not isinstance(prompt, Tensor) or prompt.dim() != 2 or prompt.shape[0] < 1 or prompt.shape[1] < 1:
        got = tuple(prompt.shape) if isinstance(prompt, Tensor) else type(prompt).__name__
        raise ValueError(f"prompt must be a (B, P) tensor of token ids with B, P >= 1, got {got}")
    if prompt.dtype != torch.long:
        raise TypeError(f"prompt must be a long tensor of token ids, got dtype {prompt.dtype}")
    if prompt_mask is None:
        return
    if not isinstance(prompt_mask, Tensor) or prompt_mask.dtype != torch.bool or prompt_mask.shape != prompt.shape:
        got = f"{prompt_mask.dtype} {tuple(prompt_mask.shape)}" if isinstance(prompt_mask, Tensor) \
            else type(prompt_mask).__name__
        raise ValueError(f"prompt_mask must be a bool tensor of the prompt's shape {tuple(prompt.shape)}, got {got}")
    # left padding: once a row's real tokens start they run to the end, so generated tokens follow a real one
    if not bool(prompt_mask[:, -1].all()) or bool((prompt_mask[:, :-1] & ~prompt_mask[:, 1:]).any()):
        rows = [i for i in range(prompt.shape[0])
                if not prompt_mask[i, -1] or bool((prompt_mask[i, :-1] & ~prompt_mask[i, 1:]).any())]
        raise ValueError(f"prompt_mask must be left padding (False only before the real tokens, the last column "
                         f"real); rows {rows} are not")


def _prepare(decoder: Decoder, bos_id: int | None, eos_id: int, max_len: int, context: Tensor | None,
             batch_size: int | None, prompt: Tensor | None = None,
             prompt_mask: Tensor | None = None) -> tuple[int, torch.device]:
    """Validate the common arguments; return the batch size B and the device to build ids on."""
    if not isinstance(decoder, nn.Module):
        raise TypeError(f"decoder must be an nn.Module, got {type(decoder).__name__}")
    if prompt is None:
        if prompt_mask is not None:
            raise ValueError("prompt_mask was given without a prompt")
        _check_int("bos_id", bos_id, 0)
    else:
        if bos_id is not None:
            _check_int("bos_id", bos_id, 0)
        _check_prompt(prompt, prompt_mask)
    _check_int("eos_id", eos_id, 0)
    _check_int("max_len", max_len, 1)
    if prompt is None and max_len > decoder.max_len:
        raise ValueError(f"max_len={max_len} generated tokens need {max_len} positions ([BOS] and all but the last "
                         f"token are fed), but the decoder was built for max_len={decoder.max_len}")
    if prompt is not None and prompt.shape[1] + max_len - 1 > decoder.max_len:
        raise ValueError(f"a prompt of {prompt.shape[1]} tokens and max_len={max_len} generated tokens need "
                         f"{prompt.shape[1] + max_len - 1} positions (the prompt and all but the last generated token "
                         f"are fed), but the decoder was built for max_len={decoder.max_len}")
    if prompt is not None:
        if context is not None and (not isinstance(context, Tensor) or context.shape[0] != prompt.shape[0]):
            got = context.shape[0] if isinstance(context, Tensor) else type(context).__name__
            raise ValueError(f"prompt holds {prompt.shape[0]} rows but context holds {got}")
        if batch_size is not None and _check_int("batch_size", batch_size, 1) != prompt.shape[0]:
            raise ValueError(f"batch_size={batch_size} but prompt holds {prompt.shape[0]} rows")
        batch_size = prompt.shape[0]
    if context is not None:
        if not isinstance(context, Tensor) or context.dim() != 3:
            got = tuple(context.shape) if isinstance(context, Tensor) else type(context).__name__
            raise ValueError(f"context must be (B, Tc, d_context), got {got}")
        if batch_size is not None and _check_int("batch_size", batch_size, 1) != context.shape[0]:
            raise ValueError(f"batch_size={batch_size} but context holds {context.shape[0]} rows")
        return context.shape[0], context.device
    if batch_size is None:
        raise ValueError("pass batch_size: without a context there is nothing to take the batch size from")
    _check_int("batch_size", batch_size, 1)
    params = list(decoder.parameters())
    return batch_size, (params[0].device if params else torch.device("cpu"))


@contextmanager
def _inference(decoder: nn.Module) -> Iterator[None]:
    """Eval mode and no autograd for the duration; the decoder's train/eval mode is restored afterwards."""
    was_training = decoder.training
    decoder.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        decoder.train(was_training)


class _NextToken:
    """Last-position logits of a growing batch of prefixes, through the cache or by recomputing the prefix."""

    def __init__(self, decoder: Decoder, use_cache: bool, context: Tensor | None, context_mask: Tensor | None,
                 prompt_mask: Tensor | None = None):
        if not isinstance(use_cache, bool):
            raise TypeError(f"use_cache must be a bool, got {type(use_cache).__name__}")
        self.decoder = decoder
        self.cache = decoder.new_cache() if use_cache else None  # None: recompute the prefix every step
        self.context = context  # (N, Tc, d_context) or None
        self.context_mask = context_mask  # (N, Tc) or None
        self.mask = prompt_mask  # (N, P) key mask of a left-padded prompt, extended by the generated tokens; or None

    def __call__(self, ids: Tensor) -> Tensor:
        """ids (N, t) the full prefixes -> logits (N, V) of the token after them."""
        kw = {}
        if self.mask is not None:
            grow = ids.shape[1] - self.mask.shape[1]  # generated tokens are real
            self.mask = torch.cat([self.mask, self.mask.new_ones(ids.shape[0], grow)], dim=1)  # (N, t)
            kw["mask"] = self.mask
        if self.cache is None:
            mask = kw.pop("mask", None)
            logits = self.decoder(ids, mask, context=self.context, context_mask=self.context_mask)  # (N, t, V)
        else:
            new = ids[:, len(self.cache):]  # (N, t - T_past): only what the cache has not seen
            logits = self.decoder.step(new, self.cache, context=self.context, context_mask=self.context_mask, **kw)
        return logits[:, -1]  # (N, V)

    def reorder(self, rows: Tensor) -> None:
        """The prefixes are now rows `rows` of the previous ones (the context rows stay as they are)."""
        if self.cache is not None:
            self.cache.reorder(rows)
        if self.mask is not None:
            self.mask = self.mask.index_select(0, rows.to(self.mask.device))


def _start(prompt: Tensor | None, bos_id: int | None, b: int, device: torch.device) -> Tensor:
    """The prefixes decoding starts from: the prompt (B, P), or a [BOS] column (B, 1)."""
    if prompt is None:
        return torch.full((b, 1), bos_id, dtype=torch.long, device=device)  # (B, 1): [BOS]
    return prompt.to(device)


def greedy_decode(decoder: Decoder, bos_id: int | None, eos_id: int, max_len: int, context: Tensor | None = None,
                  context_mask: Tensor | None = None, batch_size: int | None = None, use_cache: bool = True,
                  pad_id: int | None = None, prompt: Tensor | None = None,
                  prompt_mask: Tensor | None = None) -> Tensor:
    """Pick the most likely next token at every step: w_t = argmax_w p(w | [BOS] w_1 .. w_{t-1}, context).

    Returns the generated ids (B, L) after [BOS], L <= max_len: a row ends with its [EOS] and is then filled
    with pad_id (None: decoder.pad_id); a row without [EOS] has max_len tokens. Decoding stops early once every
    row has ended. B is context's batch size, or batch_size when there is no context. Ties go to the lowest id.

    prompt (B, P) long: start from these tokens instead of [BOS] (bos_id is then unused and may be None); the
    result holds what follows them. prompt_mask (B, P) bool marks its real tokens: rows of different lengths
    are left-padded, and the mask (extended by the generated tokens) is passed to the decoder as mask=.
    """
    b, device = _prepare(decoder, bos_id, eos_id, max_len, context, batch_size, prompt, prompt_mask)
    pad = decoder.pad_id if pad_id is None else _check_int("pad_id", pad_id, 0)
    prompt_mask = None if prompt_mask is None else prompt_mask.to(device)
    with _inference(decoder):
        next_logits = _NextToken(decoder, use_cache, context, context_mask, prompt_mask)
        ids = _start(prompt, bos_id, b, device)  # (B, P)
        start = ids.shape[1]
        ended = torch.zeros(b, dtype=torch.bool, device=device)  # (B,) True once [EOS] was generated
        for _ in range(max_len):
            token = next_logits(ids).argmax(dim=-1)  # (B,)
            token = token.masked_fill(ended, pad)
            ids = torch.cat([ids, token[:, None]], dim=1)  # (B, t + 1)
            ended |= token == eos_id
            if bool(ended.all()):
                break
    return ids[:, start:]  # (B, L)


def _check_sampling(temperature: float, top_p: float) -> None:
    for name, value in (("temperature", temperature), ("top_p", top_p)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a float, got {type(value).__name__} {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0: always the most likely token), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1: the whole vocabulary), got {top_p}")


def sampling_distribution(logits: Tensor, temperature: float = 1.0, top_p: float = 1.0) -> Tensor:
    """The distribution sample_decode draws from: logits (..., V) -> probabilities (..., V), float32 or float64.

        q = softmax(logits / temperature);   sort q descending (ties: lower id first);
        keep the smallest prefix of that order whose mass reaches top_p  (token k is kept iff the mass of the
        tokens before it is < top_p, so the most likely token always is);   renormalise over the kept tokens.

    top_p = 1 keeps every token (plain sampling at that temperature); top_p -> 0 keeps only the most likely one.
    temperature = 0 is the limit of temperature -> 0: all the mass on the argmax (ties: the lowest id).
    """
    if not isinstance(logits, Tensor) or logits.dim() < 1 or logits.shape[-1] < 1 or not logits.is_floating_point():
        got = f"{logits.dtype} {tuple(logits.shape)}" if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"logits must be a float tensor (..., V) with V >= 1, got {got}")
    _check_sampling(temperature, top_p)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(dim=-1), logits.shape[-1]).to(logits.dtype)
    probs = torch.softmax(logits / temperature, dim=-1)  # (..., V)
    if top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)  # (..., V)
        mass_before = sorted_p.cumsum(dim=-1) - sorted_p  # (..., V): mass of the more likely tokens
        keep_sorted = mass_before < top_p  # (..., V), always True at rank 0
        keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)  # back to id order
        probs = probs * keep
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def _draw(probs: Tensor, generator: torch.Generator | None) -> Tensor:
    """One token per row from probs (N, V) by inverse transform sampling: the first id whose cumulative mass
    exceeds u ~ U[0, total). A token of probability 0 is never drawn. -> (N,) long."""
    cdf = probs.cumsum(dim=-1)  # (N, V)
    total = cdf[:, -1:]  # (N, 1), 1 up to rounding
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device, dtype=probs.dtype)  # (N, 1)
    # u * total < total, also after rounding, so the id found has cdf[id - 1] <= target < cdf[id]: probs[id] > 0
    target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))  # (N, 1)
    return torch.searchsorted(cdf, target, right=True)[:, 0]  # (N,)


def sample_decode(decoder: Decoder, bos_id: int | None, eos_id: int, max_len: int, temperature: float = 1.0,
                  top_p: float = 1.0, generator: torch.Generator | None = None, context: Tensor | None = None,
                  context_mask: Tensor | None = None, batch_size: int | None = None, use_cache: bool = True,
                  pad_id: int | None = None, prompt: Tensor | None = None,
                  prompt_mask: Tensor | None = None) -> Tensor:
    """Draw each next token from sampling_distribution(logits, temperature, top_p): w_t ~ q(w | w_<t, context).

    The output is greedy_decode's: generated ids (B, L) after [BOS] (or after the prompt), each row ended by its
    [EOS] and then pad_id. One uniform number per row per step comes from `generator` (a torch.Generator on the
    decoder's device; None: torch's global generator), so a seeded generator gives the same tokens every run,
    with or without the cache. temperature = 0, or a top_p below the top token's probability, is greedy decoding.
    prompt and prompt_mask are greedy_decode's.
    """
    b, device = _prepare(decoder, bos_id, eos_id, max_len, context, batch_size, prompt, prompt_mask)
    _check_sampling(temperature, top_p)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    pad = decoder.pad_id if pad_id is None else _check_int("pad_id", pad_id, 0)
    prompt_mask = None if prompt_mask is None else prompt_mask.to(device)
    with _inference(decoder):
        next_logits = _NextToken(decoder, use_cache, context, context_mask, prompt_mask)
        ids = _start(prompt, bos_id, b, device)  # (B, P)
        start = ids.shape[1]
        ended = torch.zeros(b, dtype=torch.bool, device=device)  # (B,) True once [EOS] was generated
        for _ in range(max_len):
            token = _draw(sampling_distribution(next_logits(ids), temperature, top_p), generator)  # (B,)
            token = token.masked_fill(ended, pad)
            ids = torch.cat([ids, token[:, None]], dim=1)  # (B, t + 1)
            ended |= token == eos_id
            if bool(ended.all()):
                break
    return ids[:, start:]  # (B, L)


def _keep_best(hyps: list[tuple[float, list[int]]], score: float, tokens: list[int], k: int) -> None:
    """Insert (score, tokens) into hyps, kept sorted best first (earlier wins a tie) and cut to the best k."""
    hyps.append((score, tokens))
    hyps.sort(key=lambda h: -h[0])  # stable sort: among equal scores the earlier hypothesis stays first
    del hyps[k:]


def _cannot_improve(hyps: list[tuple[float, list[int]]], best_alive: float, length: int, max_len: int,
                    length_penalty: float, k: int) -> bool:
    """True when no continuation of a live beam can beat the k-th best finished hypothesis.

    A live beam with log-probability sum s <= 0 and `length` tokens ends with a sum s' <= s and a length
    L' in [length + 1, max_len], so its score s' / L'^alpha <= s / max((length + 1)^alpha, max_len^alpha).
    """
    if best_alive == -math.inf:
        return True  # no live beam is left
    if len(hyps) < k or length >= max_len:
        return False  # at max_len the live beams are scored exactly, by the final step
    bound = best_alive / max((length + 1) ** length_penalty, max_len ** length_penalty)
    return bound <= hyps[-1][0]


def beam_search(decoder: Decoder, bos_id: int | None, eos_id: int, max_len: int, beam_size: int = 4,
                length_penalty: float = 1.0, context: Tensor | None = None, context_mask: Tensor | None = None,
                batch_size: int | None = None, use_cache: bool = True,
                pad_id: int | None = None, prompt: Tensor | None = None,
                prompt_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Beam search over log-probabilities; returns (ids (B, L) after [BOS], padded with pad_id; scores (B,) float64).

    Each step extends every live beam by every token and keeps, per example, the beam_size best prefixes by
    their sum of log-probabilities (taken from the 2 * beam_size best candidates, so that [EOS] never empties
    the beam). A candidate ending in [EOS] among the beam_size best is set aside as finished, with

        score = sum_{t=1..L} log p(w_t | w_<t, context) / L ** length_penalty,

    L the number of generated tokens including [EOS] (length_penalty = 0: the raw sum; > 0 favours longer
    captions; < 0 shorter ones). Beams still live after max_len tokens are finished with L = max_len. The
    answer is the best finished hypothesis. An example stops early only once beam_size hypotheses are finished
    and no live beam can still beat the worst of them (the bound of _cannot_improve), so stopping never
    changes the answer. With beam_size = 1 and length_penalty = 0 this is greedy decoding. prompt and
    prompt_mask are greedy_decode's: the beams then continue the prompt, and L counts only generated tokens.
    """
    b, device = _prepare(decoder, bos_id, eos_id, max_len, context, batch_size, prompt, prompt_mask)
    k = _check_int("beam_size", beam_size, 1)
    if isinstance(length_penalty, bool) or not isinstance(length_penalty, (int, float)):
        raise TypeError(f"length_penalty must be a float, got {type(length_penalty).__name__} {length_penalty!r}")
    if not math.isfinite(length_penalty):
        raise ValueError(f"length_penalty must be finite, got {length_penalty}")
    pad = decoder.pad_id if pad_id is None else _check_int("pad_id", pad_id, 0)
    if context is not None:
        context = context.repeat_interleave(k, dim=0)  # (B*K, Tc, d_context): row b*K + j is beam j of example b
    if context_mask is not None:
        context_mask = context_mask.repeat_interleave(k, dim=0)  # (B*K, Tc)
    if prompt_mask is not None:
        prompt_mask = prompt_mask.to(device).repeat_interleave(k, dim=0)  # (B*K, P)

    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(b)]  # per example, best first, <= K
    done = [False] * b
    with _inference(decoder):
        next_logits = _NextToken(decoder, use_cache, context, context_mask, prompt_mask)
        ids = _start(prompt, bos_id, b, device).repeat_interleave(k, dim=0)  # (B*K, P): [BOS] or the prompt
        start = ids.shape[1]
        # one live beam per example at the start (the K copies of [BOS] would otherwise give K equal beams)
        beam_scores = torch.full((b, k), -math.inf, dtype=torch.float64, device=device)  # (B, K) sums of log p
        beam_scores[:, 0] = 0.0
        for t in range(max_len):  # choose generated token t + 1; hypotheses then hold t + 1 tokens
            logp = torch.log_softmax(next_logits(ids).double(), dim=-1)  # (B*K, V)
            v = logp.shape[-1]
            cand = (beam_scores[:, :, None] + logp.view(b, k, v)).view(b, k * v)  # (B, K*V)
            top_scores, top_index = cand.topk(min(2 * k, k * v), dim=1)  # (B, 2K), best first
            top_scores, top_index = top_scores.tolist(), top_index.tolist()
            rows = list(range(b * k))  # previous row of each new row (finished examples keep theirs)
            tokens = [pad] * (b * k)  # token appended to each new row
            new_scores = torch.full((b, k), -math.inf, dtype=torch.float64)  # (B, K)
            for i in range(b):
                if done[i]:
                    continue
                n_live = 0
                for rank, (score, index) in enumerate(zip(top_scores[i], top_index[i])):
                    if score == -math.inf:
                        break  # the rest extend empty slots
                    beam, token = divmod(index, v)
                    row = i * k + beam
                    if token == eos_id:
                        if rank < k:
                            hyp = ids[row, start:].tolist() + [eos_id]
                            _keep_best(finished[i], score / (t + 1) ** length_penalty, hyp, k)
                        continue
                    rows[i * k + n_live], tokens[i * k + n_live] = row, token
                    new_scores[i, n_live] = score
                    n_live += 1
                    if n_live == k:
                        break
                done[i] = _cannot_improve(finished[i], float(new_scores[i, 0]), t + 1, max_len, length_penalty, k)
            index = torch.tensor(rows, dtype=torch.long, device=device)  # (B*K,)
            token_col = torch.tensor(tokens, dtype=torch.long, device=device)[:, None]  # (B*K, 1)
            ids = torch.cat([ids.index_select(0, index), token_col], dim=1)  # (B*K, t + 2)
            next_logits.reorder(index)
            beam_scores = new_scores.to(device)
            if all(done):
                break
        for i in range(b):  # beams still live after max_len tokens
            if not done[i]:
                for j in range(k):
                    score = float(beam_scores[i, j])
                    if score > -math.inf:
                        _keep_best(finished[i], score / max_len ** length_penalty, ids[i * k + j, start:].tolist(),
                                   k)

    best = [hyps[0] for hyps in finished]
    length = max(len(tokens) for _, tokens in best)
    out = torch.full((b, length), pad, dtype=torch.long, device=device)  # (B, L)
    for i, (_, tokens) in enumerate(best):
        out[i, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    scores = torch.tensor([score for score, _ in best], dtype=torch.float64, device=device)  # (B,)
    return out, scores
