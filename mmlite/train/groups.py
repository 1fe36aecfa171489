"""Optimizer parameter groups: which parameters get weight decay, and per-prefix learning rates (chapter 3)."""

from __future__ import annotations

from torch import Tensor, nn


def uses_weight_decay(name: str, param: Tensor, owner: nn.Module) -> bool:
    """Decay only weight matrices and kernels: names starting with 'weight', ndim >= 2, not nn.Embedding.

    So biases, norm gains/shifts (1-D), nn.Embedding tables, learned positional embeddings, class
    tokens, prompt contexts and the logit scale (not named 'weight...') are never decayed.
    """
    return name.rsplit(".", 1)[-1].startswith("weight") and param.ndim >= 2 and not isinstance(owner, nn.Embedding)


def _matches(name: str, prefix: str) -> bool:
    """Prefix match on whole dotted components: 'image' matches 'image.x' and 'image', not 'images.x'."""
    return name == prefix or name.startswith(prefix.rstrip(".") + ".")


def param_groups(
    model: nn.Module, lr: float, weight_decay: float, lr_overrides: dict[str, float] | None = None
) -> list[dict]:
    """Optimizer groups over the trainable parameters, each parameter in exactly one group.

    Weight decay follows `uses_weight_decay`; lr_overrides maps a parameter-name prefix (e.g.
    "image_encoder") to its own learning rate, the longest matching prefix winning. Every prefix
    must match at least one trainable parameter. Each group also carries its parameter "names". A parameter
    shared by two modules (an LM head tied to its token embedding) is grouped once, by its first owner in
    module order (the embedding, so it is not decayed).
    """
    overrides = dict(lr_overrides or {})
    used: set[str] = set()
    seen: set[int] = set()
    groups: dict[tuple[float, bool], dict] = {}
    for module_name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            full = f"{module_name}.{pname}" if module_name else pname
            hits = [pre for pre in overrides if _matches(full, pre)]
            group_lr = lr
            if hits:
                best = max(hits, key=len)
                used.add(best)
                group_lr = overrides[best]
            decay = uses_weight_decay(pname, p, module)
            key = (group_lr, decay)
            if key not in groups:
                groups[key] = {"params": [], "names": [], "lr": group_lr,
                               "weight_decay": weight_decay if decay else 0.0}
            groups[key]["params"].append(p)
            groups[key]["names"].append(full)
    unused = sorted(set(overrides) - used)
    if unused:
        raise ValueError(f"lr_overrides prefixes {unused} match no trainable parameter of the model")
    return list(groups.values())
