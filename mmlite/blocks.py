"""Feed-forward network, pre-norm transformer blocks and the one TransformerStack built of them (chapter 3).

Pre-norm residual form, the one torch.nn.TransformerEncoderLayer(norm_first=True) computes:

    x = x + Dropout(MHA(LN1(x)))          (decoder: + self-attention, then cross-attention on LN2(x))
    x = x + Dropout(FFN(LN2(x))),   FFN(h) = W2 Dropout(act(W1 h + b1)) + b2

TransformerStack is depth such blocks and a final LayerNorm. Every transformer of mmlite is one: the ViT,
the text encoder, the fusion encoder (self-attention + cross-attention to the image), the caption decoder
(the same, causal) and the generative model's language model (causal, no context).

Decoding token by token, the blocks and the stack take a cache (mmlite.attention.LayerCache / KVCache; the
stack makes one with new_cache()): x then holds only the new tokens (B, T_new, d_model), which attend causally
to every cached token and to the new tokens up to their own position; the self-attention mask, when given, is a
key mask over the cached and the new positions, (B, T_past + T_new). Only causal stacks take a cache: with
bidirectional attention the cached tokens would have to see the new ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmlite.attention import AttentionCache, KVCache, LayerCache, MultiHeadAttention
from mmlite.checks import check_activation, check_dropout, check_features, check_tensor

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu}  # one per checks.ACTIVATION_NAMES; exact (erf) GELU, as torch's


@torch.no_grad()
def _copy_linear(dst: nn.Linear, src: nn.Linear) -> None:
    dst.weight.copy_(src.weight)
    if dst.bias is not None:
        dst.bias.copy_(src.bias)


@torch.no_grad()
def _copy_norm(dst: nn.LayerNorm, src: nn.LayerNorm) -> None:
    dst.weight.copy_(src.weight)
    dst.bias.copy_(src.bias)
    dst.eps = src.eps


def _torch_activation(layer: nn.Module) -> str:
    act = layer.activation
    if act is F.gelu or isinstance(act, nn.GELU):
        return "gelu"
    if act is F.relu or isinstance(act, nn.ReLU):
        return "relu"
    raise ValueError(f"torch layer activation {act!r} has no counterpart here (gelu or relu)")


class FeedForward(nn.Module):
    """Position-wise feed-forward network: linear2(dropout(act(linear1(x)))), hidden width 4 * d_model by default."""

    def __init__(self, d_model: int, hidden: int | None = None, dropout: float = 0.0,
                 activation: str = "gelu") -> None:
        super().__init__()
        hidden = 4 * d_model if hidden is None else hidden
        self.activation = check_activation(activation)  # "gelu" or "relu"
        self.linear1 = nn.Linear(d_model, hidden)
        self.dropout = nn.Dropout(check_dropout(dropout))
        self.linear2 = nn.Linear(hidden, d_model)

    def forward(self, x: Tensor) -> Tensor:
        """(..., d_model) -> (..., d_model)."""
        check_tensor("x", x)
        return self.linear2(self.dropout(ACTIVATIONS[self.activation](self.linear1(x))))


def _check_torch_layer(layer: nn.Module, expected: type, ff: FeedForward) -> None:
    """Raise unless `layer` is a pre-norm torch layer of type `expected` whose feed-forward matches `ff`."""
    if not isinstance(layer, expected):
        raise TypeError(f"expected torch.nn.{expected.__name__}, got {type(layer).__name__}")
    if not layer.norm_first:
        raise ValueError("layer has norm_first=False (post-norm); this block is pre-norm")
    if _torch_activation(layer) != ff.activation:
        raise ValueError(f"torch layer activation is {_torch_activation(layer)}, this block's is {ff.activation}")
    if layer.linear1.out_features != ff.linear1.out_features:
        raise ValueError(f"torch dim_feedforward={layer.linear1.out_features} but ff_hidden={ff.linear1.out_features}")


def _self_attention_cache(cache: LayerCache | None, causal: bool) -> AttentionCache | None:
    """The self-attention part of a block's cache, after checking that the block may use one."""
    if cache is None:
        return None
    if not isinstance(cache, LayerCache):
        raise TypeError(f"cache must be a LayerCache, got {type(cache).__name__}")
    if not causal:
        raise ValueError("a cache needs causal=True: with bidirectional attention the cached tokens would have to "
                         "attend to the new ones")
    return cache.self_attn


class EncoderBlock(nn.Module):
    """Pre-norm transformer encoder block: self-attention then feed-forward, each with a residual."""

    def __init__(self, d_model: int, n_heads: int, ff_hidden: int | None = None, dropout: float = 0.0,
                 impl: str = "scratch", activation: str = "gelu") -> None:
        super().__init__()
        self.d_model = d_model  # token width
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = MultiHeadAttention(d_model, n_heads, dropout=dropout, impl=impl)
        self.drop1 = nn.Dropout(check_dropout(dropout))
        self.norm2 = nn.LayerNorm(d_model)
        self.ff = FeedForward(d_model, ff_hidden, dropout=dropout, activation=activation)
        self.drop2 = nn.Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor | None = None, causal: bool = False,
                cache: LayerCache | None = None, bidirectional: Tensor | None = None) -> Tensor:
        """x (B, T, d_model), mask (B, T) key mask (or (B, T, T)), True = real token -> (B, T, d_model).

        With a cache (causal only, updated in place) x is the new tokens and mask covers (B, T_past + T).
        bidirectional (B, T) bool (causal only): tokens marked True attend to each other in both directions.
        """
        check_features("x", x, self.d_model, "d_model", owner="block")
        attn_cache = _self_attention_cache(cache, causal)
        x = x + self.drop1(self.attn(self.norm1(x), mask=mask, causal=causal, cache=attn_cache,
                                     bidirectional=bidirectional))
        return x + self.drop2(self.ff(self.norm2(x)))

    def copy_from_torch(self, layer: nn.TransformerEncoderLayer) -> "EncoderBlock":
        """Copy weights from torch.nn.TransformerEncoderLayer(norm_first=True) of the same sizes; returns self."""
        _check_torch_layer(layer, nn.TransformerEncoderLayer, self.ff)
        self.attn.copy_from_torch(layer.self_attn)
        _copy_norm(self.norm1, layer.norm1)
        _copy_norm(self.norm2, layer.norm2)
        _copy_linear(self.ff.linear1, layer.linear1)
        _copy_linear(self.ff.linear2, layer.linear2)
        return self


class DecoderBlock(nn.Module):
    """Pre-norm transformer decoder block: causal self-attention, cross-attention to a context, feed-forward."""

    def __init__(self, d_model: int, n_heads: int, d_context: int | None = None, ff_hidden: int | None = None,
                 dropout: float = 0.0, impl: str = "scratch", activation: str = "gelu") -> None:
        super().__init__()
        self.d_model = d_model  # token width of the decoded sequence
        self.d_context = d_model if d_context is None else d_context  # width of the context (e.g. image tokens)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = MultiHeadAttention(d_model, n_heads, dropout=dropout, impl=impl)
        self.drop1 = nn.Dropout(check_dropout(dropout))
        self.norm2 = nn.LayerNorm(d_model)
        self.cross_attn = MultiHeadAttention(d_model, n_heads, d_context=self.d_context, dropout=dropout, impl=impl)
        self.drop2 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)
        self.ff = FeedForward(d_model, ff_hidden, dropout=dropout, activation=activation)
        self.drop3 = nn.Dropout(dropout)

    def forward(self, x: Tensor, context: Tensor, mask: Tensor | None = None,
                context_mask: Tensor | None = None, causal: bool = True, cache: LayerCache | None = None,
                bidirectional: Tensor | None = None) -> Tensor:
        """x (B, T, d_model) attends to itself (causally by default) and to context (B, Tc, d_context) -> (B, T, d_model).

        mask (B, T) and context_mask (B, Tc) are key masks, True = real token. causal=False gives the fusion
        encoder's block (ALBEF's): bidirectional self-attention, then cross-attention to the image. With a cache
        (causal only, updated in place) x is the new tokens, mask covers (B, T_past + T), and the context's
        keys/values are projected at the first call and reused. bidirectional (B, T) bool (causal only): tokens
        marked True attend to each other in both directions in the self-attention.
        """
        check_features("x", x, self.d_model, "d_model", owner="block")
        check_features("context", context, self.d_context, "d_context", owner="block")
        self_cache = _self_attention_cache(cache, causal)
        cross_cache = None if cache is None else cache.cross_attn
        x = x + self.drop1(self.self_attn(self.norm1(x), mask=mask, causal=causal, cache=self_cache,
                                          bidirectional=bidirectional))
        x = x + self.drop2(self.cross_attn(self.norm2(x), context=context, context_mask=context_mask,
                                           cache=cross_cache))
        return x + self.drop3(self.ff(self.norm3(x)))

    def copy_from_torch(self, layer: nn.TransformerDecoderLayer) -> "DecoderBlock":
        """Copy weights from torch.nn.TransformerDecoderLayer(norm_first=True) of the same sizes; returns self."""
        _check_torch_layer(layer, nn.TransformerDecoderLayer, self.ff)
        self.self_attn.copy_from_torch(layer.self_attn)
        self.cross_attn.copy_from_torch(layer.multihead_attn)
        for mine, theirs in ((self.norm1, layer.norm1), (self.norm2, layer.norm2), (self.norm3, layer.norm3)):
            _copy_norm(mine, theirs)
        _copy_linear(self.ff.linear1, layer.linear1)
        _copy_linear(self.ff.linear2, layer.linear2)
        return self


class TransformerStack(nn.Module):
    """depth pre-norm blocks, then a final LayerNorm: x (B, T, d_model) -> (B, T, d_model).

    Without d_context the blocks are EncoderBlocks (self-attention + feed-forward); with d_context they are
    DecoderBlocks, whose tokens also attend to a context (B, Tc, d_context) every layer. causal=True lets
    token t attend only to tokens <= t. So:
        ViT, text encoder          TransformerStack(d, depth, heads)
        language model             TransformerStack(d, depth, heads, causal=True)
        fusion encoder (ALBEF)     TransformerStack(d, depth, heads, d_context=d_image)
        caption decoder (BLIP)     TransformerStack(d, depth, heads, causal=True, d_context=d_image)
    The same computation as torch.nn.TransformerEncoder(norm_first=True, norm=LayerNorm) or
    TransformerDecoder (without context: an encoder with a causal mask); copy_from_torch copies their weights.
    """

    def __init__(self, d_model: int, depth: int, n_heads: int, ff_hidden: int | None = None, dropout: float = 0.0,
                 causal: bool = False, d_context: int | None = None, impl: str = "scratch",
                 activation: str = "gelu") -> None:
        super().__init__()
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be a positive int, got {depth!r}")
        self.d_model = d_model  # token width
        self.depth = depth
        self.causal = causal
        self.d_context = d_context  # None: no cross-attention
        if d_context is None:
            blocks = (EncoderBlock(d_model, n_heads, ff_hidden=ff_hidden, dropout=dropout, impl=impl,
                                   activation=activation) for _ in range(depth))
        else:
            blocks = (DecoderBlock(d_model, n_heads, d_context=d_context, ff_hidden=ff_hidden, dropout=dropout,
                                   impl=impl, activation=activation) for _ in range(depth))
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: Tensor, mask: Tensor | None = None, context: Tensor | None = None,
                context_mask: Tensor | None = None, cache: KVCache | None = None,
                bidirectional: Tensor | None = None) -> Tensor:
        """x (B, T, d_model), mask (B, T) True = real token; context (B, Tc, d_context) iff built with d_context.

        With a cache (from new_cache(); causal stacks only; updated in place) x is the T new tokens, which
        follow the len(cache) tokens already processed, and mask, when given, covers (B, len(cache) + T).

        bidirectional (B, T) bool, causal stacks only: the tokens of x marked True attend to each other in both
        directions, all other pairs stay causal (prefix attention over a block of image tokens, PaliGemma-style).
        With a cache the whole group must be among the new tokens of one call; the cached tokens never see it.
        """
        if bidirectional is not None and not self.causal:
            raise ValueError("bidirectional marks exceptions to causal attention, but this stack is not causal "
                             "(every token already sees every other)")
        if (context is None) != (self.d_context is None):
            raise ValueError("this stack was built without d_context, so it takes no context" if context is not None
                             else f"this stack was built with d_context={self.d_context}: pass context (B, Tc, "
                                  f"{self.d_context})")
        if cache is not None:
            if not isinstance(cache, KVCache):
                raise TypeError(f"cache must be a KVCache (from new_cache()), got {type(cache).__name__}")
            if len(cache.layers) != self.depth:
                raise ValueError(f"cache has {len(cache.layers)} layers but the stack has depth={self.depth}")
            if not self.causal:
                raise ValueError("a cache needs a causal stack (causal=True): with bidirectional attention the "
                                 "cached tokens would have to attend to the new ones")
        for i, block in enumerate(self.blocks):
            layer_cache = None if cache is None else cache.layers[i]
            if context is None:
                x = block(x, mask=mask, causal=self.causal, cache=layer_cache, bidirectional=bidirectional)
            else:
                x = block(x, context, mask=mask, context_mask=context_mask, causal=self.causal, cache=layer_cache,
                          bidirectional=bidirectional)
        return self.norm(x)

    def new_cache(self) -> KVCache:
        """An empty KVCache with one LayerCache per block, for decoding with forward(..., cache=)."""
        return KVCache(self.depth)

    def copy_from_torch(self, stack: nn.TransformerEncoder | nn.TransformerDecoder) -> "TransformerStack":
        """Copy weights from torch.nn.TransformerEncoder / TransformerDecoder (built with norm=LayerNorm); returns self."""
        expected = nn.TransformerEncoder if self.d_context is None else nn.TransformerDecoder
        if not isinstance(stack, expected):
            raise TypeError(f"expected torch.nn.{expected.__name__}, got {type(stack).__name__}")
        if len(stack.layers) != self.depth or not isinstance(stack.norm, nn.LayerNorm):
            raise ValueError(f"torch stack has {len(stack.layers)} layers and norm {type(stack.norm).__name__}; "
                             f"this one has {self.depth} layers and a final LayerNorm")
        for mine, theirs in zip(self.blocks, stack.layers):
            mine.copy_from_torch(theirs)
        _copy_norm(self.norm, stack.norm)
        return self
