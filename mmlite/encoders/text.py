"""Text encoders: word embeddings + GRU, and a transformer over tokens (derived in chapters 3 and 4.3)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mmlite.blocks import TransformerStack
from mmlite.checks import check_features, check_mask
from mmlite.encoders._checks import check_ids_and_mask
from mmlite.encoders.gru import GRU
from mmlite.encoders.output import EncoderOutput
from mmlite.pooling import last_token_pool, masked_mean

TEXT_POOLS = ("cls", "first", "mean", "last", "none")


def _check_embeddings(x: Tensor, mask: Tensor | None, d: int, what: str) -> Tensor:
    """Validate (B, T, d) embeddings and a (B, T) bool mask; return the mask (all True if None)."""
    check_features("embeddings", x, d, what)
    if mask is None:
        return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    return check_mask("mask", mask, x.shape[:2])


class GRUTextEncoder(nn.Module):
    """Word embeddings (d_word) -> GRU (d_model): tokens are the GRU states, pooled is the last real state.

    forward(ids (B, T) long, mask (B, T) bool or None = ids != pad_id) -> EncoderOutput(tokens (B, T, d_model),
    zero at padding; mask; pooled (B, d_model)). Sequences must be right-padded for `pooled` to be the last real
    token's state.
    """

    def __init__(self, vocab_size: int, d_word: int, d_model: int, num_layers: int = 1, pad_id: int = 0,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if not 0 <= pad_id < vocab_size:
            raise ValueError(f"pad_id {pad_id} is outside [0, vocab_size={vocab_size})")
        self.vocab_size = vocab_size
        self.pad_id = pad_id
        self.d_word = d_word  # width of the word embeddings, the GRU's input
        self.d_model = d_model  # width of the GRU states, the output tokens
        self.embedding = nn.Embedding(vocab_size, d_word, padding_idx=pad_id)
        self.gru = GRU(d_word, d_model, num_layers=num_layers, dropout=dropout)

    def embed(self, ids: Tensor) -> Tensor:
        """Token embeddings (B, T) -> (B, T, d_word)."""
        check_ids_and_mask(ids, None, self.vocab_size, self.pad_id)
        return self.embedding(ids)

    def encode_embeddings(self, x: Tensor, mask: Tensor | None = None) -> EncoderOutput:
        """Run the GRU on given embeddings (e.g. with a soft prompt inserted): (B, T, d_word) -> EncoderOutput."""
        mask = _check_embeddings(x, mask, self.d_word, "d_word")
        out, h_n = self.gru(x, mask=mask)  # (B, T, d_model), (L, B, d_model)
        return EncoderOutput(out, mask, h_n[-1])

    def forward(self, ids: Tensor, mask: Tensor | None = None) -> EncoderOutput:
        """(B, T) ids -> EncoderOutput(tokens (B, T, d_model), mask (B, T), pooled (B, d_model))."""
        mask = check_ids_and_mask(ids, mask, self.vocab_size, self.pad_id)
        return self.encode_embeddings(self.embedding(ids), mask)


class TransformerTextEncoder(nn.Module):
    """Token + learned positional embeddings -> TransformerStack (pre-norm blocks, final LayerNorm).

    forward returns EncoderOutput(tokens (B, T, d_model), mask (B, T), pooled (B, d_model) or None).

    pool: "cls" prepends a learned class vector inside and returns its output (dropped from `tokens`,
    so tokens stay aligned with ids); "first" returns the output at position 0, for ids that already
    start with the tokenizer's [CLS] (encode_batch(add_cls=True)); "mean" is the masked mean; "last"
    the last real token (CLIP's choice, natural with causal=True); "none" returns pooled=None.
    causal=True lets token t attend only to tokens <= t. Outputs at padded positions are computed
    but meaningless: use the mask. An empty sequence (T = 0, e.g. encode_batch([""])) gives tokens
    (B, 0, d_model) and a zero pooled vector for "first", "mean" and "last" ("cls" still has its class vector).
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int = 64,
        depth: int = 2,
        n_heads: int = 4,
        max_len: int = 64,
        pad_id: int = 0,
        pool: str = "cls",
        causal: bool = False,
        ff_hidden: int | None = None,
        dropout: float = 0.0,
        impl: str = "scratch",
    ) -> None:
        super().__init__()
        if pool not in TEXT_POOLS:
            raise ValueError(f"pool must be one of {TEXT_POOLS}, got {pool!r}")
        if causal and pool in ("cls", "first"):
            raise ValueError(f"pool={pool!r} with causal=True: a leading class token would see only itself; "
                             "use pool='last' or 'mean'")
        if not 0 <= pad_id < vocab_size:
            raise ValueError(f"pad_id {pad_id} is outside [0, vocab_size={vocab_size})")
        if depth < 1 or max_len < 1:
            raise ValueError(f"depth and max_len must be >= 1, got {depth} and {max_len}")
        self.vocab_size = vocab_size
        self.d_model = d_model
        self.max_len = max_len  # longest token sequence (not counting the class vector)
        self.pad_id = pad_id
        self.pool = pool
        self.causal = causal
        self.token_embed = nn.Embedding(vocab_size, d_model, padding_idx=pad_id)
        self.pos_embed = nn.Parameter(torch.randn(1, max_len, d_model) * 0.02)  # (1, max_len, D)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d_model)) if pool == "cls" else None  # (1, 1, D)
        self.drop = nn.Dropout(dropout)
        self.stack = TransformerStack(d_model, depth, n_heads, ff_hidden=ff_hidden, dropout=dropout, causal=causal,
                                      impl=impl)

    def embed(self, ids: Tensor) -> Tensor:
        """Token embeddings without positions: (B, T) -> (B, T, d_model)."""
        check_ids_and_mask(ids, None, self.vocab_size, self.pad_id)
        return self.token_embed(ids)

    def encode_embeddings(self, x: Tensor, mask: Tensor | None = None) -> EncoderOutput:
        """Add positions and run the blocks on token embeddings (B, T, D) -> EncoderOutput."""
        mask = _check_embeddings(x, mask, self.d_model, "d_model")
        b, t = x.shape[0], x.shape[1]
        if t > self.max_len:
            raise ValueError(f"sequence length {t} exceeds max_len={self.max_len}")
        x = x + self.pos_embed[:, :t]  # (B, T, D)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1)  # (B, 1+T, D)
            x = self.stack(self.drop(x), mask=torch.cat([mask.new_ones(b, 1), mask], dim=1))  # (B, 1+T, D)
            return EncoderOutput(x[:, 1:], mask, x[:, 0])
        x = self.stack(self.drop(x), mask=mask)  # (B, T, D)
        if self.pool == "first":
            pooled = x[:, 0] if t > 0 else x.sum(dim=1)  # T = 0: zeros (B, D), a sum over no token
        elif self.pool == "mean":
            pooled = masked_mean(x, mask)
        elif self.pool == "last":
            pooled = last_token_pool(x, mask)
        else:
            pooled = None
        return EncoderOutput(x, mask, pooled)

    def forward(self, ids: Tensor, mask: Tensor | None = None) -> EncoderOutput:
        """(B, T) ids -> EncoderOutput(tokens (B, T, d_model), mask, pooled (B, d_model) or None for pool='none')."""
        mask = check_ids_and_mask(ids, mask, self.vocab_size, self.pad_id)
        if ids.shape[1] > self.max_len:
            raise ValueError(f"sequence length {ids.shape[1]} exceeds max_len={self.max_len}")
        return self.encode_embeddings(self.token_embed(ids), mask)
