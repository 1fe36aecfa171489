"""The training job behind `python -m mmlite train`: data, model, trainer, evaluation and the run folder (chapter 5).

    runs/tiny/
        config.json       the resolved TrainJob (preset + every --set)
        checkpoint.pt     model, optimiser, schedule, RNG states and data position (resume with --resume)
        log.jsonl         one line per optimiser step (loss terms, lr, samples/s) and per validation
        metrics.json      per split: every figure with its 95 % bootstrap interval
        curves.png        the learning curves
        report.md         what was trained, how long it took, and the metrics table
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader

from mmlite.data import ANSWERS, DataConfig, EpochSampler, ShapesDataset, Split, build_tokenizer, collate
from mmlite.data.cache import cache_root, read_world, save_world
from mmlite.data.splits import generate
from mmlite.evaluate.albef import evaluate_albef
from mmlite.experiment.config import TrainJob, resolve
from mmlite.models.albef import ALBEF
from mmlite.tasks.albef import TERMS, ALBEFPretraining, add_truth
from mmlite.text import Tokenizer
from mmlite.train import Checkpointing, cycle, fit, load_checkpoint, restore, save_checkpoint, to_device
from mmlite.train.distributed import ShardedEpochSampler, barrier, cleanup, init_distributed, wrap_ddp
from mmlite.utils import seed_everything

# the figures metrics.json holds for a split of the shapes world (a CSV split has the retrieval and caption ones)
HEADLINE = ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5", "t2i_r1_ceiling", "t2i_r5_ceiling", "t2i_r1_itm", "t2i_r5_itm",
            "i2t_r1_first", "t2i_r1_first", "t2i_r5_first", "t2i_r1_first_ceiling", "t2i_r5_first_ceiling",
            "i2t_r1_first_itm", "t2i_r1_first_itm", "t2i_r5_first_itm", "itm_acc", "itm_auc", "vqa_acc", "bleu4",
            "cider", "caption_precision")


def flat_config(job: TrainJob) -> dict[str, Any]:
    """{"fit.lr": 0.002, ...}: the job as flat plain data, so a checkpoint mismatch names the key."""
    out = {}
    for section, values in job.to_dict().items():
        for key, value in values.items():
            out[f"{section}.{key}"] = list(value) if isinstance(value, tuple) else value
    return out


def world_for(config: DataConfig, seed: int) -> dict[str, Split]:
    """The shapes world of a DataConfig, cached under data/cache/job-<hash of the config>-seed<seed>."""
    key = hashlib.sha256(json.dumps(config.__dict__, sort_keys=True).encode()).hexdigest()[:10]
    folder = cache_root() / f"job-{key}-seed{seed}"
    if (folder / "meta.json").is_file():
        try:
            return read_world(folder, config, seed)
        except ValueError:
            pass  # written by another generator version: make it again below
    world = generate(config, seed)
    save_world(world, config, seed, folder)
    return world


def _val_loss(task: torch.nn.Module, batches: list) -> dict[str, float]:
    """Mean of each loss term over fixed validation batches (random draws under a fixed seed, then restored)."""
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    sums: dict[str, float] = {}
    for batch in batches:
        for k, v in task(batch).items():
            sums[k] = sums.get(k, 0.0) + float(v)
    torch.random.set_rng_state(state)
    return {k: v / len(batches) for k, v in sums.items()}


def build(job: TrainJob, world: dict[str, Any], tokenizer: Tokenizer) -> ALBEFPretraining:
    """The model and its objectives for a world: VQA and truth-judged negatives need the shapes world's scenes."""
    objectives = job.objectives
    if not isinstance(world["train"], Split):  # pairs from disk: no scenes and no questions
        objectives = dataclasses.replace(objectives, vqa=0.0, false_negatives="image")
    model = ALBEF(job.model_config(len(tokenizer), len(ANSWERS)))
    return ALBEFPretraining(model, objectives, tokenizer)


def _loader(split: Any, tokenizer: Tokenizer, job: TrainJob, shuffle: bool, sampler: Any = None,
            drop_last: bool = True) -> DataLoader:
    """Batches of a split with their own generator, so a resumed run draws exactly what an uninterrupted one does."""
    seed = job.job.seed
    if isinstance(split, Split):
        dataset = ShapesDataset(split, tokenizer, seed=seed)
    else:
        from mmlite.data.disk import CaptionPairsDataset
        dataset = CaptionPairsDataset(split, tokenizer, seed=seed)
    sampler = sampler or EpochSampler(len(split), shuffle, seed)
    return DataLoader(dataset, batch_size=job.job.batch_size, sampler=sampler, collate_fn=collate, drop_last=drop_last,
                      generator=torch.Generator().manual_seed(seed))


def train_job(job: TrainJob, out: str | Path, device: torch.device | None = None, resume: bool = False,
              progress: bool = True, world: dict[str, Any] | None = None, tokenizer: Tokenizer | None = None,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train job on `world` (default: its shapes world), evaluate, write the run folder; returns metrics.json's dict.

    world: {"train": ..., "val": ...} splits (mmlite.data.Split, or mmlite.data.disk.ImageCaptionSet from CSVs,
    which needs `tokenizer`). resume continues from out/checkpoint.pt, which must hold the same config.
    Under torchrun (WORLD_SIZE > 1) every process trains its shard with DDP, ITC gathers the features of all
    ranks, and rank 0 evaluates and writes the folder.
    """
    out = Path(out)
    info = init_distributed(device=device)
    main = info.rank == 0
    log = log if main else (lambda _: None)
    config = flat_config(job)
    checkpoint = out / "checkpoint.pt"
    state = load_checkpoint(checkpoint, config=config) if resume else None  # refused before anything is written
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(job.to_dict(), indent=2) + "\n")
    seed_everything(job.job.seed)
    start = time.perf_counter()
    if world is None:
        if not main:
            barrier()  # rank 0 generates and caches the world first; the others then read it
        world = world_for(job.data, job.job.data_seed)
        if main:
            barrier()
        tokenizer = build_tokenizer()
    if tokenizer is None:
        raise ValueError("train_job with a world of your own needs its tokenizer")
    log(f"data: {', '.join(f'{k} {len(v)}' for k, v in world.items())} images ({time.perf_counter() - start:.1f} s)")
    task = build(job, world, tokenizer)
    if info.world_size > 1:
        task.objectives = dataclasses.replace(task.objectives, gather=True)
        sampler = ShardedEpochSampler(len(world["train"]), True, job.job.seed, info.rank, info.world_size)
    else:
        sampler = None
    n_params = sum(p.numel() for p in task.model.parameters())
    log(f"model: {n_params / 1e6:.2f} M parameters on {info.device}" +
        (f", {info.world_size} processes" if info.world_size > 1 else ""))
    # under DDP a switched-off term leaves its head without gradients, which DDP must be told to expect
    trained = wrap_ddp(task, info, find_unused_parameters=len(task.objectives.active()) < len(TERMS))
    loader = _loader(world["train"], tokenizer, job, shuffle=True, sampler=sampler)
    truth = task.objectives.false_negatives == "truth" and task.objectives.itm > 0
    margin = job.data.relation_margin
    batches = (add_truth(b, tokenizer, margin) if truth else b for b in cycle(loader))
    if len(world["train"]) // info.world_size < job.job.batch_size:
        raise ValueError(f"{len(world['train'])} training images over {info.world_size} process(es) hold no full "
                         f"batch of job.batch_size={job.job.batch_size}")
    if state is not None:
        loader.sampler.load_state_dict(state["sampler"])
        log(f"resuming from {checkpoint} at step {state['step']}")
    validate = None
    if job.fit.val_every and "val" in world:
        vbatches = []
        for b in _loader(world["val"], tokenizer, job, shuffle=False, drop_last=False):
            if len(vbatches) == job.job.n_val_batches:
                break
            vbatches.append(to_device(add_truth(b, tokenizer, margin) if truth else b, info.device))
        validate = lambda m: _val_loss(m, vbatches)  # noqa: E731
    fit_cfg = dataclasses.replace(job.fit, log_path=str(out / "log.jsonl"), progress=progress and main,
                                  val_every=job.fit.val_every if validate is not None else 0)
    history = fit(trained, batches, lambda m, b: m(b), fit_cfg, after_step=lambda m: m.after_step(),
                  device=info.device, checkpointing=Checkpointing(checkpoint, job.job.checkpoint_every, config,
                                                                  loader.sampler),
                  resume=state, validate=validate)
    train_seconds = time.perf_counter() - start
    log(f"trained {job.fit.steps} steps in {history.seconds:.0f} s "
        f"({job.fit.steps * job.job.batch_size * info.world_size / max(history.seconds, 1e-9):.0f} samples/s)")
    metrics: dict[str, Any] = {"train_seconds": train_seconds, "steps": job.fit.steps, "parameters": n_params,
                               "final_loss": history.losses[-1], "splits": {}}
    if main:
        save_checkpoint(out / "model.pt", task.model, job.fit.steps, config)  # the weights alone, for inference
        for name in job.job.eval_splits:
            if name not in world:
                continue
            t0 = time.perf_counter()
            ev = evaluate_albef(task.model, world[name], tokenizer, k_rerank=job.job.k_rerank,
                                n_bootstrap=job.job.n_bootstrap, beam_size=job.job.beam_size, margin=margin)
            metrics["splits"][name] = ev.metrics
            log(f"evaluated {name} ({len(world[name])} images) in {time.perf_counter() - t0:.0f} s")
        if SLICE_SPLIT in world:  # a figure a test can recompute in seconds from model.pt (see load_run)
            ev = evaluate_albef(task.model, _head(world[SLICE_SPLIT], SLICE_IMAGES), tokenizer,
                                k_rerank=min(job.job.k_rerank, SLICE_IMAGES), n_bootstrap=10, margin=margin)
            metrics["slice"] = {"split": SLICE_SPLIT, "images": SLICE_IMAGES,
                                **{k: v["value"] for k, v in ev.metrics.items()}}
        metrics["total_seconds"] = time.perf_counter() - start
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        write_report(out, job, metrics)
        log(format_metrics(metrics))
    barrier()
    cleanup()
    return metrics


SLICE_SPLIT, SLICE_IMAGES = "test", 200  # the slice whose figures metrics.json keeps for a quick re-check
# the small preset's run shipped with the book (model.pt, config.json, metrics.json, log.jsonl, report.md)
SHIPPED_SMALL = Path(__file__).resolve().parents[2] / "data" / "models" / "small"
SHIP_COMMAND = "python -m mmlite train --preset small --out data/models/small --ship"


def _head(split: Any, n: int) -> Any:
    """The first n images of a split of the shapes world, as a Split."""
    n = min(n, len(split))
    return Split(split.name, split.images[:n], split.objects[:n], split.captions[:n], split.questions[:n],
                 split.negatives[:n], split.negative_sources[:n])


def load_run(folder: str | Path, device: torch.device | str = "cpu") -> tuple[ALBEF, Tokenizer, TrainJob, dict]:
    """A finished run's model (from model.pt, weights_only), tokenizer, job and metrics: for later chapters.

    Runs on the shapes world only (a CSV run's tokenizer comes from its captions).
    """
    folder = Path(folder)
    for name in ("config.json", "model.pt", "metrics.json"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} is not a finished run: no {name}")
    job = TrainJob.from_dict(json.loads((folder / "config.json").read_text()))
    tokenizer = build_tokenizer()
    model = ALBEF(job.model_config(len(tokenizer), len(ANSWERS)))
    restore(load_checkpoint(folder / "model.pt", config=flat_config(job)), model, rng=False)
    return model.to(device).eval(), tokenizer, job, json.loads((folder / "metrics.json").read_text())


def shipped_small(device: torch.device | str = "cpu", log: Callable[[str], None] = print
                  ) -> tuple[ALBEF, Tokenizer, TrainJob, dict]:
    """load_run of the shipped small run; when it is missing, it is trained first (about 30 minutes on 2 cores)."""
    if not (SHIPPED_SMALL / "model.pt").is_file():
        log(f"no shipped model in {SHIPPED_SMALL}: training it now, about 30 minutes on 2 cores ({SHIP_COMMAND})")
        train_job(resolve("small"), SHIPPED_SMALL, torch.device(device), progress=False, log=log)
        (SHIPPED_SMALL / "checkpoint.pt").unlink(missing_ok=True)
    log(f"the shipped small model, data/models/small, made by: {SHIP_COMMAND}")
    return load_run(SHIPPED_SMALL, device)


def format_metrics(metrics: dict[str, Any]) -> str:
    """The final table: one row per figure, one column per split, value [low, high]."""
    splits = list(metrics["splits"])
    keys = [k for k in HEADLINE if any(k in metrics["splits"][s] for s in splits)]
    width = max(len(k) for k in keys) if keys else 8
    lines = [f"{'metric':<{width}}  " + "  ".join(f"{s:<22}" for s in splits)]
    for k in keys:
        cells = []
        for s in splits:
            m = metrics["splits"][s].get(k)
            cells.append(f"{m['value']:.3f} [{m['low']:.3f}, {m['high']:.3f}]" if m else "-")
        lines.append(f"{k:<{width}}  " + "  ".join(f"{c:<22}" for c in cells))
    return "\n".join(lines)


def write_report(out: Path, job: TrainJob, metrics: dict[str, Any]) -> None:
    """curves.png from the JSONL log and report.md with the table."""
    import matplotlib.pyplot as plt

    from mmlite.plot import plot_learning_curves

    fig = plot_learning_curves(out / "log.jsonl")
    fig.savefig(out / "curves.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    minutes = metrics["train_seconds"] / 60
    lines = [f"# Training run: {out.name}", "",
             f"- {job.fit.steps} optimiser steps of {job.job.batch_size} pairs, {minutes:.1f} min of training "
             f"({metrics['total_seconds'] / 60:.1f} min with evaluation)",
             "- objectives: " + ", ".join(f"{t} x{getattr(job.objectives, t)}" for t in job.objectives.active()),
             f"- final training loss {metrics['final_loss']:.3f}; {metrics['parameters'] / 1e6:.2f} M parameters",
             "", "Each figure is value [95 % bootstrap interval over images].", "", "```",
             format_metrics(metrics), "```", "", "![learning curves](curves.png)", ""]
    (out / "report.md").write_text("\n".join(lines))

