"""Adaptation: freezing, linear probes, prompt templates, soft prompts (derived in chapter 2)."""

from __future__ import annotations

from typing import Callable, Protocol

import torch
from torch import Tensor, nn

from mmlite.alignment import l2_normalize
from mmlite.checks import check_tensors
from mmlite.encoders.output import EncoderOutput
from mmlite.objectives import cross_entropy


# --------------------------------------------------------------------------- freezing
def freeze(module: nn.Module) -> nn.Module:
    """Stop gradients for every parameter of `module`; returns it.

    This does not touch train/eval mode: call module.eval() as well to stop BatchNorm statistics
    and dropout in a frozen encoder.
    """
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def unfreeze(module: nn.Module) -> nn.Module:
    """Let every parameter of `module` receive gradients again; returns it."""
    for p in module.parameters():
        p.requires_grad_(True)
    return module


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The parameters with requires_grad=True, in module order."""
    return [p for p in module.parameters() if p.requires_grad]


# --------------------------------------------------------------------------- linear probe
class LinearProbe(nn.Module):
    """A linear classifier on frozen features: (N, d_in) -> logits (N, n_classes)."""

    def __init__(self, d_in: int, n_classes: int) -> None:
        super().__init__()
        if d_in < 1 or n_classes < 2:
            raise ValueError(f"d_in must be >= 1 and n_classes >= 2, got {d_in} and {n_classes}")
        self.d_in = d_in
        self.linear = nn.Linear(d_in, n_classes)

    def forward(self, features: Tensor) -> Tensor:
        """(N, d_in) -> (N, n_classes)."""
        check_tensors(features=features)
        if features.dim() != 2 or features.shape[1] != self.d_in:
            raise ValueError(f"features shape {tuple(features.shape)} should be (N, d_in={self.d_in})")
        return self.linear(features)


def fit_linear_probe(
    features: Tensor, labels: Tensor, epochs: int = 200, lr: float = 0.05, weight_decay: float = 0.0,
    n_classes: int | None = None,
) -> tuple[LinearProbe, list[float]]:
    """Fit a probe on detached features with full-batch Adam (deterministic, no data order).

    Minimises CE(W f + b, y) + (weight_decay / 2) ||W||^2 (the bias is not penalised).
    Returns the probe and the loss after every epoch. The features are detached, so whatever produced
    them gets no gradient.
    """
    check_tensors(features=features, labels=labels)
    if features.dim() != 2 or labels.shape != features.shape[:1]:
        raise ValueError(
            f"features must be (N, D) and labels (N,), got {tuple(features.shape)} and {tuple(labels.shape)}"
        )
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if features.shape[0] == 0:
        raise ValueError(f"fit_linear_probe needs at least one example, got features of shape {tuple(features.shape)}")
    if labels.dtype != torch.long:
        raise TypeError(f"labels must be a long tensor of class indices, got dtype {labels.dtype}")
    features = features.detach()
    n_classes = n_classes if n_classes is not None else int(labels.max()) + 1
    probe = LinearProbe(features.shape[1], n_classes).to(features.device, features.dtype)
    opt = torch.optim.Adam(probe.parameters(), lr=lr)
    losses = []
    for _ in range(epochs):
        opt.zero_grad()
        loss = cross_entropy(probe(features), labels) + 0.5 * weight_decay * probe.linear.weight.pow(2).sum()
        loss.backward()
        opt.step()
        losses.append(loss.detach().item())
    return probe, losses


# --------------------------------------------------------------------------- zero-shot with templates
def _check_templates(templates: list[str]) -> None:
    """Each template must contain exactly one "{}" for the class name."""
    if not templates:
        raise ValueError("templates is empty: give at least one, e.g. 'a photo of a {}'")
    for t in templates:
        if not isinstance(t, str) or t.count("{}") != 1:
            raise ValueError(f"template {t!r} must contain exactly one '{{}}' for the class name")


def zero_shot_weights(
    encode_text: Callable[[list[str]], Tensor], classnames: list[str], templates: list[str]
) -> Tensor:
    """Class embeddings by template ensembling (CLIP): w_c = normalize(mean_t normalize(enc(t(c)))).

    encode_text maps N strings to (N, D) features. Returns (C, D) unit vectors. Gradients flow if
    encode_text allows them; wrap the call in torch.no_grad() for a frozen model.
    """
    _check_templates(templates)
    if not classnames:
        raise ValueError("classnames is empty")
    weights = []
    for name in classnames:
        texts = [t.replace("{}", name) for t in templates]
        emb = encode_text(texts)
        if not isinstance(emb, Tensor) or emb.dim() != 2 or emb.shape[0] != len(texts):
            shape = tuple(emb.shape) if isinstance(emb, Tensor) else type(emb).__name__
            raise ValueError(f"encode_text returned {shape} for {len(texts)} texts; expected ({len(texts)}, D)")
        weights.append(l2_normalize(l2_normalize(emb).mean(dim=0)))  # (D,)
    return torch.stack(weights)  # (C, D)


def zero_shot_classify(image_feats: Tensor, class_weights: Tensor, logit_scale: float | Tensor = 100.0) -> Tensor:
    """logits = scale * normalize(image_feats) normalize(class_weights)^T: (N, D), (C, D) -> (N, C)."""
    check_tensors(image_feats=image_feats, class_weights=class_weights)
    if image_feats.dim() != 2 or class_weights.dim() != 2 or image_feats.shape[1] != class_weights.shape[1]:
        raise ValueError(
            f"image_feats {tuple(image_feats.shape)} and class_weights {tuple(class_weights.shape)} "
            f"must be (N, D) and (C, D) with the same D"
        )
    return logit_scale * l2_normalize(image_feats) @ l2_normalize(class_weights).T


# --------------------------------------------------------------------------- soft prompts (CoOp)
class SoftPrompt(nn.Module):
    """CoOp's learned context: n_ctx vectors inserted before the class-name token embeddings.

    insert_at=0 prepends them; insert_at=1 keeps a leading [BOS] first, as CoOp does with [SOS].
    """

    def __init__(self, n_ctx: int, d_model: int, init_std: float = 0.02, insert_at: int = 0,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if n_ctx < 1 or d_model < 1 or insert_at < 0:
            raise ValueError(f"n_ctx and d_model must be >= 1 and insert_at >= 0, got {n_ctx}, {d_model}, {insert_at}")
        self.d_model = d_model
        self.insert_at = insert_at
        self.ctx = nn.Parameter(torch.randn(n_ctx, d_model, generator=generator) * init_std)  # (n_ctx, D)

    def forward(self, token_embeddings: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(C, T, D), (C, T) bool -> (C, n_ctx + T, D) and the matching mask (context positions True)."""
        check_tensors(token_embeddings=token_embeddings, **({} if mask is None else {"mask": mask}))
        if token_embeddings.dim() != 3 or token_embeddings.shape[2] != self.d_model:
            raise ValueError(
                f"token_embeddings shape {tuple(token_embeddings.shape)} should be (C, T, d_model={self.d_model})"
            )
        c, t, _ = token_embeddings.shape
        if self.insert_at > t:
            raise ValueError(f"insert_at={self.insert_at} is beyond the sequence length T={t}")
        if mask is None:
            mask = torch.ones(c, t, dtype=torch.bool, device=token_embeddings.device)
        elif mask.dtype != torch.bool or mask.shape != (c, t):
            raise ValueError(f"mask must be a bool (C, T) = {(c, t)} tensor, got {mask.dtype} {tuple(mask.shape)}")
        ctx = self.ctx.to(token_embeddings.dtype).unsqueeze(0).expand(c, -1, -1)  # (C, n_ctx, D)
        k = self.insert_at
        x = torch.cat([token_embeddings[:, :k], ctx, token_embeddings[:, k:]], dim=1)  # (C, n_ctx + T, D)
        ctx_mask = mask.new_ones(c, ctx.shape[1])  # (C, n_ctx)
        return x, torch.cat([mask[:, :k], ctx_mask, mask[:, k:]], dim=1)  # (C, n_ctx + T)


class EmbeddingTextEncoder(Protocol):
    """A text encoder that can run from token embeddings (the mmlite text encoders can)."""

    def embed(self, ids: Tensor) -> Tensor: ...  # (C, T) -> (C, T, D)

    def encode_embeddings(self, x: Tensor, mask: Tensor) -> EncoderOutput: ...


def prompted_class_embeddings(
    prompt: SoftPrompt, text_encoder: EmbeddingTextEncoder, class_ids: Tensor, class_mask: Tensor,
    projection: nn.Module | None = None,
) -> Tensor:
    """Unit class embeddings (C, D') from [context] + class-name tokens through a (frozen) text encoder."""
    x, mask = prompt(text_encoder.embed(class_ids), class_mask)  # (C, n_ctx + T, D)
    pooled = text_encoder.encode_embeddings(x, mask).pooled
    if pooled is None:
        raise ValueError("text_encoder returns no pooled vector (pool='none'); build it with a pooling")
    return l2_normalize(pooled if projection is None else projection(pooled))


def check_gradients_only_reach(trainable: nn.Module, *frozen: nn.Module) -> None:
    """After backward: every parameter of `trainable` has a gradient and no parameter of `frozen` has one.

    Raises RuntimeError naming the offending parameters (a non-zero .grad on a frozen module,
    or requires_grad left on, or a trainable parameter that received no gradient).
    """
    missing = [n for n, p in trainable.named_parameters() if p.grad is None]
    leaked = []
    for i, module in enumerate(frozen):
        for n, p in module.named_parameters():
            if p.requires_grad or (p.grad is not None and bool(p.grad.ne(0).any())):
                leaked.append(f"frozen[{i}].{n}")
    if missing or leaked:
        raise RuntimeError(f"gradient check failed: no gradient for {missing}; gradient allowed or present in {leaked}")
