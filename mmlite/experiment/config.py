"""The training job's configuration: named presets, and `--set section.key=value` checked against the fields (chapter 5).

A job is five sections, each a dataclass with a comment per field:
    data        the shapes world it trains on (mmlite.data.DataConfig), or image-caption CSVs from disk
    model       the ALBEF/BLIP-style model (mmlite.models.ALBEFConfig, less what the data decides)
    objectives  the loss weights (mmlite.tasks.ALBEFObjectives)
    fit         the optimiser and schedule (mmlite.train.FitConfig)
    job         batch size, seeds, evaluation settings (JobSettings below)
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from mmlite.data import DataConfig
from mmlite.models.albef import ALBEFConfig
from mmlite.tasks.albef import ALBEFObjectives
from mmlite.train import FitConfig

# fields of ALBEFConfig that the data decides, never set by hand
_DERIVED_MODEL_FIELDS = ("vocab_size", "n_answers", "pad_id", "image_size")


@dataclass
class ModelSettings:
    """ALBEFConfig without the fields the data decides (vocab_size, n_answers, pad_id, image_size)."""

    image_encoder: str = "cnn"  # "cnn" or "vit"
    cnn_width: int = 32  # channels of the CNN's first stage
    cnn_depth: int = 3  # stride-2 stages of the CNN
    cnn_norm: str = "batch"  # "batch", "group" or "none"
    patch_size: int = 8  # ViT patch side
    vit_depth: int = 4  # ViT blocks
    d_model: int = 64  # token width everywhere
    n_heads: int = 4  # attention heads
    text_depth: int = 2  # text encoder blocks
    fusion_depth: int = 2  # fusion encoder blocks
    decoder_depth: int = 2  # caption decoder blocks
    d_embed: int = 64  # width of ITC's shared space
    max_len: int = 32  # longest token sequence
    dropout: float = 0.0  # dropout in the transformer blocks

    def build(self, vocab_size: int, n_answers: int, image_size: int, pad_id: int = 0) -> ALBEFConfig:
        return ALBEFConfig(vocab_size=vocab_size, n_answers=n_answers, pad_id=pad_id, image_size=image_size,
                           **dataclasses.asdict(self))


@dataclass
class JobSettings:
    batch_size: int = 64  # pairs per optimiser step (per process under torchrun)
    seed: int = 0  # model initialisation, data order and every random draw of training
    data_seed: int = 0  # the shapes world's generator seed (the data, not the training)
    k_rerank: int = 16  # ITC shortlist re-ranked by ITM at evaluation
    beam_size: int = 1  # caption decoding at evaluation: 1 = greedy
    n_bootstrap: int = 1000  # bootstrap resamples of each interval
    eval_splits: tuple[str, ...] = ("val", "test", "comp")  # splits evaluated after training
    checkpoint_every: int = 500  # optimiser steps between checkpoints (one is written at the end)
    n_val_batches: int = 4  # validation batches scored every fit.val_every steps (their mean loss per term)
    image_column: str = "filepath"  # CSV data: the image path column (open_clip's default)
    caption_column: str = "title"  # CSV data: the caption column (open_clip's default)

    def __post_init__(self) -> None:
        for name in ("batch_size", "k_rerank", "beam_size", "n_bootstrap", "checkpoint_every", "n_val_batches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"job.{name} must be a positive integer, got {value!r}")
        for name in ("seed", "data_seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"job.{name} must be a non-negative integer, got {value!r}")
        bad = [s for s in self.eval_splits if s not in ("val", "test", "comp")]
        if bad:
            raise ValueError(f"job.eval_splits may hold val, test and comp, got {bad}")


@dataclass
class TrainJob:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelSettings = field(default_factory=ModelSettings)
    objectives: ALBEFObjectives = field(default_factory=ALBEFObjectives)
    fit: FitConfig = field(default_factory=FitConfig)
    job: JobSettings = field(default_factory=JobSettings)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def model_config(self, vocab_size: int, n_answers: int) -> ALBEFConfig:
        return self.model.build(vocab_size, n_answers, self.data.image_size)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainJob":
        """The inverse of to_dict (a resolved config.json); unknown sections or keys are errors."""
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown config sections {sorted(unknown)}; sections are data, model, objectives, "
                             "fit, job")
        job = cls()
        for section, values in d.items():
            for key, value in values.items():
                job = override(job, f"{section}.{key}", value)
        return job


def _tiny() -> TrainJob:
    return TrainJob(
        data=DataConfig(n_train=4000, n_val=500, n_test=1000, n_comp=1000),
        fit=FitConfig(steps=600, lr=2e-3, warmup=50, weight_decay=0.05),
        job=JobSettings(batch_size=64, checkpoint_every=200, k_rerank=8, n_bootstrap=200,
                        eval_splits=("test", "comp")),
    )


def _small() -> TrainJob:
    return TrainJob(
        data=DataConfig(n_train=20_000, n_val=1000, n_test=1000, n_comp=1000),
        model=ModelSettings(d_model=96, d_embed=96, cnn_width=32, n_heads=4, text_depth=2, fusion_depth=2,
                            decoder_depth=2),
        fit=FitConfig(steps=3000, lr=1.5e-3, warmup=150, weight_decay=0.05),
        job=JobSettings(batch_size=96, checkpoint_every=500),
    )


def _base() -> TrainJob:
    return TrainJob(
        data=DataConfig(n_train=200_000, n_val=5000, n_test=5000, n_comp=5000, image_size=64),
        model=ModelSettings(image_encoder="vit", patch_size=8, vit_depth=6, d_model=384, n_heads=6, text_depth=4,
                            fusion_depth=4, decoder_depth=4, d_embed=256, dropout=0.0),
        fit=FitConfig(steps=20_000, lr=5e-4, warmup=1000, weight_decay=0.05, precision="bf16", val_every=1000),
        job=JobSettings(batch_size=256, checkpoint_every=2000),
    )


PRESETS: dict[str, Any] = {"tiny": _tiny, "small": _small, "base": _base}
PRESET_NOTES = {
    "tiny": "CPU, about 6 minutes on 2 cores: 4,000 training images, a 64-wide model, 600 steps of 64",
    "small": "CPU, about 30 minutes on 2 cores: 20,000 training images, a 96-wide model, 3,000 steps of 96",
    "base": "one GPU: 64x64 images, 200,000 training images, a ViT and 384-wide transformers (~30M parameters), bf16",
}


def preset(name: str) -> TrainJob:
    """A fresh copy of a named preset."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets are {sorted(PRESETS)}")
    return PRESETS[name]()


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """value (already parsed from JSON where it could be) converted to the field's annotated type, or an error."""
    hint = annotation
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        others = [a for a in args if a is not type(None)]
        return _coerce(value, others[0], where)
    if origin is tuple:
        items = value if isinstance(value, (list, tuple)) else [v for v in str(value).split(",") if v]
        return tuple(_coerce(v, args[0], where) for v in items)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ValueError(f"{where} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer()
                                                                      and math.isfinite(value))):
            raise ValueError(f"{where} must be a whole number, got {value!r}")
        return int(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        return str(value)
    return value


def override(job: TrainJob, key: str, value: Any) -> TrainJob:
    """A copy of job with section.key set to value; the section's own checks run again (so 'fit.lr=-1' fails)."""
    if not isinstance(key, str) or key.count(".") != 1:
        raise ValueError(f"--set keys look like section.key (e.g. fit.lr), got {key!r}; sections are "
                         f"{[f.name for f in dataclasses.fields(TrainJob)]}")
    section, name = key.split(".")
    sections = {f.name: f for f in dataclasses.fields(TrainJob)}
    if section not in sections:
        raise ValueError(f"unknown config section {section!r} in {key!r}; sections are {sorted(sections)}")
    current = getattr(job, section)
    hints = typing.get_type_hints(type(current))
    if name not in hints or name.startswith("_"):
        known = [f.name for f in dataclasses.fields(current)]
        raise ValueError(f"unknown key {key!r}; {section} has {known}")
    converted = _coerce(value, hints[name], key)
    try:
        updated = dataclasses.replace(current, **{name: converted})
    except (TypeError, ValueError) as err:
        raise ValueError(f"{key}={value!r}: {err}") from None
    return dataclasses.replace(job, **{section: updated})


def parse_set(items: list[str]) -> list[tuple[str, Any]]:
    """['fit.lr=1e-3', 'job.eval_splits=test,comp'] -> [(key, value)], values parsed as JSON where they can be."""
    out = []
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set takes key=value, got {item!r}")
        key, text = item.split("=", 1)
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        out.append((key.strip(), value))
    return out


def resolve(name: str, sets: list[str] | None = None) -> TrainJob:
    """The preset with every --set applied, checked field by field, and the cross-section checks."""
    job = preset(name)
    for key, value in parse_set(sets or []):
        job = override(job, key, value)
    try:
        job.model_config(vocab_size=8, n_answers=2)  # the model's own checks (divisibility by the patch size, ...)
    except (TypeError, ValueError) as err:
        raise ValueError(f"model/data settings: {err}") from None
    if job.data.n_train < job.job.batch_size:
        raise ValueError(f"data.n_train={job.data.n_train} holds no full batch of job.batch_size="
                         f"{job.job.batch_size} (training drops the last partial batch)")
    if job.model.max_len < 4:
        raise ValueError(f"model.max_len={job.model.max_len} cannot hold [BOS], a word and [EOS]")
    return job
