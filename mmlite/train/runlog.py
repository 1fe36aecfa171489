"""A run's JSONL log (one JSON object a line) and the batch-size count behind samples/s (chapter 5).

fit writes one line per optimizer step, {"step", "loss", <terms>, "lr", "samples_per_s", "seconds"}, and one
per validation, {"step", "split": "val", <metrics>}; "step" is the number of optimizer steps done (1 for the
first), as in a checkpoint. A resumed run keeps the lines of steps up to the checkpoint's and appends, so the
log of an interrupted and resumed run has each step once. Values are finite numbers: the file is strict JSON.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import Tensor

RESERVED = ("step", "split", "loss", "lr", "samples_per_s", "seconds")  # keys fit writes itself


def batch_size(batch: object) -> int | None:
    """Leading dimension of the batch's first tensor, depth first (dict values in order, list and tuple items).

    None when the batch holds no tensor with at least one dimension. fit counts samples/s with it, so every
    tensor-holding batch must put a per-sample tensor first (an image or id tensor of shape (B, ...)).
    """
    if isinstance(batch, Tensor):
        return int(batch.shape[0]) if batch.ndim >= 1 else None
    items = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else ()
    for item in items:
        n = batch_size(item)
        if n is not None:
            return n
    return None


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The records of a JSONL file; a last line cut short (the run killed while writing it) is left out.

    Raises ValueError, naming the file and the line, for any other line that is not a JSON object.
    """
    path = Path(path)
    lines = path.read_text().split("\n")
    records = []
    for k, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if k == len(lines) - 1:  # no newline after it: a write that never finished
                break
            raise ValueError(f"{path} line {k + 1} is not JSON: {e}") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path} line {k + 1} is not a JSON object: {line[:80]!r}")
        records.append(record)
    return records


class JsonlLog:
    """Append-only JSONL writer: a fresh file for a new run, or the old one cut after `resume_step` for a resume."""

    def __init__(self, path: str | Path, resume_step: int | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.is_file():
            kept = []
            for k, record in enumerate(read_jsonl(self.path)):
                step = record.get("step")
                if isinstance(step, bool) or not isinstance(step, int):
                    raise ValueError(f"{self.path}: record {k + 1} has no integer 'step', so the log cannot be "
                                     f"cut at the resumed step {resume_step}: {record!r}")
                if step <= resume_step:
                    kept.append(record)
            tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
            tmp.write_text("".join(_dumps(r) for r in kept))
            os.replace(tmp, self.path)  # atomic: a kill here leaves the old log or the cut one
            self._file = open(self.path, "a")
        else:
            self._file = open(self.path, "w" if resume_step is None else "a")

    def write(self, record: dict[str, Any]) -> None:
        """Append one record as a line and flush it (so a killed run loses at most the line being written)."""
        self._file.write(_dumps(record))
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _dumps(record: dict[str, Any]) -> str:
    return json.dumps(record, allow_nan=False) + "\n"
