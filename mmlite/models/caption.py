"""A text decoder: causal transformer language model, optionally cross-attending to image tokens (chapter 5).

    ids (B, T) -> token embedding + learned position embedding -> TransformerStack(causal=True,
    d_context) -> LM head (tied to the token embedding by default) -> next-token logits (B, T, V)

With d_context it is the caption decoder (BLIP's): every block also attends to a context (B, Tc, d_context),
the image tokens. Without it it is a plain causal language model. forward is teacher forcing over a whole
sequence (the caller shifts, with mmlite.objectives.shift_for_lm); new_cache() and step() run the same
computation a few tokens at a time, re-using the keys and values of the earlier ones (mmlite.attention.KVCache),
for mmlite.models.decoding.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mmlite.attention import KVCache
from mmlite.blocks import TransformerStack
from mmlite.checks import check_dropout, check_mask
from mmlite.encoders._checks import check_ids_and_mask


class TextDecoder(nn.Module):
    """Causal transformer decoder over token ids, with optional cross-attention to a context.

    forward(ids (B, T), mask (B, T) or None, context (B, Tc, d_context), context_mask (B, Tc)) -> logits (B, T, V).
    mask=None means every token is real (with right padding and causal attention the real positions never see
    the padding, so a mask only matters for left padding). Position t's logits predict token t + 1.
    """

    def __init__(self, vocab_size: int, d_model: int = 64, depth: int = 2, n_heads: int = 4, max_len: int = 32,
                 d_context: int | None = None, ff_hidden: int | None = None, dropout: float = 0.0, pad_id: int = 0,
                 tie_embeddings: bool = True) -> None:
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("d_model", d_model), ("max_len", max_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not 0 <= pad_id < vocab_size:
            raise ValueError(f"pad_id {pad_id} is outside [0, vocab_size={vocab_size})")
        self.vocab_size = vocab_size  # V
        self.d_model = d_model  # token width
        self.max_len = max_len  # longest sequence (positions 0..max_len-1)
        self.d_context = d_context  # width of the context tokens; None: no cross-attention
        self.pad_id = pad_id  # id of [PAD], written after [EOS] by the decoding functions
        self.token_embed = nn.Embedding(vocab_size, d_model)
        nn.init.normal_(self.token_embed.weight, std=0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, max_len, d_model) * 0.02)  # (1, max_len, D)
        self.drop = nn.Dropout(check_dropout(dropout))
        self.stack = TransformerStack(d_model, depth, n_heads, ff_hidden=ff_hidden, dropout=dropout, causal=True,
                                      d_context=d_context)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)  # logits = h W_E^T when tied
        if tie_embeddings:
            self.lm_head.weight = self.token_embed.weight

    def _check_context(self, context: Tensor | None, context_mask: Tensor | None, batch: int) -> None:
        if self.d_context is None:
            if context is not None or context_mask is not None:
                raise ValueError("this decoder was built without d_context, so it takes no context (nor context_mask)")
            return
        if context is None:
            raise ValueError(f"this decoder was built with d_context={self.d_context}: pass context "
                             f"(B, Tc, {self.d_context})")
        if context.dim() == 3 and context.shape[0] != batch:
            raise ValueError(f"context batch size is {context.shape[0]} but ids batch size is {batch}")
        if context_mask is not None and context.dim() == 3:
            check_mask("context_mask", context_mask, context.shape[:2])

    def _logits(self, ids: Tensor, start: int, mask: Tensor | None, context: Tensor | None,
                context_mask: Tensor | None, cache: KVCache | None) -> Tensor:
        """Embed ids (B, T) at positions start..start+T-1, run the stack, return logits (B, T, V)."""
        t = ids.shape[1]
        x = self.token_embed(ids) + self.pos_embed[:, start:start + t]  # (B, T, D)
        h = self.stack(self.drop(x), mask=mask, context=context, context_mask=context_mask, cache=cache)  # (B, T, D)
        return self.lm_head(h)  # (B, T, V)

    def forward(self, ids: Tensor, mask: Tensor | None = None, context: Tensor | None = None,
                context_mask: Tensor | None = None) -> Tensor:
        """Teacher forcing: ids (B, T) long, mask (B, T) bool or None (all real) -> logits (B, T, V)."""
        check_ids_and_mask(ids, mask, self.vocab_size, self.pad_id)
        if ids.shape[1] > self.max_len:
            raise ValueError(f"sequence length {ids.shape[1]} exceeds max_len={self.max_len}")
        self._check_context(context, context_mask, ids.shape[0])
        return self._logits(ids, 0, mask, context, context_mask, None)

    def new_cache(self) -> KVCache:
        """An empty cache for step(): nothing processed yet, so the first step starts at position 0."""
        return self.stack.new_cache()

    def step(self, ids_new: Tensor, cache: KVCache, context: Tensor | None = None,
             context_mask: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        """Feed the next tokens ids_new (B, T_new) after the len(cache) already fed -> their logits (B, T_new, V).

        The cache is updated in place; positions continue from len(cache). Pass the same context (and
        context_mask) at every step: its keys/values are computed at the first step and reused. mask=None
        means every token fed so far is real; otherwise it is a key mask over all of them,
        (B, len(cache) + T_new), True = real. Calling step on chunks of a sequence gives forward's logits.
        """
        if not isinstance(cache, KVCache):
            raise TypeError(f"cache must be a KVCache (from new_cache()), got {type(cache).__name__}")
        check_ids_and_mask(ids_new, None, self.vocab_size, self.pad_id)
        b, t_new = ids_new.shape
        if t_new == 0:
            raise ValueError("ids_new must hold at least one token, got shape (B, 0)")
        start = len(cache)
        if start + t_new > self.max_len:
            raise ValueError(f"sequence length {start + t_new} ({start} cached + {t_new} new) exceeds "
                             f"max_len={self.max_len}")
        if cache.batch_size is not None and cache.batch_size != b:
            raise ValueError(f"cache batch size is {cache.batch_size} but ids_new batch size is {b} "
                             "(select rows with cache.reorder)")
        if mask is not None and (not isinstance(mask, Tensor) or tuple(mask.shape) != (b, start + t_new)):
            got = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
            raise ValueError(f"mask must cover the cached and the new tokens, (B, len(cache) + T_new) = "
                             f"{(b, start + t_new)}, got {got}")
        check_mask("mask", mask, (b, start + t_new))
        self._check_context(context, context_mask, b)
        return self._logits(ids_new, start, mask, context, context_mask, cache)
