"""Figure helpers the chapters share: image grids, attention overlays, heatmaps, curves, and the boxes and arrows
of the chapters' diagrams."""

from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np


def _to_hwc(image) -> np.ndarray:
    """Accept (H,W,3) uint8/float or (3,H,W) tensors/arrays; return float (H,W,3) in [0,1]."""
    arr = image.detach().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
    if arr.ndim != 3:
        raise ValueError(f"an image must have 3 dims (H,W,3) or (3,H,W), got shape {arr.shape}")
    if arr.shape[0] == 3 and arr.shape[-1] != 3:
        arr = arr.transpose(1, 2, 0)  # (H, W, 3)
    arr = arr.astype(np.float32)
    return arr / 255.0 if arr.max() > 1.0 else arr


def image_grid(images, titles: Sequence[str] | None = None, ncols: int = 8, size: float = 1.6,
               fontsize: int = 6, wrap: int = 28):
    """Show images in a grid, each with an optional (wrapped) title; returns the figure."""
    import textwrap

    n = len(images)
    if titles is not None and len(titles) != n:
        raise ValueError(f"got {n} images but {len(titles)} titles")
    ncols = min(ncols, n)
    nrows = (n + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows * (1.25 if titles else 1)),
                             squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(_to_hwc(images[i]), interpolation="nearest")
            if titles is not None:
                lines = [w for line in titles[i].split("\n") for w in (textwrap.wrap(line, wrap) or [""])]
                ax.set_title("\n".join(lines), fontsize=fontsize)
    fig.tight_layout()
    return fig


def attention_overlay(ax, image, weights, grid: tuple[int, int] | None = None, title: str | None = None,
                      alpha: float = 0.55, cmap: str = "magma") -> None:
    """Draw `image` with attention `weights` over its regions (weights: (h*w,) or (h, w))."""
    w = weights.detach().cpu().numpy() if hasattr(weights, "detach") else np.asarray(weights, dtype=float)
    if w.ndim == 1:
        side = int(round(np.sqrt(w.size))) if grid is None else None
        h, wd = grid if grid is not None else (side, side)
        if h * wd != w.size:
            raise ValueError(f"{w.size} attention weights do not fill a {h}x{wd} grid")
        w = w.reshape(h, wd)  # (h, w) region grid
    img = _to_hwc(image)
    ax.imshow(img, interpolation="nearest")
    ax.imshow(w, cmap=cmap, alpha=alpha, interpolation="nearest",
              extent=(-0.5, img.shape[1] - 0.5, img.shape[0] - 0.5, -0.5))
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=7)


def heatmap(ax, matrix, row_labels: Sequence[str] | None = None, col_labels: Sequence[str] | None = None,
            title: str | None = None, cmap: str = "viridis", annotate: bool = False, fmt: str = "{:.2f}"):
    """A labelled matrix plot (attention weights, similarity matrices, confusion matrices)."""
    m = matrix.detach().cpu().numpy() if hasattr(matrix, "detach") else np.asarray(matrix, dtype=float)
    if m.ndim != 2:
        raise ValueError(f"heatmap needs a 2-D matrix, got shape {m.shape}")
    im = ax.imshow(m, cmap=cmap, aspect="auto")
    if row_labels is not None:
        ax.set_yticks(range(len(row_labels)), row_labels, fontsize=7)
    if col_labels is not None:
        ax.set_xticks(range(len(col_labels)), col_labels, fontsize=7, rotation=60, ha="right")
    if annotate:
        middle = (np.nanmin(m) + np.nanmax(m)) / 2
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):  # dark text on light cells, light text on dark ones
                color = "black" if m[i, j] > middle else "white"
                ax.text(j, i, fmt.format(m[i, j]), ha="center", va="center", fontsize=6, color=color)
    if title:
        ax.set_title(title, fontsize=9)
    return im


def curves(ax, series: dict[str, Sequence[float]], xlabel: str = "step", ylabel: str = "loss",
           title: str | None = None, logy: bool = False) -> None:
    """Plot named curves (training losses, accuracies) on one axis."""
    for name, ys in series.items():
        ax.plot(range(1, len(ys) + 1), ys, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    if title:
        ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)


def box(ax, center: tuple[float, float], text: str = "", w: float = 2.0, h: float = 0.7, color: str = "#e8eef7",
        edgecolor: str = "0.3", lw: float = 0.8, fontsize: float = 7):
    """A rounded box of width w and height h (data units) centred at `center`, with centred text; returns the patch."""
    from matplotlib.patches import FancyBboxPatch

    if not (w > 0 and h > 0):
        raise ValueError(f"a box needs a positive width and height, got w={w}, h={h}")
    patch = ax.add_patch(FancyBboxPatch((center[0] - w / 2, center[1] - h / 2), w, h, boxstyle="round,pad=0.05",
                                        fc=color, ec=edgecolor, lw=lw))
    if text:
        ax.text(*center, text, ha="center", va="center", fontsize=fontsize)
    return patch


def arrow(ax, start: tuple[float, float], end: tuple[float, float], color: str = "0.3", lw: float = 0.8):
    """An arrow from `start` to `end` (data units); returns the patch."""
    from matplotlib.patches import FancyArrowPatch

    if tuple(start) == tuple(end):
        raise ValueError(f"an arrow needs two different points, got {start} twice")
    return ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=8, lw=lw, color=color))


_NOT_CURVES = ("step", "split", "lr", "samples_per_s", "seconds")  # fields of a log line that are not losses


def plot_learning_curves(log, keys: Sequence[str] | None = None, ax=None, logy: bool = False):
    """Learning curves from fit's JSONL log (mmlite.train.runlog): a path or its list of records; returns the figure.

    One line per loss term of the step lines ("loss", "itc", ...) against the step, and each validation
    metric (lines with "split": "val") as markers labelled "val <metric>". keys picks the terms and metrics
    drawn (default: all of them, terms first); each must occur in some record.
    """
    if isinstance(log, str) or hasattr(log, "__fspath__"):
        from mmlite.train.runlog import read_jsonl

        log = read_jsonl(log)
    records = list(log)
    if not records:
        raise ValueError("plot_learning_curves got no records (an empty log)")
    bad = [r for r in records if not isinstance(r, dict) or "step" not in r]
    if bad:
        raise TypeError(f"plot_learning_curves needs records that are dicts with a 'step', got {bad[0]!r}")
    train = [r for r in records if "split" not in r]
    val = [r for r in records if r.get("split") == "val"]
    terms = list(dict.fromkeys(k for r in train for k in r if k not in _NOT_CURVES))
    metrics = list(dict.fromkeys(k for r in val for k in r if k not in _NOT_CURVES))
    if keys is None:
        keys = terms + [k for k in metrics if k not in terms]
    unknown = [k for k in keys if k not in terms and k not in metrics]
    if unknown:
        raise ValueError(f"keys {unknown} are in no record of the log (terms {terms}, validation metrics {metrics})")
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 3))
    for key in (k for k in keys if k in terms):
        points = [(r["step"], r[key]) for r in train if key in r]
        ax.plot([s for s, _ in points], [v for _, v in points], label=key, lw=1)
    for key in (k for k in keys if k in metrics):
        points = [(r["step"], r[key]) for r in val if key in r]
        ax.plot([s for s, _ in points], [v for _, v in points], "o", ms=4, label=f"val {key}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss / metric")
    if logy:
        ax.set_yscale("log")
    ax.legend(fontsize=7)
    return ax.figure
