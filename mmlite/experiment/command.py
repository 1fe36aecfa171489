"""`python -m mmlite train`: every argument checked before any work, then mmlite.experiment.run.train_job (chapter 5)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from mmlite.experiment.config import PRESET_NOTES, PRESETS, resolve
from mmlite.utils import check_output_path, get_device

DEVICES = ("auto", "cpu", "cuda", "mps")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="tiny", help=f"named configuration: {', '.join(PRESETS)} (default: tiny)")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda or mps")
    p.add_argument("--out", default=None, help="run folder (default: runs/<preset>)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt (same config)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one field, e.g. --set fit.steps=300 --set model.d_model=96 (repeatable)")
    p.add_argument("--data", default=None, help="train on image-caption pairs from this CSV (open_clip's layout)")
    p.add_argument("--val-data", default=None, help="with --data: the validation CSV that metrics.json scores")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--ship", action="store_true",
                   help="keep only what inference needs: delete the resumable checkpoint.pt after the run "
                        "(model.pt, config, metrics, log, curves and report stay): how data/models/ is made")


def _device(name: str):
    if name not in DEVICES:
        raise ValueError(f"--device must be one of {DEVICES}, got {name!r}")
    return get_device(None if name == "auto" else name)


def run(args: argparse.Namespace) -> int:
    if args.preset not in PRESETS:
        raise ValueError(f"unknown preset {args.preset!r}; presets are {', '.join(PRESETS)}")
    job = resolve(args.preset, args.sets)  # every --set key and value checked here
    device = _device(args.device)
    if job.fit.precision == "fp16" and device.type != "cuda":
        raise ValueError(f"fit.precision=fp16 needs CUDA (autocast to float16 with a GradScaler); this run is on "
                         f"{device.type}: use bf16 or fp32")
    if job.fit.precision == "bf16" and device.type not in ("cpu", "cuda"):
        raise ValueError(f"fit.precision=bf16 runs on cpu or cuda, not {device.type}")
    out = check_output_path(args.out or f"runs/{args.preset}", "--out", folder=True)
    if args.resume and not (out / "checkpoint.pt").is_file():
        raise ValueError(f"--resume: no checkpoint at {out / 'checkpoint.pt'}")
    if args.val_data and not args.data:
        raise ValueError("--val-data needs --data (the training CSV)")
    world = tokenizer = None
    if args.data:
        from mmlite.data.disk import load_pairs, tokenizer_from_captions

        if not args.val_data:
            raise ValueError("--data needs --val-data: metrics.json scores the validation pairs")
        kw = dict(image_column=job.job.image_column, caption_column=job.job.caption_column)
        world = {"train": load_pairs(Path(args.data), job.data.image_size, name="train", **kw),
                 "val": load_pairs(Path(args.val_data), job.data.image_size, name="val", **kw)}
        tokenizer = tokenizer_from_captions(c for caps in world["train"].captions for c in caps)
        import dataclasses
        job = dataclasses.replace(job, job=dataclasses.replace(job.job, eval_splits=("val",)))
    if os.environ.get("RANK", "0") == "0":
        changed = f", with {len(args.sets)} --set" if args.sets else ""
        source = f"pairs from {args.data}" if args.data else PRESET_NOTES[args.preset]
        print(f"train: preset {args.preset}{changed} ({source}) on {device or 'one device per process'}, into {out}")
    from mmlite.experiment.run import train_job

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and args.device == "auto":
        device = None  # under torchrun each process takes its own GPU (cuda:LOCAL_RANK), or the CPU

    train_job(job, out, device, resume=args.resume, progress=not args.no_progress, world=world, tokenizer=tokenizer)
    if args.ship:
        (out / "checkpoint.pt").unlink(missing_ok=True)
    return 0
