"""The training job: presets, `--set` overrides, and the run that trains, evaluates and reports (chapter 5).

    job = resolve("tiny", ["fit.steps=300"])
    metrics = train_job(job, "runs/tiny")      # what `python -m mmlite train --preset tiny` runs
"""

from mmlite.experiment.config import PRESETS, JobSettings, ModelSettings, TrainJob, override, preset, resolve
from mmlite.experiment.run import flat_config, format_metrics, load_run, train_job, world_for

__all__ = ["PRESETS", "JobSettings", "ModelSettings", "TrainJob", "override", "preset", "resolve", "train_job",
           "flat_config", "format_metrics", "load_run", "world_for"]
