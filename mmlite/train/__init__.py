"""Training: the optimisation loop, its schedule, parameter groups, precision, devices, processes, logs and
checkpoints (chapters 3, 4 and 5)."""

from mmlite.train.groups import param_groups, uses_weight_decay
from mmlite.train.checkpoint import CheckpointError, load_checkpoint, restore, save_checkpoint
from mmlite.train.devices import LossModule, model_device, to_device, unwrap
from mmlite.train.distributed import (DistInfo, ShardedEpochSampler, barrier, cleanup, init_distributed, is_main,
                                      wrap_ddp)
from mmlite.train.loop import Checkpointing, FitConfig, History, cycle, fit, warmup_cosine
from mmlite.train.modes import evaluating
from mmlite.train.runlog import read_jsonl

__all__ = ["FitConfig", "History", "Checkpointing", "fit", "cycle", "warmup_cosine", "param_groups", "uses_weight_decay",
           "evaluating", "unwrap", "to_device", "model_device", "CheckpointError", "save_checkpoint", "load_checkpoint",
           "restore", "DistInfo", "init_distributed", "is_main", "wrap_ddp", "barrier", "cleanup",
           "ShardedEpochSampler", "LossModule", "read_jsonl"]
