"""A generative vision-language model, LLaVA-style: image tokens spliced into a causal language model (chapter 5).

    image (B, 3, S, S) -> vision encoder (CNN or ViT) -> (B, N, d_vision) -> connector -> image tokens (B, N', d)
    ids (B, T)         -> "<image> <user> what color is the circle ? <assistant> red <end>"
                          token embeddings, the one <image> placeholder of each row replaced by its N' image
                          tokens -> (B, T - 1 + N', d) -> + learned positions -> TransformerStack(causal=True)
                          -> LM head (tied to the token embedding by default) -> next-token logits

Connectors (image features -> the language model's width): "linear" (LLaVA), "mlp" Linear-GELU-Linear
(LLaVA-1.5), "pixel_shuffle" (each s x s neighbourhood of the token grid concatenated into one token, then
linear: s^2 times fewer image tokens, Idefics3 / SmolVLM).

Attention over the image tokens: "causal" (plain causal attention over the whole spliced sequence) or "prefix"
(the image tokens also attend to each other in both directions, PaliGemma-style; text stays causal):

    allowed[i, j] = j <= i  or  (i and j are both image tokens)        (prefix_attention_mask)

Splicing works row by row through one gather: row b's placeholder at position p_b takes the spliced positions
p_b .. p_b + N' - 1, so rows may hold it in different places (a left-padded batch of prompts does). Positions
are counted over the real tokens of each row (cumsum of the key mask), so padding on the left changes nothing.
The logits are returned at the text positions only, aligned with ids: logits[:, t] predicts ids[:, t + 1]
(at the placeholder: after the whole image), so the usual shift (mmlite.objectives.shift_for_lm) applies.

Generation prefills the prompt (image tokens and template) in one call and then feeds one token at a time with
the KV cache. In "prefix" mode the bidirectional block lies entirely inside that first call, and every later
token is text, which attends causally; so the cached keys and values are exactly those of the full computation.
VLMDecoder follows mmlite.models.decoding's Decoder protocol with the image tokens as its context, so greedy
decoding, beam search and sampling are the library's own functions.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from mmlite.attention import KVCache
from mmlite.blocks import TransformerStack
from mmlite.checks import check_dropout, check_mask, check_tensor
from mmlite.encoders import CNNEncoder, EncoderOutput, ViTEncoder
from mmlite.encoders._checks import check_ids_and_mask
from mmlite.encoders.cnn import NORMS
from mmlite.models.albef import ALBEF
from mmlite.models.decoding import beam_search, greedy_decode, sample_decode

IMAGE_ENCODERS = ("cnn", "vit")
CONNECTORS = ("linear", "mlp", "pixel_shuffle")
ATTENTIONS = ("causal", "prefix")
STRATEGIES = ("greedy", "beam", "sample")


@dataclass
class VLMConfig:
    vocab_size: int  # tokenizer size (len(mmlite.tasks.vlm.chat_tokenizer()))
    image_id: int  # id of the <image> placeholder, replaced by the image tokens
    end_id: int  # id of the end-of-turn token that closes an answer; generation stops at it
    pad_id: int = 0  # id of [PAD]
    image_size: int = 32  # side of the square input images
    image_encoder: str = "cnn"  # "cnn" (a grid of region tokens; fast on a CPU) or "vit" (patch tokens)
    cnn_width: int = 32  # channels of the CNN's first stage
    cnn_depth: int = 3  # stride-2 stages of the CNN: 32x32 -> a 4x4 grid of region tokens
    cnn_norm: str = "batch"  # the CNN's normalisation: "batch", "group" or "none"
    patch_size: int = 8  # ViT patch side (image_size must be a multiple of it)
    vit_depth: int = 4  # ViT blocks
    vision_heads: int = 4  # ViT attention heads (an ALBEF encoder to load has its n_heads)
    d_vision: int = 64  # width of the vision encoder's tokens (an ALBEF encoder to load has its d_model)
    freeze_vision: bool = False  # keep the vision encoder fixed: no gradients, always in eval mode
    connector: str = "mlp"  # "linear", "mlp" (Linear-GELU-Linear) or "pixel_shuffle" (s x s merge, then linear)
    shuffle_factor: int = 2  # s of pixel_shuffle: s^2 times fewer image tokens (the grid side must divide by it)
    attention: str = "causal"  # "causal" over the whole sequence, or "prefix": image tokens see each other
    d_model: int = 64  # token width of the language model
    n_heads: int = 4  # the language model's attention heads (d_model must be a multiple of it)
    depth: int = 2  # the language model's blocks
    max_len: int = 64  # positions of the spliced sequence: text tokens plus image tokens
    tie_embeddings: bool = True  # the LM head shares the token embedding's weights
    dropout: float = 0.0  # dropout in every transformer block (and the ViT)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type in ("int", int) and (isinstance(value, bool) or not isinstance(value, int)):
                raise TypeError(f"VLMConfig.{f.name} must be an int, got {type(value).__name__} {value!r}")
            if f.type in ("bool", bool) and not isinstance(value, bool):
                raise TypeError(f"VLMConfig.{f.name} must be a bool, got {type(value).__name__} {value!r}")
        for name, allowed in (("image_encoder", IMAGE_ENCODERS), ("cnn_norm", NORMS), ("connector", CONNECTORS),
                              ("attention", ATTENTIONS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"VLMConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("vocab_size", "image_size", "cnn_width", "cnn_depth", "patch_size", "vit_depth", "vision_heads",
                     "d_vision", "shuffle_factor", "d_model", "n_heads", "depth", "max_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"VLMConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("pad_id", "image_id", "end_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ValueError(f"VLMConfig.{name} {getattr(self, name)} is outside [0, vocab_size={self.vocab_size})")
        if len({self.pad_id, self.image_id, self.end_id}) < 3:
            raise ValueError(f"VLMConfig.pad_id={self.pad_id}, image_id={self.image_id} and end_id={self.end_id} "
                             "must be three different tokens")
        if self.d_model % self.n_heads:
            raise ValueError(f"VLMConfig.d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.image_encoder == "vit":
            if self.image_size % self.patch_size:
                raise ValueError(f"VLMConfig.image_size={self.image_size} is not divisible by "
                                 f"patch_size={self.patch_size}")
            if self.d_vision % self.vision_heads:
                raise ValueError(f"VLMConfig.d_vision={self.d_vision} is not divisible by "
                                 f"vision_heads={self.vision_heads}")
        if self.image_encoder == "cnn" and self.image_size % 2**self.cnn_depth:
            raise ValueError(f"VLMConfig.image_size={self.image_size} is not a multiple of 2**cnn_depth="
                             f"{2**self.cnn_depth}")
        if self.connector == "pixel_shuffle" and self.grid_size % self.shuffle_factor:
            raise ValueError(f"VLMConfig.shuffle_factor={self.shuffle_factor} does not divide the "
                             f"{self.grid_size}x{self.grid_size} grid of image tokens (pixel_shuffle merges "
                             f"shuffle_factor x shuffle_factor neighbourhoods)")
        if self.max_len <= self.n_image_tokens:
            raise ValueError(f"VLMConfig.max_len={self.max_len} leaves no position for text beside the "
                             f"{self.n_image_tokens} image tokens")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"VLMConfig.dropout must be in [0, 1), got {self.dropout}")

    @property
    def grid_size(self) -> int:
        """Side of the vision encoder's square token grid."""
        if self.image_encoder == "cnn":
            return self.image_size // 2**self.cnn_depth
        return self.image_size // self.patch_size

    @property
    def n_image_tokens(self) -> int:
        """N': image tokens per image after the connector (grid_size^2, / shuffle_factor^2 with pixel_shuffle)."""
        n = self.grid_size**2
        return n // self.shuffle_factor**2 if self.connector == "pixel_shuffle" else n

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- connector


def pixel_shuffle(tokens: Tensor, factor: int = 2) -> Tensor:
    """Merge each factor x factor neighbourhood of a square token grid into one token.

    tokens (B, N, d), row-major over a g x g grid (N = g^2, g divisible by factor) -> (B, N / factor^2,
    factor^2 * d). Output token (R, C) of the (g / s) x (g / s) grid (row-major) is the concatenation of the input
    tokens at (R s + a, C s + c) for a, c = 0..s-1, a major: the information is kept, only regrouped.
    """
    check_tensor("tokens", tokens)
    if tokens.dim() != 3:
        raise ValueError(f"tokens must be (B, N, d), got shape {tuple(tokens.shape)}")
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ValueError(f"factor must be a positive int, got {factor!r}")
    b, n, d = tokens.shape
    g = math.isqrt(n)
    if g * g != n:
        raise ValueError(f"pixel_shuffle needs a square grid of image tokens, got N={n} tokens (not a square)")
    if g % factor:
        raise ValueError(f"pixel_shuffle: the {g}x{g} grid of image tokens is not divisible by factor={factor}")
    s, h = factor, g // factor
    x = tokens.reshape(b, h, s, h, s, d)  # (B, R, a, C, c, d): grid row R*s + a, column C*s + c
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, h * h, s * s * d)  # (B, (g/s)^2, s^2 d)


class Connector(nn.Module):
    """Vision tokens (B, N, d_vision) -> image tokens of the language model (B, N', d_model).

    "linear": one Linear; "mlp": Linear-GELU-Linear; "pixel_shuffle": pixel_shuffle(factor), then one Linear
    from factor^2 * d_vision (N' = N / factor^2).
    """

    def __init__(self, kind: str, d_vision: int, d_model: int, factor: int = 2) -> None:
        super().__init__()
        if kind not in CONNECTORS:
            raise ValueError(f"connector kind must be one of {CONNECTORS}, got {kind!r}")
        self.kind = kind  # which connector
        self.d_vision = d_vision  # width of the vision tokens
        self.d_model = d_model  # width of the language model
        self.factor = factor  # pixel_shuffle's s
        if kind == "linear":
            self.proj: nn.Module = nn.Linear(d_vision, d_model)
        elif kind == "mlp":
            self.proj = nn.Sequential(nn.Linear(d_vision, d_model), nn.GELU(), nn.Linear(d_model, d_model))
        else:
            self.proj = nn.Linear(factor * factor * d_vision, d_model)

    def forward(self, tokens: Tensor) -> Tensor:
        """(B, N, d_vision) -> (B, N', d_model)."""
        check_tensor("tokens", tokens)
        if tokens.dim() != 3 or tokens.shape[-1] != self.d_vision:
            raise ValueError(f"tokens must be (B, N, d_vision={self.d_vision}), got shape {tuple(tokens.shape)}")
        if self.kind == "pixel_shuffle":
            tokens = pixel_shuffle(tokens, self.factor)  # (B, N / s^2, s^2 d_vision)
        return self.proj(tokens)


# --------------------------------------------------------------------------- splicing and the prefix mask


def splice(text: Tensor, image: Tensor, at: Tensor) -> Tensor:
    """Replace position at[b] of text row b by the rows of image[b].

    text (B, T, ...), image (B, N, ...) (same trailing dims), at (B,) long in [0, T) -> (B, T - 1 + N, ...):
    row b is text[b, :at_b], image[b], text[b, at_b + 1:]. One gather from cat([text, image], dim=1).
    """
    b, t = text.shape[:2]
    n = image.shape[1]
    s = torch.arange(t - 1 + n, device=text.device)[None]  # (1, S)
    p = at.to(text.device)[:, None]  # (B, 1)
    # index into cat([text, image]): text before the placeholder, the image, the text after it
    src = torch.where(s < p, s, torch.where(s < p + n, t + s - p, s - n + 1))  # (B, S)
    source = torch.cat([text, image], dim=1)  # (B, T + N, ...)
    index = src.view(b, -1, *([1] * (source.dim() - 2))).expand(-1, -1, *source.shape[2:])
    return source.gather(1, index)


def text_positions(at: Tensor, t: int, n: int) -> Tensor:
    """Where each text position's next-token prediction is read in the spliced sequence: (B, T) long.

    Position t < at_b stays t; the placeholder itself maps to its last image token, at_b + n - 1 (that output
    has seen the whole image and predicts the token after the placeholder); later positions shift by n - 1.
    """
    pos = torch.arange(t, device=at.device)[None]  # (1, T)
    return pos + (n - 1) * (pos >= at[:, None]).long()  # (B, T)


def prefix_attention_mask(is_image: Tensor) -> Tensor:
    """The "prefix" attention pattern, (B, S, S) bool, True = query i may attend to key j:

        allowed[b, i, j] = j <= i  or  (is_image[b, i] and is_image[b, j]).

    is_image (B, S) bool marks the image tokens of the spliced sequence. (The model passes is_image to
    TransformerStack's `bidirectional`; this builds the same pattern explicitly, for inspection.)
    """
    check_tensor("is_image", is_image)
    if is_image.dim() != 2 or is_image.dtype != torch.bool:
        raise ValueError(f"is_image must be a (B, S) bool tensor, got {is_image.dtype} {tuple(is_image.shape)}")
    s = is_image.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=is_image.device).tril()  # (S, S)
    return causal | (is_image[:, :, None] & is_image[:, None, :])  # (B, S, S)


class VLMCache:
    """What VLMDecoder.step keeps between calls: the stack's KVCache and the bookkeeping of the spliced sequence.

    len(cache) counts the ids fed so far (the placeholder counts once, as in ids), which is what the decoding
    functions slice by; the stack's cache holds len(cache) - 1 + N' positions once the image is in.
    """

    def __init__(self, depth: int) -> None:
        self.kv = KVCache(depth)  # keys and values of every spliced position fed so far
        self.n_ids = 0  # ids fed so far
        self.id_mask: Tensor | None = None  # (B, n_ids) the key mask of those ids, True = real
        self.key_mask: Tensor | None = None  # (B, len(kv)) the key mask of the spliced positions
        self.n_real: Tensor | None = None  # (B,) long: real spliced positions so far (the next position index)

    def __len__(self) -> int:
        return self.n_ids

    @property
    def batch_size(self) -> int | None:
        """Rows held, or None before the first call."""
        return None if self.n_real is None else self.n_real.shape[0]

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows `index` (B_new,) long, in that order (rows may repeat)."""
        if self.n_real is None:
            return
        self.kv.reorder(index)  # checks index
        index = index.to(self.n_real.device)
        self.id_mask = self.id_mask.index_select(0, index)
        self.key_mask = self.key_mask.index_select(0, index)
        self.n_real = self.n_real.index_select(0, index)


# --------------------------------------------------------------------------- the language model


class VLMDecoder(nn.Module):
    """The causal language model with the image tokens spliced in at the <image> placeholder.

    forward(ids (B, T), mask (B, T) or None, context = image tokens (B, N', d_model) or None, context_mask (B, N')
    or None) -> logits (B, T, V) at the text positions, aligned with ids (see text_positions). With a context
    every row holds exactly one placeholder, at any position; without one no row may (a text-only sequence).
    mask=None means every token is real; rows may be padded on either side. This is the Decoder protocol of
    mmlite.models.decoding (pad_id, max_len, forward, new_cache, step).
    """

    def __init__(self, vocab_size: int, d_model: int, depth: int, n_heads: int, max_len: int, image_id: int,
                 pad_id: int = 0, attention: str = "causal", ff_hidden: int | None = None, dropout: float = 0.0,
                 tie_embeddings: bool = True) -> None:
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("d_model", d_model), ("max_len", max_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name, value in (("image_id", image_id), ("pad_id", pad_id)):
            if not 0 <= value < vocab_size:
                raise ValueError(f"{name} {value} is outside [0, vocab_size={vocab_size})")
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
        self.vocab_size = vocab_size  # V
        self.d_model = d_model  # token width
        self.max_len = max_len  # positions of the spliced sequence (text tokens + image tokens)
        self.image_id = image_id  # id of the <image> placeholder
        self.pad_id = pad_id  # id of [PAD], written after the end token by the decoding functions
        self.attention = attention  # "causal" or "prefix"
        self.token_embed = nn.Embedding(vocab_size, d_model)
        nn.init.normal_(self.token_embed.weight, std=0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, max_len, d_model) * 0.02)  # (1, max_len, D)
        self.drop = nn.Dropout(check_dropout(dropout))
        self.stack = TransformerStack(d_model, depth, n_heads, ff_hidden=ff_hidden, dropout=dropout, causal=True)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        if tie_embeddings:
            self.lm_head.weight = self.token_embed.weight

    # ------------------------------------------------------------------ checks
    def _placeholder(self, ids: Tensor, mask: Tensor | None, has_image: bool) -> Tensor | None:
        """The placeholder's position in each row, (B,) long, or None for text-only ids; raises when misplaced."""
        is_ph = ids == self.image_id  # (B, T)
        counts = is_ph.sum(dim=1)  # (B,)
        if not has_image:
            if bool(counts.any()):
                rows = counts.nonzero()[:, 0].tolist()
                raise ValueError(f"rows {rows} of ids hold the <image> placeholder (id {self.image_id}) but no image "
                                 "tokens were given")
            return None
        if bool((counts == 0).any()):
            rows = (counts == 0).nonzero()[:, 0].tolist()
            raise ValueError(f"rows {rows} of ids have no <image> placeholder (id {self.image_id}); each row needs "
                             "exactly one where its image tokens go")
        if bool((counts > 1).any()):
            rows = (counts > 1).nonzero()[:, 0].tolist()
            raise ValueError(f"rows {rows} of ids hold more than one <image> placeholder (id {self.image_id}); "
                             "one image per sequence")
        at = is_ph.long().argmax(dim=1)  # (B,)
        if mask is not None and not bool(mask.gather(1, at[:, None]).all()):
            rows = (~mask.gather(1, at[:, None])[:, 0]).nonzero()[:, 0].tolist()
            raise ValueError(f"the <image> placeholder of rows {rows} lies at a padded position (mask False)")
        return at

    def _check_context(self, context: Tensor | None, context_mask: Tensor | None, batch: int) -> None:
        if context is None:
            if context_mask is not None:
                raise ValueError("context_mask was given without image tokens (context)")
            return
        check_tensor("context", context)
        if context.dim() != 3 or context.shape[-1] != self.d_model or context.shape[1] < 1:
            raise ValueError(f"context (the image tokens) must be (B, N', d_model={self.d_model}) with N' >= 1, "
                             f"got shape {tuple(context.shape)}")
        if context.shape[0] != batch:
            raise ValueError(f"context batch size is {context.shape[0]} but ids batch size is {batch}")
        check_mask("context_mask", context_mask, context.shape[:2])

    # ------------------------------------------------------------------ the computation
    def _embed(self, ids: Tensor, id_mask: Tensor, context: Tensor | None, context_mask: Tensor | None,
               at: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
        """Token embeddings with the image spliced in: x (B, S, D), key mask (B, S), is_image (B, S) or None,
        and the spliced position read for each id (B, T)."""
        x = self.token_embed(ids)  # (B, T, D)
        b, t = ids.shape
        if at is None:
            return x, id_mask, None, torch.arange(t, device=ids.device).expand(b, t)
        n = context.shape[1]
        image_mask = torch.ones(b, n, dtype=torch.bool, device=ids.device) if context_mask is None else context_mask
        x = splice(x, context.to(x.dtype), at)  # (B, S, D)
        key_mask = splice(id_mask, image_mask, at)  # (B, S)
        is_image = splice(torch.zeros_like(id_mask), torch.ones_like(image_mask), at)  # (B, S)
        return x, key_mask, is_image, text_positions(at, t, n)

    def _run(self, x: Tensor, key_mask: Tensor, all_keys: Tensor | None, is_image: Tensor | None,
             offset: Tensor | None, read: Tensor, cache: KVCache | None) -> Tensor:
        """Add positions (counted over real tokens from offset (B,)), run the stack, read logits at `read`."""
        positions = key_mask.long().cumsum(dim=1) - 1  # (B, S_new): 0, 1, ... over the real tokens
        if offset is not None:
            positions = positions + offset[:, None]
        positions = positions.clamp_min(0)  # padding before a row's first real token: position 0 (never seen)
        x = x + self.pos_embed[0][positions]  # (B, S_new, D)
        bidirectional = is_image if self.attention == "prefix" else None
        h = self.stack(self.drop(x), mask=all_keys, cache=cache, bidirectional=bidirectional)  # (B, S_new, D)
        h = h.gather(1, read[:, :, None].expand(-1, -1, h.shape[-1]))  # (B, T_new, D)
        return self.lm_head(h)  # (B, T_new, V)

    def spliced_length(self, t: int, n_image: int | None) -> int:
        """Positions a sequence of t ids takes: t, or t - 1 + n_image with an image."""
        return t if n_image is None else t - 1 + n_image

    def forward(self, ids: Tensor, mask: Tensor | None = None, context: Tensor | None = None,
                context_mask: Tensor | None = None) -> Tensor:
        """Teacher forcing: ids (B, T), mask (B, T) or None, image tokens (B, N', D) or None -> logits (B, T, V)."""
        check_ids_and_mask(ids, mask, self.vocab_size, self.pad_id)
        b, t = ids.shape
        self._check_context(context, context_mask, b)
        s = self.spliced_length(t, None if context is None else context.shape[1])
        if s > self.max_len:
            raise ValueError(f"sequence length {s} ({t} ids" + ("" if context is None else
                             f", the placeholder replaced by {context.shape[1]} image tokens") +
                             f") exceeds max_len={self.max_len}")
        at = self._placeholder(ids, mask, context is not None)
        id_mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask
        x, key_mask, is_image, read = self._embed(ids, id_mask, context, context_mask, at)
        all_keys = None if mask is None and context_mask is None else key_mask
        return self._run(x, key_mask, all_keys, is_image, None, read, None)

    def new_cache(self) -> VLMCache:
        """An empty cache for step()."""
        return VLMCache(self.stack.depth)

    def step(self, ids_new: Tensor, cache: VLMCache, context: Tensor | None = None,
             context_mask: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        """Feed ids_new (B, T_new) after the len(cache) ids already fed -> their logits (B, T_new, V).

        The first call (the prefill) holds every row's placeholder when a context is given, and splices the image
        tokens there (in "prefix" mode they attend to each other within that call); the context is read at the
        first call only. Later calls feed text: a placeholder in them raises. mask=None means every id fed so
        far is real; otherwise it covers them all, (B, len(cache) + T_new). Calling step on chunks of a sequence
        gives forward's logits.
        """
        if not isinstance(cache, VLMCache):
            raise TypeError(f"cache must be a VLMCache (from new_cache()), got {type(cache).__name__}")
        check_ids_and_mask(ids_new, None, self.vocab_size, self.pad_id)
        b, t_new = ids_new.shape
        if t_new == 0:
            raise ValueError("ids_new must hold at least one token, got shape (B, 0)")
        if cache.batch_size is not None and cache.batch_size != b:
            raise ValueError(f"cache batch size is {cache.batch_size} but ids_new batch size is {b} "
                             "(select rows with cache.reorder)")
        past = len(cache)
        if mask is not None and (not isinstance(mask, Tensor) or tuple(mask.shape) != (b, past + t_new)):
            got = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
            raise ValueError(f"mask must cover the ids already fed and the new ones, (B, len(cache) + T_new) = "
                             f"{(b, past + t_new)}, got {got}")
        check_mask("mask", mask, (b, past + t_new))
        new_mask = torch.ones_like(ids_new, dtype=torch.bool) if mask is None else mask[:, past:]  # (B, T_new)
        if past and mask is not None and not torch.equal(mask[:, :past], cache.id_mask):
            raise ValueError("mask's first len(cache) columns differ from the mask of the ids already fed")
        if past == 0:
            self._check_context(context, context_mask, b)
            at = self._placeholder(ids_new, new_mask, context is not None)
        else:
            if bool((ids_new == self.image_id).any()):
                raise ValueError(f"ids_new holds the <image> placeholder (id {self.image_id}) after the first call: "
                                 "the image is spliced in by the first call (the prefill), later calls feed text")
            at, context, context_mask = None, None, None  # the image's keys and values are in the cache
        s_new = self.spliced_length(t_new, None if at is None else context.shape[1])
        if len(cache.kv) + s_new > self.max_len:
            raise ValueError(f"sequence length {len(cache.kv) + s_new} ({len(cache.kv)} cached + {s_new} new "
                             f"positions) exceeds max_len={self.max_len}")
        x, key_new, is_image, read = self._embed(ids_new, new_mask, context, context_mask, at)
        all_keys = key_new if cache.key_mask is None else torch.cat([cache.key_mask, key_new], dim=1)
        offset = cache.n_real if cache.n_real is not None else torch.zeros(b, dtype=torch.long, device=ids_new.device)
        logits = self._run(x, key_new, all_keys, is_image, offset, read, cache.kv)
        cache.n_ids = past + t_new
        cache.id_mask = new_mask if cache.id_mask is None else torch.cat([cache.id_mask, new_mask], dim=1)
        cache.key_mask = all_keys
        cache.n_real = offset + key_new.sum(dim=1)
        return logits


# --------------------------------------------------------------------------- the model


class VLM(nn.Module):
    """Vision encoder -> connector -> image tokens spliced into the causal language model (the module docstring).

    forward(images (B, 3, S, S) or None, ids (B, T), mask) -> logits (B, T, V) at the text positions;
    generate(...) continues a prompt; init_vision_from(albef) loads a trained ALBEF image encoder.
    """

    def __init__(self, cfg: VLMConfig) -> None:
        super().__init__()
        if not isinstance(cfg, VLMConfig):
            raise TypeError(f"cfg must be a VLMConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        if cfg.image_encoder == "cnn":
            self.image_encoder: nn.Module = CNNEncoder(width=cfg.cnn_width, d_model=cfg.d_vision, depth=cfg.cnn_depth,
                                                       norm=cfg.cnn_norm)
        else:
            self.image_encoder = ViTEncoder(cfg.image_size, cfg.patch_size, d_model=cfg.d_vision, depth=cfg.vit_depth,
                                            n_heads=cfg.vision_heads, pool="mean", dropout=cfg.dropout)
        self.connector = Connector(cfg.connector, cfg.d_vision, cfg.d_model, factor=cfg.shuffle_factor)
        self.decoder = VLMDecoder(cfg.vocab_size, cfg.d_model, cfg.depth, cfg.n_heads, cfg.max_len, cfg.image_id,
                                  pad_id=cfg.pad_id, attention=cfg.attention, dropout=cfg.dropout,
                                  tie_embeddings=cfg.tie_embeddings)
        if cfg.freeze_vision:
            self.image_encoder.requires_grad_(False)
            self.image_encoder.eval()

    def train(self, mode: bool = True) -> "VLM":
        """nn.Module.train, except that a frozen vision encoder stays in eval mode (fixed BatchNorm statistics)."""
        super().train(mode)
        if self.cfg.freeze_vision:
            self.image_encoder.eval()
        return self

    @torch.no_grad()
    def init_vision_from(self, albef: nn.Module) -> "VLM":
        """Copy the weights of a trained mmlite.models.ALBEF's image encoder into this one; returns self.

        The two encoders must be built alike: image_encoder, image_size, d_vision = ALBEF's d_model, and the CNN's
        cnn_width, cnn_depth, cnn_norm or the ViT's patch_size, vit_depth, vision_heads = ALBEF's n_heads.
        A frozen encoder stays frozen.
        """
        if not isinstance(albef, ALBEF):
            raise TypeError(f"init_vision_from takes an mmlite.models.ALBEF, got {type(albef).__name__}")
        mine, theirs = self.cfg, albef.cfg
        pairs = [("image_encoder", "image_encoder"), ("image_size", "image_size"), ("d_vision", "d_model")]
        if mine.image_encoder == "cnn":
            pairs += [("cnn_width", "cnn_width"), ("cnn_depth", "cnn_depth"), ("cnn_norm", "cnn_norm")]
        else:
            pairs += [("patch_size", "patch_size"), ("vit_depth", "vit_depth"), ("vision_heads", "n_heads")]
        wrong = [f"VLMConfig.{a}={getattr(mine, a)!r} but ALBEFConfig.{b}={getattr(theirs, b)!r}" for a, b in pairs
                 if getattr(mine, a) != getattr(theirs, b)]
        if wrong:
            raise ValueError("the ALBEF image encoder does not fit this model: " + "; ".join(wrong))
        self.image_encoder.load_state_dict(albef.image_encoder.state_dict())
        return self

    # ------------------------------------------------------------------ paths
    def _check_images(self, images: Tensor) -> None:
        check_tensor("images", images)
        size = self.cfg.image_size
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, size, size) or not images.is_floating_point():
            raise ValueError(f"images must be a float tensor (B, 3, {size}, {size}) (VLMConfig.image_size={size}), "
                             f"got {images.dtype} {tuple(images.shape)}")

    def encode_image(self, images: Tensor) -> EncoderOutput:
        """(B, 3, S, S) in [0, 1] -> the vision encoder's EncoderOutput (tokens (B, N, d_vision), mask, pooled)."""
        self._check_images(images)
        if self.cfg.freeze_vision:
            with torch.no_grad():
                return self.image_encoder(images)
        return self.image_encoder(images)

    def image_tokens(self, images: Tensor) -> Tensor:
        """(B, 3, S, S) in [0, 1] -> image tokens in the language model's width, (B, N', d_model)."""
        return self.connector(self.encode_image(images).tokens)

    def forward(self, images: Tensor | None, ids: Tensor, mask: Tensor | None = None) -> Tensor:
        """Teacher forcing: images (B, 3, S, S) (or None: text only), ids, mask (B, T) -> logits (B, T, V).

        Each row of ids holds one <image> placeholder (none without images). The logits are at the text
        positions, aligned with ids: logits[:, t] predicts ids[:, t + 1].
        """
        context = None if images is None else self.image_tokens(images)
        if context is not None and context.shape[0] != ids.shape[0]:
            raise ValueError(f"{context.shape[0]} images but {ids.shape[0]} rows of ids: one image per row")
        return self.decoder(ids, mask, context=context)

    @torch.no_grad()
    def generate(self, images: Tensor | None, prompt_ids: Tensor, prompt_mask: Tensor | None = None,
                 max_new_tokens: int = 16, strategy: str = "greedy", beam_size: int = 4, length_penalty: float = 1.0,
                 temperature: float = 1.0, top_p: float = 1.0, generator: torch.Generator | None = None,
                 use_cache: bool = True, eos_id: int | None = None, pad_id: int | None = None) -> Tensor:
        """Continue each prompt: the generated ids (B, L) after it, L <= max_new_tokens, ended by eos_id (None:
        cfg.end_id) and then pad_id (None: cfg.pad_id).

        prompt_ids (B, P) hold the <image> placeholder and the template up to the assistant's turn
        (mmlite.tasks.vlm.encode_chat with the last answer None); rows of different lengths are left-padded, with
        prompt_mask (B, P) True on the real tokens. strategy "greedy", "beam" (beam_size, length_penalty; the best
        beam) or "sample" (temperature, top_p, generator: mmlite.models.decoding.sample_decode). With use_cache
        the prompt is prefilled once and each new token is fed alone; use_cache=False recomputes everything at
        every step (the reference). Runs in eval mode without gradients; the mode is restored afterwards.
        """
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        check_tensor("prompt_ids", prompt_ids)
        if prompt_ids.dim() != 2 or prompt_ids.shape[1] < 1:
            raise ValueError(f"prompt_ids must be (B, P) with P >= 1, got shape {tuple(prompt_ids.shape)}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        p = prompt_ids.shape[1]
        n = None if images is None else self.cfg.n_image_tokens
        prompt_len = self.decoder.spliced_length(p, n)
        image_note = "" if n is None else f" with its placeholder replaced by {n} image tokens"
        if prompt_len > self.cfg.max_len:
            raise ValueError(f"the prompt is longer than max_len: {p} ids{image_note} take {prompt_len} positions, "
                             f"max_len={self.cfg.max_len}")
        if prompt_len + max_new_tokens - 1 > self.cfg.max_len:
            raise ValueError(f"the prompt ({p} ids{image_note}: {prompt_len} positions) and max_new_tokens="
                             f"{max_new_tokens} (all but the last fed back) need {prompt_len + max_new_tokens - 1} "
                             f"positions, more than max_len={self.cfg.max_len}; lower max_new_tokens to at most "
                             f"{self.cfg.max_len - prompt_len + 1}")
        eos = self.cfg.end_id if eos_id is None else eos_id
        was_training = self.training
        self.eval()
        try:
            context = None if images is None else self.image_tokens(images)
            if context is not None and context.shape[0] != prompt_ids.shape[0]:
                raise ValueError(f"{context.shape[0]} images but {prompt_ids.shape[0]} prompts: one image per prompt")
            kw = dict(context=context, use_cache=use_cache, pad_id=pad_id, prompt=prompt_ids, prompt_mask=prompt_mask,
                      batch_size=prompt_ids.shape[0])
            if strategy == "greedy":
                return greedy_decode(self.decoder, None, eos, max_new_tokens, **kw)
            if strategy == "beam":
                return beam_search(self.decoder, None, eos, max_new_tokens, beam_size=beam_size,
                                   length_penalty=length_penalty, **kw)[0]
            return sample_decode(self.decoder, None, eos, max_new_tokens, temperature=temperature, top_p=top_p,
                                 generator=generator, **kw)
        finally:
            self.train(was_training)
