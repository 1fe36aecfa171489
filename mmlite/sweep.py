"""The matching recipe of chapters 3 and 4, and the seed sweep behind their comparisons (`python -m mmlite sweep`).

One configuration serves both chapters: the chapter-3 fusion comparison and the chapter-4 ablation train
`MatchingModel(cnn, gru, fusion)` with `matching_fit_config(steps)`, 64 images a step and half of the false
captions hard negatives. A single run of it is one draw: its accuracy moves by a few points with the seed and
with the machine (another CPU rounds the sums differently). So the comparisons the chapters draw are read from a
sweep over seeds, stored as data (`data/sweeps/matching.json`) by

    python -m mmlite sweep --out data/sweeps/matching.json

and loaded by the chapters, which therefore print the same table on every machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from mmlite.data import Split, build_tokenizer, load
from mmlite.evaluate import evaluate_matching
from mmlite.models import MatchingConfig, MatchingModel
from mmlite.recipes import train_matching
from mmlite.text import Tokenizer
from mmlite.train import FitConfig, History

# name -> MatchingConfig fields; "concat_mlp" is concatenation with a classifier widened to cross-attention's size
# (fusion + classifier: 117,122 parameters against 116,930), the capacity-matched baseline of chapter 4
VARIANTS: dict[str, dict[str, object]] = {
    "concat": {"fusion": "concat"},
    "gated": {"fusion": "gated"},
    "hierarchical": {"fusion": "hierarchical"},
    "cross_attention": {"fusion": "cross_attention"},
    "concat_mlp": {"fusion": "concat", "hidden": 768},
}
# the sweep behind the chapters: every variant at 300 steps (chapter 3), the ablation also at 600 (chapter 4)
DEFAULT_PLAN: tuple[tuple[str, int], ...] = tuple((v, 300) for v in VARIANTS) + tuple(
    (v, 600) for v in ("cross_attention", "concat", "concat_mlp"))
DEFAULT_SEEDS = (0, 1, 2)
BATCH_SIZE = 64  # images a step (128 pairs)
HARD_FRACTION = 0.5  # share of the false captions that are the image's own hard negative


def matching_fit_config(steps: int, log_every: int = 0) -> FitConfig:
    """The recipe's optimiser settings: AdamW at 2e-3, warm-up over a tenth of the steps (at most 50), cosine."""
    return FitConfig(steps=steps, lr=2e-3, warmup=min(50, steps // 10), log_every=log_every)


def build_matching(variant: str, vocab_size: int, seed: int, device: torch.device | str = "cpu") -> MatchingModel:
    """MatchingModel(cnn, gru, variant's fusion) with initial weights from `seed` (the same encoders for every variant)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {variant!r}")
    torch.manual_seed(seed)
    return MatchingModel(MatchingConfig(vocab_size=vocab_size, image_encoder="cnn", text_encoder="gru",
                                        **VARIANTS[variant])).to(device)


def train_recipe(variant: str, split: Split, tokenizer: Tokenizer, steps: int, seed: int, log_every: int = 0,
                 device: torch.device | str = "cpu") -> tuple[MatchingModel, History]:
    """Build and train one model of the recipe on `split`; returns (model, History)."""
    model = build_matching(variant, len(tokenizer), seed, device)
    history = train_matching(model, split, tokenizer, matching_fit_config(steps, log_every), batch_size=BATCH_SIZE,
                             hard_fraction=HARD_FRACTION, seed=seed)
    return model, history


def _one_run(job: tuple[str, int, int, int]) -> dict[str, object]:
    """Train and evaluate one (variant, steps, seed) with `threads` threads; returns its record."""
    variant, steps, seed, threads = job
    torch.set_num_threads(threads)
    world, tokenizer = load("tiny", seed=0), build_tokenizer()
    model, history = train_recipe(variant, world["train"], tokenizer, steps, seed)
    record: dict[str, object] = {"variant": variant, "steps": steps, "seed": seed,
                                 "seconds": round(history.seconds, 1),
                                 "final_loss": round(sum(history.losses[-50:]) / 50, 4)}
    for split in ("test", "comp"):
        result = evaluate_matching(model, world[split], tokenizer)
        record[split] = {k: round(v, 4) for k, v in result.items() if k != "n_images"}
    return record


def run_sweep(plan: tuple[tuple[str, int], ...] = DEFAULT_PLAN, seeds: tuple[int, ...] = DEFAULT_SEEDS,
              workers: int = 2, threads: int = 1) -> dict[str, object]:
    """Every (variant, steps) of `plan` with every seed, `workers` runs at a time; the JSON-ready record."""
    for variant, steps in plan:
        if variant not in VARIANTS or steps < 1:
            raise ValueError(f"bad plan entry ({variant!r}, {steps}): variants are {sorted(VARIANTS)}, steps >= 1")
    jobs = [(v, s, seed, threads) for v, s in plan for seed in seeds]
    start = time.perf_counter()
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            runs = list(pool.map(_one_run, jobs))
    else:
        runs = [_one_run(job) for job in jobs]
    return {"recipe": {"data": "tiny, seed 0", "batch_size": BATCH_SIZE, "hard_fraction": HARD_FRACTION,
                       "optimizer": "AdamW lr 2e-3, warm-up min(50, steps // 10), cosine to 0.05, clip 1.0",
                       "variants": VARIANTS},
            "machine": {"torch": torch.__version__, "cpu": torch.backends.cpu.get_cpu_capability(),
                        "threads_per_run": threads, "processor": platform.processor() or platform.machine()},
            "minutes": round((time.perf_counter() - start) / 60, 1),
            "runs": runs}


def load_sweep(path: str | Path | None = None) -> dict[str, object]:
    """Read a stored sweep (default: the repository's data/sweeps/matching.json)."""
    path = Path(path) if path is not None else Path(__file__).resolve().parents[1] / "data" / "sweeps" / "matching.json"
    if not path.is_file():
        raise ValueError(f"no sweep at {path}: make it with `python -m mmlite sweep --out {path}`")
    return json.loads(path.read_text())


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists() and out.is_dir():
        raise ValueError(f"--out {out} is a folder; give a .json file path")
    out.parent.mkdir(parents=True, exist_ok=True)
    plan = DEFAULT_PLAN if not args.variants else tuple((v, s) for v in args.variants for s in args.steps)
    record = run_sweep(plan, tuple(args.seeds), workers=args.workers)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, out)
    print(f"{len(record['runs'])} runs in {record['minutes']} min -> {out}")
    return 0
