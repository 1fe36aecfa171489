"""Scaled dot-product, multi-head, cross- and co-attention (derived in chapters 2 and 4.2).

For one head, with queries from X1 and keys/values from X2:

    Q1 = X1 W^Q,  K2 = X2 W^K,  V2 = X2 W^V,  A = softmax(Q1 K2^T / sqrt(d_k)),  O = A V2

Self-attention is the case X1 = X2. Every mask is a bool tensor with True = may be attended.

Decoding one token at a time re-uses what earlier steps computed: an AttentionCache keeps one module's keys and
values (self-attention: they grow by the new tokens at each call; cross-attention: the context's, projected
once), a LayerCache holds a block's two, and a KVCache holds a whole stack's.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmlite.checks import check_dropout, check_features, check_tensor

IMPLS = ("scratch", "fused")


def _check_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    return impl


def _allowed_mask(mask: Tensor | None, causal: bool, tq: int, tk: int, device: torch.device) -> Tensor | None:
    """Combine a user mask and the causal pattern into one bool mask (True = may attend), or None."""
    if causal:
        # top-left aligned like F.scaled_dot_product_attention: query i sees keys 0..i
        tri = torch.ones(tq, tk, dtype=torch.bool, device=device).tril()  # (Tq, Tk)
        return tri if mask is None else mask & tri
    return mask


def _validate_sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout_p: float) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t)
        if t.dim() < 2:
            raise ValueError(f"{name} must have at least 2 dims (..., T, d), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"key last dim is {k.shape[-1]} but query last dim is {q.shape[-1]}")
    if v.shape[-2] != k.shape[-2]:
        raise ValueError(f"value length (dim -2) is {v.shape[-2]} but key length is {k.shape[-2]}")
    if not (q.shape[:-2] == k.shape[:-2] == v.shape[:-2]):
        raise ValueError(
            f"leading (batch/head) dims must match: q {tuple(q.shape[:-2])}, k {tuple(k.shape[:-2])}, "
            f"v {tuple(v.shape[:-2])}"
        )
    if mask is not None:
        check_tensor("mask", mask)
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor (True = may attend), got dtype {mask.dtype}")
        scores_shape = (*q.shape[:-1], k.shape[-2])  # (..., Tq, Tk)
        try:
            ok = mask.dim() <= len(scores_shape) and torch.broadcast_shapes(mask.shape, scores_shape) == scores_shape
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(
                f"mask shape {tuple(mask.shape)} does not broadcast to the scores shape (..., Tq, Tk) = {scores_shape}"
            )
    check_dropout(dropout_p, "dropout_p")


def scaled_dot_product_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    causal: bool = False,
    dropout_p: float = 0.0,
    impl: str = "scratch",
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Attention O = softmax(Q K^T / sqrt(d) + mask) V; returns (output (..., Tq, dv), weights (..., Tq, Tk) or None).

    q (..., Tq, d), k (..., Tk, d), v (..., Tk, dv); mask bool broadcastable to (..., Tq, Tk), True = may attend;
    causal adds the top-left aligned lower-triangular pattern. Query rows with no allowed key give zeros
    (output and weights), never NaN. impl="scratch" computes the scores in float32 (float64 stays float64) and
    returns the weights actually applied (after dropout); impl="fused" calls F.scaled_dot_product_attention and
    returns weights=None. `generator` drives the scratch path's dropout; the fused kernel only uses the global RNG.
    """
    _check_impl(impl)
    _validate_sdpa(q, k, v, mask, dropout_p)
    tq, tk = q.shape[-2], k.shape[-2]
    allowed = _allowed_mask(mask, causal, tq, tk, q.device)
    # rows with at least one allowed key; the others are zeroed at the end
    row_ok = None if mask is None else allowed.any(dim=-1, keepdim=True)  # (..., Tq or 1, 1)

    if impl == "fused":
        if generator is not None and dropout_p > 0.0:
            raise ValueError("generator is not supported by impl='fused' (its kernel uses the global RNG); "
                             "use impl='scratch'")
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal)
        else:
            # recent PyTorch returns zeros for fully masked rows, older versions return NaN (and NaN gradients):
            # let those rows attend everywhere, then zero them, so every version gives zeros and finite gradients
            safe = allowed | ~row_ok  # (..., Tq, Tk)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=safe, dropout_p=dropout_p)
            out = out.masked_fill(~row_ok, 0.0)
        return out, None

    compute = torch.promote_types(q.dtype, torch.float32)  # bf16/fp16 -> float32, float64 stays
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.matmul(q.to(compute), k.to(compute).transpose(-2, -1)) * scale  # (..., Tq, Tk)
    if allowed is not None:
        # most negative finite value, not -inf: a fully masked row stays finite (uniform) before being zeroed;
        # of the scores' own dtype, which autocast makes bfloat16 / float16 even though the inputs were promoted
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=-1)  # (..., Tq, Tk)
    if row_ok is not None:
        weights = weights.masked_fill(~row_ok, 0.0)
    if dropout_p > 0.0:
        keep = torch.rand(weights.shape, generator=generator, device=weights.device, dtype=weights.dtype) >= dropout_p
        weights = weights * keep / (1.0 - dropout_p)
    out = torch.matmul(weights, v.to(compute))  # (..., Tq, dv)
    return out.to(q.dtype), weights.to(q.dtype)


def _expand_mask(mask: Tensor | None, name: str, b: int, h: int, tq: int, tk: int) -> Tensor | None:
    """Turn a module-level mask into one broadcastable to (B, heads, Tq, Tk).

    2-D masks are key masks (B, Tk); 3-D masks are (B or 1, Tq, Tk); 4-D masks are (B or 1, heads or 1, Tq, Tk).
    """
    if mask is None:
        return None
    check_tensor(name, mask)
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor (True = may attend), got dtype {mask.dtype}")
    if mask.dim() == 2:
        if tuple(mask.shape) != (b, tk):
            raise ValueError(f"{name} shape {tuple(mask.shape)} does not match the key mask shape (B, Tk) = {(b, tk)}")
        return mask[:, None, None, :]  # (B, 1, 1, Tk)
    if mask.dim() == 3:
        if mask.shape[0] not in (1, b) or tuple(mask.shape[1:]) != (tq, tk):
            raise ValueError(f"{name} shape {tuple(mask.shape)} does not match (B, Tq, Tk) = {(b, tq, tk)}")
        return mask[:, None]  # (B, 1, Tq, Tk)
    if mask.dim() == 4:
        if mask.shape[0] not in (1, b) or mask.shape[1] not in (1, h) or tuple(mask.shape[2:]) != (tq, tk):
            raise ValueError(f"{name} shape {tuple(mask.shape)} does not match (B, heads, Tq, Tk) = {(b, h, tq, tk)}")
        return mask
    raise ValueError(f"{name} must have 2 (B, Tk), 3 (B, Tq, Tk) or 4 (B, heads, Tq, Tk) dims, "
                     f"got shape {tuple(mask.shape)}")


def _bidirectional_pairs(group: Tensor, b: int, tq: int, tk: int) -> Tensor:
    """(B, 1, Tq, Tk) bool: True where query i and key j are both new tokens marked in `group` (B, Tq).

    The new tokens are the last Tq of the Tk keys (a cached call's keys start with the T_past cached ones, which
    are never in the group), so the pairs fill the bottom-right (Tq, Tq) block.
    """
    check_tensor("bidirectional", group)
    if group.dtype != torch.bool:
        raise TypeError(f"bidirectional must be a bool tensor (True = in the bidirectional group), got dtype "
                        f"{group.dtype}")
    if tuple(group.shape) != (b, tq):
        raise ValueError(f"bidirectional shape {tuple(group.shape)} does not match the new tokens (B, Tq) = {(b, tq)}")
    pairs = group[:, :, None] & group[:, None, :]  # (B, Tq, Tq)
    if tk > tq:
        pairs = torch.cat([pairs.new_zeros(b, tq, tk - tq), pairs], dim=2)  # (B, Tq, Tk)
    return pairs[:, None]  # (B, 1, Tq, Tk)


def _check_reorder_index(index: object, batch: int | None) -> Tensor:
    """Raise unless `index` is a 1-D long tensor of rows in [0, batch) (batch None: not yet known); returns it."""
    check_tensor("index", index)
    if index.dtype != torch.long:
        raise TypeError(f"index must be a long tensor of batch rows, got dtype {index.dtype}")
    if index.dim() != 1 or index.numel() == 0:
        raise ValueError(f"index must be a non-empty 1-D tensor of batch rows, got shape {tuple(index.shape)}")
    lo, hi = int(index.min()), int(index.max())
    if lo < 0 or (batch is not None and hi >= batch):
        bad = lo if lo < 0 else hi
        raise ValueError(f"index holds row {bad}, outside the cache's batch [0, {batch})")
    return index


class AttentionCache:
    """The keys and values one MultiHeadAttention has computed so far, kept between decoding calls.

    Self-attention: k, v (B, heads, T_past, head_dim), extended by the new tokens at every call.
    Cross-attention: k, v (B, heads, Tc, head_dim) of the context, computed at the first call and reused.
    """

    def __init__(self) -> None:
        self.k: Tensor | None = None  # (B, heads, T, head_dim); None until the first call
        self.v: Tensor | None = None  # (B, heads, T, head_dim); None until the first call
        self.kind: str | None = None  # "self" or "cross" after the first call; a cache serves one kind only

    def __len__(self) -> int:
        """Number of key positions held (0 before the first call)."""
        return 0 if self.k is None else self.k.shape[2]

    @property
    def batch_size(self) -> int | None:
        """Rows held, or None before the first call."""
        return None if self.k is None else self.k.shape[0]

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows `index` (B_new,) long, in that order (rows may repeat): k, v -> (B_new, heads, T, hd)."""
        self._select(_check_reorder_index(index, self.batch_size))

    def _select(self, index: Tensor) -> None:
        if self.k is not None:
            self.k = self.k.index_select(0, index.to(self.k.device))  # (B_new, heads, T, head_dim)
            self.v = self.v.index_select(0, index.to(self.v.device))  # (B_new, heads, T, head_dim)


class LayerCache:
    """The caches of one transformer block: its self-attention's and (decoder blocks) its cross-attention's."""

    def __init__(self) -> None:
        self.self_attn = AttentionCache()  # grows by the new tokens at each call
        self.cross_attn = AttentionCache()  # the context's keys/values, computed once (unused by encoder blocks)

    def __len__(self) -> int:
        """Number of tokens seen so far (the self-attention's length)."""
        return len(self.self_attn)

    @property
    def batch_size(self) -> int | None:
        """Rows held, or None before the first call."""
        return self.self_attn.batch_size if self.self_attn.k is not None else self.cross_attn.batch_size

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows `index` (B_new,) long in both caches."""
        self._select(_check_reorder_index(index, self.batch_size))

    def _select(self, index: Tensor) -> None:
        self.self_attn._select(index)
        self.cross_attn._select(index)


class KVCache:
    """The caches of a whole stack, one LayerCache per block, for decoding token by token.

    len(cache) is the number of tokens already processed (T_past): the next token's absolute position.
    """

    def __init__(self, depth: int) -> None:
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be a positive int, got {depth!r}")
        self.layers = [LayerCache() for _ in range(depth)]  # one per block, in order

    def __len__(self) -> int:
        """Number of tokens processed so far (T_past)."""
        return len(self.layers[0])

    @property
    def batch_size(self) -> int | None:
        """Rows held, or None before the first call."""
        return self.layers[0].batch_size

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows `index` (B_new,) long, in that order, in every layer (beam search: select and repeat)."""
        _check_reorder_index(index, self.batch_size)
        for layer in self.layers:
            layer._select(index)


class MultiHeadAttention(nn.Module):
    """Multi-head self- or cross-attention with separate q/k/v/out projections.

    head_h = softmax(Q_h K_h^T / sqrt(d_model / n_heads)) V_h,  output = concat(head_1..head_H) W^O.
    """

    def __init__(self, d_model: int, n_heads: int, d_context: int | None = None, dropout: float = 0.0,
                 bias: bool = True, impl: str = "scratch") -> None:
        super().__init__()
        if d_model <= 0 or n_heads <= 0:
            raise ValueError(f"d_model and n_heads must be positive, got d_model={d_model}, n_heads={n_heads}")
        if d_model % n_heads != 0:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        check_dropout(dropout)
        self.d_model = d_model  # width of the queries and of the output
        self.n_heads = n_heads  # number of heads
        self.head_dim = d_model // n_heads  # width of one head
        self.d_context = d_model if d_context is None else d_context  # width of the keys/values' source
        self.dropout = dropout  # dropout on the attention weights (training only)
        self.impl = impl
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(self.d_context, d_model, bias=bias)
        self.v_proj = nn.Linear(self.d_context, d_model, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)

    @property
    def impl(self) -> str:
        """Which attention path runs: "scratch" or "fused" (switchable at any time)."""
        return self._impl

    @impl.setter
    def impl(self, value: str) -> None:
        self._impl = _check_impl(value)

    def _split(self, t: Tensor) -> Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.n_heads, self.head_dim).transpose(1, 2)  # (B, heads, T, head_dim)

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None,
                context_mask: Tensor | None = None, causal: bool = False,
                need_weights: bool = False, cache: AttentionCache | None = None,
                bidirectional: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """Attend from x (B, Tq, d_model) to itself, or to `context` (B, Tk, d_context) when given.

        `mask` (self-attention) / `context_mask` (cross-attention): key mask (B, Tk), or (B, Tq, Tk), or
        (B, heads, Tq, Tk); True = may attend. Returns (B, Tq, d_model), plus the weights (B, heads, Tq, Tk) when
        need_weights; need_weights runs the scratch path (the fused kernel does not expose the weights).

        With `cache` (an AttentionCache, updated in place) x holds only the new tokens. Self-attention: the keys
        are the T_past cached positions followed by the Tq new ones, Tk = T_past + Tq, so `mask` is over all of
        them ((B, T_past + Tq), or (B, Tq, Tk), ...; None = all real), and causal lets the new token at absolute
        position T_past + i attend to keys 0..T_past + i. Cross-attention: the context is projected at the first
        call and those keys/values are reused afterwards (a later call must pass a context of the same batch size
        and length, whose own values are then not read); causal cross-attention has no cached form.

        `bidirectional` (B, Tq) bool, causal self-attention only: the tokens of x marked True attend to each other
        in both directions (e.g. a block of image tokens, PaliGemma's prefix attention), every other pair stays
        causal, and `mask` still applies to the keys. With a cache the group lies among the new tokens: the
        cached tokens never see it (their keys and values are already computed), so a group must be fed in one
        call. None (the default) is plain causal attention.
        """
        check_features("x", x, self.d_model, "d_model")
        if context is None:
            if context_mask is not None:
                raise ValueError("context_mask was given without a context; use mask for self-attention")
            source, key_mask, mask_name = x, mask, "mask"
        else:
            if mask is not None:
                raise ValueError("mask is the self-attention mask; for cross-attention pass context_mask")
            check_features("context", context, self.d_context, "d_context")
            if context.shape[0] != x.shape[0]:
                raise ValueError(f"context batch size is {context.shape[0]} but x batch size is {x.shape[0]}")
            source, key_mask, mask_name = context, context_mask, "context_mask"
        b, tq, tk = x.shape[0], x.shape[1], source.shape[1]
        if bidirectional is not None and (context is not None or not causal):
            raise ValueError("bidirectional marks exceptions to causal self-attention: it needs causal=True and "
                             "no context")
        if cache is not None:
            k, v, attn_mask = self._cached_keys_values(x, context, key_mask, mask_name, causal, cache, bidirectional)
            causal = False  # folded into attn_mask, aligned to the absolute positions
        else:
            # broadcastable to (B, heads, Tq, Tk)
            attn_mask = _expand_mask(key_mask, mask_name, b, self.n_heads, tq, tk)
            k = self._split(self.k_proj(source))  # (B, heads, Tk, head_dim)
            v = self._split(self.v_proj(source))  # (B, heads, Tk, head_dim)
            if bidirectional is not None:
                pattern = _bidirectional_pairs(bidirectional, b, tq, tk) | torch.ones(
                    tq, tk, dtype=torch.bool, device=x.device).tril()  # (B, 1, Tq, Tk): causal or both in the group
                attn_mask = pattern if attn_mask is None else attn_mask & pattern
                causal = False  # folded into attn_mask

        q = self._split(self.q_proj(x))  # (B, heads, Tq, head_dim)
        impl = "scratch" if need_weights else self.impl
        p = self.dropout if self.training else 0.0
        out, weights = scaled_dot_product_attention(q, k, v, mask=attn_mask, causal=causal, dropout_p=p, impl=impl)
        out = out.transpose(1, 2).reshape(b, tq, self.d_model)  # (B, Tq, d_model)
        out = self.out_proj(out)
        return (out, weights) if need_weights else out

    def _cached_keys_values(self, x: Tensor, context: Tensor | None, key_mask: Tensor | None, mask_name: str,
                            causal: bool, cache: AttentionCache, bidirectional: Tensor | None = None
                            ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Keys, values (B, heads, Tk, head_dim) and mask (broadcastable to (B, heads, Tq, Tk)) of a cached call."""
        if not isinstance(cache, AttentionCache):
            raise TypeError(f"cache must be an AttentionCache, got {type(cache).__name__}")
        kind = "self" if context is None else "cross"
        if cache.kind is not None and cache.kind != kind:
            raise ValueError(f"cache holds {cache.kind}-attention keys and cannot serve {kind}-attention")
        b, tq = x.shape[0], x.shape[1]
        if cache.k is not None and cache.k.shape[0] != b:
            raise ValueError(f"cache batch size is {cache.k.shape[0]} but x batch size is {b} "
                             "(select rows with cache.reorder)")
        if kind == "self":
            k_new = self._split(self.k_proj(x))  # (B, heads, Tq, head_dim)
            v_new = self._split(self.v_proj(x))  # (B, heads, Tq, head_dim)
            if cache.k is None:
                k, v = k_new, v_new
            else:
                k = torch.cat([cache.k, k_new], dim=2)  # (B, heads, T_past + Tq, head_dim)
                v = torch.cat([cache.v, v_new], dim=2)  # (B, heads, T_past + Tq, head_dim)
            tk = k.shape[2]
            attn_mask = _expand_mask(key_mask, mask_name, b, self.n_heads, tq, tk)
            if causal:
                # new query i sits at absolute position T_past + i: it sees keys 0..T_past + i (bottom-right aligned)
                tri = torch.ones(tq, tk, dtype=torch.bool, device=x.device).tril(diagonal=tk - tq)  # (Tq, Tk)
                if bidirectional is not None:  # new tokens of the group also see the group's later tokens
                    tri = tri | _bidirectional_pairs(bidirectional, b, tq, tk)  # (B, 1, Tq, Tk)
                attn_mask = tri if attn_mask is None else attn_mask & tri
        else:
            if causal:
                raise ValueError("causal cross-attention has no cached form; call it with causal=False")
            if cache.k is None:
                k = self._split(self.k_proj(context))  # (B, heads, Tc, head_dim)
                v = self._split(self.v_proj(context))  # (B, heads, Tc, head_dim)
            else:
                if context.shape[1] != cache.k.shape[2]:
                    raise ValueError(f"context length is {context.shape[1]} but the cache holds the keys of a "
                                     f"context of length {cache.k.shape[2]}")
                k, v = cache.k, cache.v
            attn_mask = _expand_mask(key_mask, mask_name, b, self.n_heads, tq, k.shape[2])
        cache.k, cache.v, cache.kind = k, v, kind
        return k, v, attn_mask

    @torch.no_grad()
    def copy_from_torch(self, mha: nn.MultiheadAttention) -> "MultiHeadAttention":
        """Copy the weights of a torch.nn.MultiheadAttention of the same sizes into this module; returns self."""
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"expected torch.nn.MultiheadAttention, got {type(mha).__name__}")
        if (mha.embed_dim, mha.num_heads) != (self.d_model, self.n_heads):
            raise ValueError(f"torch module has embed_dim={mha.embed_dim}, num_heads={mha.num_heads}; this one "
                             f"d_model={self.d_model}, n_heads={self.n_heads}")
        if mha.kdim != self.d_context or mha.vdim != self.d_context:
            raise ValueError(f"torch module has kdim={mha.kdim}, vdim={mha.vdim}; this one d_context={self.d_context}")
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("add_bias_kv and add_zero_attn have no counterpart here")
        if (mha.in_proj_bias is None) != (self.q_proj.bias is None):
            raise ValueError("bias mismatch: one module has projection biases, the other does not")
        e = self.d_model
        if mha._qkv_same_embed_dim:  # packed (3E, E): rows [0:E] query, [E:2E] key, [2E:3E] value
            w_q, w_k, w_v = mha.in_proj_weight.split(e, dim=0)
        else:
            w_q, w_k, w_v = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
        for lin, w in ((self.q_proj, w_q), (self.k_proj, w_k), (self.v_proj, w_v)):
            lin.weight.copy_(w)
        if mha.in_proj_bias is not None:
            for lin, bias in zip((self.q_proj, self.k_proj, self.v_proj), mha.in_proj_bias.split(e)):
                lin.bias.copy_(bias)
        self.out_proj.weight.copy_(mha.out_proj.weight)
        if self.out_proj.bias is not None:
            self.out_proj.bias.copy_(mha.out_proj.bias)
        return self


class CrossAttention(MultiHeadAttention):
    """Cross-attention: queries from x (B, Tq, d_model), keys and values from context (B, Tk, d_context)."""

    def forward(self, x: Tensor, context: Tensor, context_mask: Tensor | None = None,  # type: ignore[override]
                need_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Attend from x to context; context_mask (B, Tk) or fuller, True = may attend."""
        if context is None:
            raise ValueError("CrossAttention needs a context (B, Tk, d_context)")
        return super().forward(x, context=context, context_mask=context_mask, need_weights=need_weights)


class CoAttention(nn.Module):
    """Co-attention: x1 attends to x2 and x2 attends to x1, with one CrossAttention per direction."""

    def __init__(self, d_model: int, n_heads: int, d_other: int | None = None, dropout: float = 0.0,
                 bias: bool = True, impl: str = "scratch") -> None:
        super().__init__()
        d_other = d_model if d_other is None else d_other
        if n_heads <= 0 or d_model <= 0 or d_other <= 0:
            raise ValueError(f"d_model, d_other and n_heads must be positive, got d_model={d_model}, "
                             f"d_other={d_other}, n_heads={n_heads}")
        if d_other % n_heads != 0:
            raise ValueError(f"d_other={d_other} is not divisible by n_heads={n_heads}")
        self.d_model = d_model  # width of x1
        self.d_other = d_other  # width of x2
        self.attn_1to2 = CrossAttention(d_model, n_heads, d_context=d_other, dropout=dropout, bias=bias, impl=impl)
        self.attn_2to1 = CrossAttention(d_other, n_heads, d_context=d_model, dropout=dropout, bias=bias, impl=impl)

    def forward(self, x1: Tensor, x2: Tensor, mask1: Tensor | None = None, mask2: Tensor | None = None,
                need_weights: bool = False) -> tuple[Tensor, ...]:
        """Return (x1 attended to x2 (B, T1, d_model), x2 attended to x1 (B, T2, d_other)) [+ both weight maps]."""
        r1 = self.attn_1to2(x1, x2, context_mask=mask2, need_weights=need_weights)
        r2 = self.attn_2to1(x2, x1, context_mask=mask1, need_weights=need_weights)
        if need_weights:
            return r1[0], r2[0], r1[1], r2[1]
        return r1, r2


def set_attention_impl(model: nn.Module, impl: str) -> int:
    """Switch every MultiHeadAttention inside `model` to `impl`; returns how many were switched."""
    _check_impl(impl)
    n = 0
    for m in model.modules():
        if isinstance(m, MultiHeadAttention):
            m.impl = impl
            n += 1
    return n
