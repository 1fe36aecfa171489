"""Four ways to fuse image and text tokens into one vector: concatenation, gating, hierarchical, cross-attention
(derived in chapters 2 and 3).

Every strategy has the same call, so a model can swap them by name (`make_fusion`):

    forward(image_tokens (B, Ti, Di), text_tokens (B, Tt, Dt), image_mask=None, text_mask=None) -> (B, d_out)

(HierarchicalFusion takes a list of token sequences per modality, one per encoder level.)
Masks are bool (B, T), True = real token; padding never changes the result.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmlite.attention import CoAttention
from mmlite.blocks import ACTIVATIONS, FeedForward
from mmlite.checks import check_activation, check_features, check_mask
from mmlite.pooling import masked_mean


def _check_pair(image_tokens: Tensor, text_tokens: Tensor, image_mask: Tensor | None, text_mask: Tensor | None,
                d_image: int, d_text: int) -> None:
    """Raise if the tokens or masks do not match the widths the fusion was built for, or each other's batch."""
    check_features("image_tokens", image_tokens, d_image, "d_image", owner="fusion")
    check_features("text_tokens", text_tokens, d_text, "d_text", owner="fusion")
    if image_tokens.shape[0] != text_tokens.shape[0]:
        raise ValueError(f"image_tokens batch size is {image_tokens.shape[0]} but text_tokens batch size is "
                         f"{text_tokens.shape[0]}")
    check_mask("image_mask", image_mask, image_tokens.shape[:2])
    check_mask("text_mask", text_mask, text_tokens.shape[:2])


def _pool_pair(image_tokens: Tensor, text_tokens: Tensor, image_mask: Tensor | None, text_mask: Tensor | None,
               d_image: int, d_text: int) -> tuple[Tensor, Tensor]:
    """Validate and masked-mean pool both modalities: ((B, Di), (B, Dt))."""
    _check_pair(image_tokens, text_tokens, image_mask, text_mask, d_image, d_text)
    return masked_mean(image_tokens, image_mask), masked_mean(text_tokens, text_mask)


class ConcatFusion(nn.Module):
    """Late fusion by concatenation: f = act(W [pool(image); pool(text)] + b)."""

    def __init__(self, d_image: int, d_text: int, d_out: int, activation: str = "gelu") -> None:
        super().__init__()
        check_activation(activation)
        self.d_image = d_image  # width of the image tokens
        self.d_text = d_text  # width of the text tokens
        self.d_out = d_out  # width of the fused vector
        self.activation = activation  # non-linearity after the projection
        self.proj = nn.Linear(d_image + d_text, d_out)

    def forward(self, image_tokens: Tensor, text_tokens: Tensor, image_mask: Tensor | None = None,
                text_mask: Tensor | None = None) -> Tensor:
        """(B, Ti, Di), (B, Tt, Dt) -> (B, d_out)."""
        h_i, h_t = _pool_pair(image_tokens, text_tokens, image_mask, text_mask, self.d_image, self.d_text)
        return ACTIVATIONS[self.activation](self.proj(torch.cat([h_i, h_t], dim=-1)))  # (B, Di + Dt) -> (B, d_out)


class GatedFusion(nn.Module):
    """Gated fusion: h_i = W_i pool(image), h_t = W_t pool(text), g = gate(W_g [h_i; h_t] + b_g),
    f = g * h_i + (1 - g) * h_t, one gate value per feature.

    gate="sigmoid": g = sigmoid(z). gate="gelu": g = Phi(z), the standard normal CDF, i.e. the factor GELU(z) =
    z * Phi(z) multiplies its input by (Phi(z) ~ sigmoid(1.702 z)); both keep g in (0, 1), so f stays a
    per-feature convex mix of the two modalities.
    """

    def __init__(self, d_image: int, d_text: int, d_out: int, gate: str = "sigmoid") -> None:
        super().__init__()
        if gate not in ("sigmoid", "gelu"):
            raise ValueError(f"gate must be 'sigmoid' or 'gelu', got {gate!r}")
        self.d_image = d_image  # width of the image tokens
        self.d_text = d_text  # width of the text tokens
        self.d_out = d_out  # width of the fused vector
        self.gate = gate  # gate non-linearity, "sigmoid" or "gelu" (Gaussian CDF)
        self.image_proj = nn.Linear(d_image, d_out)
        self.text_proj = nn.Linear(d_text, d_out)
        self.gate_proj = nn.Linear(2 * d_out, d_out)

    def forward(self, image_tokens: Tensor, text_tokens: Tensor, image_mask: Tensor | None = None,
                text_mask: Tensor | None = None, return_gate: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """(B, Ti, Di), (B, Tt, Dt) -> (B, d_out), plus the gate g (B, d_out) if return_gate."""
        p_i, p_t = _pool_pair(image_tokens, text_tokens, image_mask, text_mask, self.d_image, self.d_text)
        h_i, h_t = self.image_proj(p_i), self.text_proj(p_t)  # (B, d_out) each
        z = self.gate_proj(torch.cat([h_i, h_t], dim=-1))  # (B, 2 d_out) -> (B, d_out)
        g = torch.sigmoid(z) if self.gate == "sigmoid" else 0.5 * (1.0 + torch.erf(z / 2**0.5))
        fused = g * h_i + (1.0 - g) * h_t
        return (fused, g) if return_gate else fused


def _level_masks(mask: Tensor | list[Tensor | None] | None, n: int, name: str) -> list[Tensor | None]:
    if mask is None or isinstance(mask, Tensor):
        return [mask] * n
    if len(mask) != n:
        raise ValueError(f"{name} has {len(mask)} entries but there are {n} levels")
    return list(mask)


class HierarchicalFusion(nn.Module):
    """Fuse at several encoder levels, then combine the levels.

    Design: level l pairs image_levels[l] (B, Ti_l, Di_l) with text_levels[l] (B, Tt_l, Dt_l) (e.g. a CNN's stage
    maps, finest first, and a text transformer's layer outputs). Each pair goes through its own ConcatFusion
    (level="concat") or GatedFusion (level="gated") to a (B, d_out) vector f_l. The levels are then combined either
    by learned softmax weights, f = sum_l softmax(w)_l f_l (combine="softmax", w starts at 0 = uniform average,
    and softmax(w) shows which level the model relies on), or by a second fusion, f = gelu(W [f_1; ...; f_L] + b)
    (combine="concat"). Masks: None, one (B, T) mask used at every level, or a list with one per level.
    """

    def __init__(self, dims_image: list[int], dims_text: list[int], d_out: int, level: str = "concat",
                 combine: str = "softmax", gate: str = "sigmoid") -> None:
        super().__init__()
        if len(dims_image) != len(dims_text) or not dims_image:
            raise ValueError(f"dims_image has {len(dims_image)} levels and dims_text {len(dims_text)}; "
                             f"they must be equal and non-zero")
        if level not in ("concat", "gated"):
            raise ValueError(f"level must be 'concat' or 'gated', got {level!r}")
        if combine not in ("softmax", "concat"):
            raise ValueError(f"combine must be 'softmax' or 'concat', got {combine!r}")
        self.n_levels = len(dims_image)  # number of encoder levels fused
        self.d_out = d_out  # width of the fused vector
        self.combine = combine  # how the levels are combined
        self.levels = nn.ModuleList(
            ConcatFusion(di, dt, d_out) if level == "concat" else GatedFusion(di, dt, d_out, gate=gate)
            for di, dt in zip(dims_image, dims_text)
        )
        if combine == "softmax":
            self.level_logits = nn.Parameter(torch.zeros(self.n_levels))  # softmax -> per-level weights
        else:
            self.combine_proj = nn.Linear(self.n_levels * d_out, d_out)

    def level_weights(self) -> Tensor:
        """Current softmax weight of each level (combine="softmax")."""
        if self.combine != "softmax":
            raise ValueError("level_weights exist only with combine='softmax'")
        return torch.softmax(self.level_logits, dim=0)

    def forward(self, image_levels: list[Tensor], text_levels: list[Tensor],
                image_mask: Tensor | list[Tensor | None] | None = None,
                text_mask: Tensor | list[Tensor | None] | None = None) -> Tensor:
        """Lists of L token sequences per modality -> (B, d_out)."""
        if len(image_levels) != self.n_levels or len(text_levels) != self.n_levels:
            raise ValueError(f"got {len(image_levels)} image levels and {len(text_levels)} text levels but the "
                             f"fusion was built for {self.n_levels}")
        im_masks = _level_masks(image_mask, self.n_levels, "image_mask")
        tx_masks = _level_masks(text_mask, self.n_levels, "text_mask")
        fused = [fuse(xi, xt, mi, mt)
                 for fuse, xi, xt, mi, mt in zip(self.levels, image_levels, text_levels, im_masks, tx_masks)]
        stacked = torch.stack(fused, dim=1)  # (B, L, d_out)
        if self.combine == "softmax":
            w = torch.softmax(self.level_logits, dim=0).to(stacked.dtype)  # (L,)
            return (stacked * w[None, :, None]).sum(dim=1)  # weights (1, L, 1) -> (B, d_out)
        return F.gelu(self.combine_proj(stacked.flatten(1)))  # (B, L * d_out) -> (B, d_out)


class _CoAttentionLayer(nn.Module):
    """One co-attention layer, pre-norm: x_m = x_m + CoAttn(LN(x_m), LN(x_other)); x_m = x_m + FFN(LN(x_m))."""

    def __init__(self, d_model: int, n_heads: int, ff_hidden: int | None, dropout: float, impl: str) -> None:
        super().__init__()
        self.norm_i, self.norm_t = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.co_attn = CoAttention(d_model, n_heads, dropout=dropout, impl=impl)
        self.ff_norm_i, self.ff_norm_t = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.ff_i = FeedForward(d_model, ff_hidden, dropout=dropout)
        self.ff_t = FeedForward(d_model, ff_hidden, dropout=dropout)

    def forward(self, xi: Tensor, xt: Tensor, mi: Tensor | None, mt: Tensor | None,
                need_weights: bool = False) -> tuple[Tensor, ...]:
        """Returns (xi, xt), plus the weights (B, heads, Ti, Tt) and (B, heads, Tt, Ti) if need_weights."""
        out = self.co_attn(self.norm_i(xi), self.norm_t(xt), mask1=mi, mask2=mt, need_weights=need_weights)
        xi, xt = xi + out[0], xt + out[1]
        xi, xt = xi + self.ff_i(self.ff_norm_i(xi)), xt + self.ff_t(self.ff_norm_t(xt))
        return (xi, xt, *out[2:]) if need_weights else (xi, xt)


class CrossAttentionFusion(nn.Module):
    """Co-attention fusion: image tokens attend to text tokens and text tokens to image tokens.

    Both modalities are projected to d_model; each layer computes O = CoAttention(X_i, X_t) and the seed's
    H = FFN(X + O), written with pre-norm and a residual around the FFN as in a transformer block. The outputs
    are layer-normed, masked-mean pooled and concatenated: d_out = 2 * d_model.
    """

    def __init__(self, d_image: int, d_text: int, d_model: int, n_heads: int, layers: int = 1,
                 ff_hidden: int | None = None, dropout: float = 0.0, impl: str = "scratch") -> None:
        super().__init__()
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        self.d_image = d_image  # width of the image tokens
        self.d_text = d_text  # width of the text tokens
        self.d_out = 2 * d_model  # [pooled image; pooled text]
        self.image_proj = nn.Linear(d_image, d_model)
        self.text_proj = nn.Linear(d_text, d_model)
        self.layers = nn.ModuleList(_CoAttentionLayer(d_model, n_heads, ff_hidden, dropout, impl)
                                    for _ in range(layers))
        self.norm_i, self.norm_t = nn.LayerNorm(d_model), nn.LayerNorm(d_model)

    def forward(self, image_tokens: Tensor, text_tokens: Tensor, image_mask: Tensor | None = None,
                text_mask: Tensor | None = None, return_weights: bool = False
                ) -> Tensor | tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """(B, Ti, Di), (B, Tt, Dt) -> (B, 2 d_model).

        With return_weights=True also returns, per layer, the attention weights image->text (B, heads, Ti, Tt)
        and text->image (B, heads, Tt, Ti): row t of the second says which image regions word t looks at.
        """
        _check_pair(image_tokens, text_tokens, image_mask, text_mask, self.d_image, self.d_text)
        xi, xt = self.image_proj(image_tokens), self.text_proj(text_tokens)  # (B, Ti, d_model), (B, Tt, d_model)
        weights = []
        for layer in self.layers:
            xi, xt, *w = layer(xi, xt, image_mask, text_mask, need_weights=return_weights)
            if return_weights:
                weights.append((w[0], w[1]))
        pooled = [masked_mean(self.norm_i(xi), image_mask), masked_mean(self.norm_t(xt), text_mask)]
        fused = torch.cat(pooled, dim=-1)  # (B, 2 d_model)
        return (fused, weights) if return_weights else fused


FUSIONS = {
    "concat": ConcatFusion,
    "gated": GatedFusion,
    "hierarchical": HierarchicalFusion,
    "cross_attention": CrossAttentionFusion,
}


def make_fusion(name: str, **kwargs: Any) -> nn.Module:
    """Build a fusion module by name ("concat", "gated", "hierarchical", "cross_attention") with its kwargs."""
    if name not in FUSIONS:
        raise ValueError(f"unknown fusion {name!r}; valid names are {sorted(FUSIONS)}")
    return FUSIONS[name](**kwargs)
