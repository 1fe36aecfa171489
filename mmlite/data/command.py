"""`python -m mmlite data`: generate a world, its statistics and a sample grid (introduced in chapter 1)."""

from __future__ import annotations

import argparse
import io
import json
import textwrap
import time

import numpy as np

from mmlite.utils import check_output_path
from mmlite.data.cache import save_world, world_folder
from mmlite.data.config import PRESETS
from mmlite.data.dataset import vocabulary
from mmlite.data.questions import ANSWERS
from mmlite.data.splits import SPLITS, Split, generate
from mmlite.data.stats import describe


def sample_grid_png(split: Split, n: int = 16, columns: int = 4) -> bytes:
    """PNG bytes of the first n images of a split, each titled with its first caption (deterministic)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = min(n, len(split))
    rows = max(1, -(-n // columns))
    fig = Figure(figsize=(2.0 * columns, 2.5 * rows))
    FigureCanvasAgg(fig)
    for i in range(n):
        ax = fig.add_subplot(rows, columns, i + 1)
        ax.imshow(split.images[i], interpolation="nearest")
        ax.set_title("\n".join(textwrap.wrap(split.captions[i][0], 32)), fontsize=6)
        ax.axis("off")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    return buf.getvalue()


def run(args: argparse.Namespace) -> int:
    """Generate the preset's splits into args.out, with stats.json and samples.png; print a summary."""
    if args.preset not in PRESETS:
        raise ValueError(f"--preset must be one of {', '.join(PRESETS)}, got {args.preset!r}")
    if not isinstance(args.seed, int) or args.seed < 0:
        raise ValueError(f"--seed must be a non-negative integer, got {args.seed!r}")
    try:
        config = PRESETS[args.preset] if args.image_size is None else \
            PRESETS[args.preset].replace(image_size=args.image_size)
    except (TypeError, ValueError) as err:
        raise ValueError(f"--image-size: {err}") from None
    # by default the world goes where load() looks for it ($MMLITE_DATA, else the repository), whatever the cwd
    out = args.out if args.out is not None else world_folder(args.preset, args.seed, args.image_size)
    out = check_output_path(out, "--out", folder=True)  # before generating anything
    if out.is_dir() and any(out.iterdir()) and not (out / "meta.json").is_file():
        raise ValueError(f"--out {out} is a folder that holds other files; choose an empty or new folder")

    start = time.perf_counter()
    world = generate(config, args.seed)
    seconds = time.perf_counter() - start
    n_images = sum(len(world[s]) for s in SPLITS)
    stats = {name: describe(world[name]) for name in SPLITS}
    extra = {"stats.json": json.dumps(stats, sort_keys=True, indent=1).encode() + b"\n",
             "samples.png": sample_grid_png(world["train"])}
    try:
        save_world(world, config, args.seed, out, extra=extra)
    except OSError as err:
        raise ValueError(f"--out {out}: could not write the world: {err}") from None
    total = time.perf_counter() - start

    sizes = ", ".join(f"{name} {len(world[name])}" for name in SPLITS)
    print(f"shapes world '{args.preset}' seed {args.seed}, {config.image_size}x{config.image_size} images: {sizes}")
    print(f"vocabulary {len(vocabulary())} words, {len(ANSWERS)} answers, "
          f"yes share {np.mean([stats[s]['yes_fraction'] for s in SPLITS]):.3f}")
    print(f"generated {n_images} images in {seconds:.1f} s ({n_images / max(seconds, 1e-9):.0f} images/s), "
          f"written in {total:.1f} s")
    print(f"wrote {out}/ (meta.json, stats.json, samples.png, {', '.join(SPLITS)})")
    return 0
