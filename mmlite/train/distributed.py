"""Data-parallel training over processes: torchrun's environment, DDP, and a sampler that shards each epoch (chapter 5).

Launch with `torchrun --nproc_per_node=N script.py`: torchrun starts N copies of the script and gives each
RANK (0 .. N-1 over all machines), LOCAL_RANK (0 .. on this machine: which GPU) and WORLD_SIZE (N), plus
MASTER_ADDR and MASTER_PORT where the processes meet. Each process then trains its own copy of the model on
its own shard of every global batch; DistributedDataParallel averages the gradients over the processes
during backward, so every copy takes the same optimizer step, the one a single process would take on the
whole global batch (for a loss that is a mean over the batch, or one that gathers, as
`contrastive_loss(..., gather=True)` does).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Sampler

from mmlite.utils import get_device

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class DistInfo:
    rank: int  # this process's rank over all machines, 0 .. world_size - 1 (0 for a single process)
    world_size: int  # number of processes (1 for a single process)
    local_rank: int  # rank on this machine, so which of its GPUs this process drives
    device: torch.device  # where this process's model and batches live


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def _env_int(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def init_distributed(backend: str | None = None, device: torch.device | str | None = None) -> DistInfo:
    """Join the process group torchrun describes in RANK, WORLD_SIZE and LOCAL_RANK; returns this process's DistInfo.

    Without those variables it is a no-op: DistInfo(0, 1, 0, get_device(device)), no process group. With them,
    the device defaults to cuda:LOCAL_RANK when CUDA is available (and becomes the current CUDA device), else
    the CPU; the backend to "nccl" on CUDA and "gloo" otherwise. A process group that already exists is kept
    when its rank and size match the environment's. Raises ValueError for a partial or inconsistent environment.
    """
    present = [k for k in _ENV if k in os.environ]
    if not present:
        return DistInfo(rank=0, world_size=1, local_rank=0, device=get_device(device))
    if len(present) != len(_ENV):
        raise ValueError(f"torchrun sets all of {list(_ENV)}, but only {present} are set in the environment")
    rank, world, local = (_env_int(k) for k in _ENV)
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ValueError(f"inconsistent environment: RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local} "
                         "(need WORLD_SIZE >= 1, 0 <= RANK < WORLD_SIZE, LOCAL_RANK >= 0)")
    if not dist.is_available():
        raise RuntimeError("this torch is built without torch.distributed, so it cannot join a process group")
    if device is None:
        dev = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    else:
        dev = get_device(device)
    if dev.type == "cuda":
        if dev.index is None or dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {dev} is not one of this machine's {torch.cuda.device_count()} GPUs")
        torch.cuda.set_device(dev)
    backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
    if _initialized():
        if (dist.get_rank(), dist.get_world_size()) != (rank, world):
            raise ValueError(f"a process group exists with rank {dist.get_rank()} of {dist.get_world_size()}, "
                             f"but the environment says rank {rank} of {world}")
    else:
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise ValueError(f"joining a process group needs {missing} in the environment (torchrun sets them)")
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=dev)


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    return (dist.get_rank(), dist.get_world_size()) if _initialized() else (0, 1)


def is_main() -> bool:
    """True on rank 0, and in a single process: the process that writes checkpoints and logs and prints."""
    return rank_and_world()[0] == 0


def wrap_ddp(model: nn.Module, info: DistInfo, find_unused_parameters: bool = False) -> nn.Module:
    """Move the model to info.device and wrap it in DistributedDataParallel (which copies rank 0's weights to all).

    In a single process without a process group (world_size 1) it returns the moved model unwrapped. DDP syncs
    gradients for a forward through the wrapper: the loss function must call the model, not its methods or
    submodules (wrap a mmlite.train.LossModule for a loss that does). find_unused_parameters: set it when
    some parameters get no gradient in a step (an objective switched off), which DDP otherwise waits for.
    """
    if not isinstance(find_unused_parameters, bool):
        raise TypeError(f"find_unused_parameters must be True or False, got {find_unused_parameters!r}")
    model = model.to(info.device)
    if not _initialized():
        if info.world_size == 1:
            return model
        raise ValueError(f"wrap_ddp needs a process group for world_size {info.world_size}: "
                         "call init_distributed() first")
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids,
                                               find_unused_parameters=find_unused_parameters)


def barrier() -> None:
    """Wait until every process gets here (nothing to wait for in a single process)."""
    if _initialized():
        dist.barrier()


def cleanup() -> None:
    """Leave the process group, if this process is in one."""
    if _initialized():
        dist.destroy_process_group()


class ShardedEpochSampler(Sampler):
    """mmlite.data.EpochSampler's epochs shared among `world_size` ranks; yields (index, epoch) pairs.

    Epoch e has the order of EpochSampler: permutation(n) of numpy.random.default_rng((seed, e)) with
    shuffle, 0 .. n-1 without. Rank r takes the positions k of that order with k % world_size == r and
    k < m * world_size, m = n // world_size: every rank gets m items an epoch and the last n % world_size
    positions are dropped (the same rule as torch's DistributedSampler(drop_last=True) on that order). So
    with a per-rank batch of B the i-th batches of all ranks together hold exactly positions i*W*B ..
    (i+1)*W*B - 1, the single process's i-th global batch of W*B (in another order: rank r's rows are its
    positions r, r + W, ...).

    state_dict() is {"epoch", "offset"} with offset the epoch positions consumed over all ranks (items handed
    out on this rank times world_size): after the same global batches it equals a single process's
    EpochSampler state, and it is the same on every rank, so rank 0's checkpoint resumes them all.
    """

    def __init__(self, n: int, shuffle: bool, seed: int, rank: int, world_size: int) -> None:
        for name, v in (("n", n), ("seed", seed), ("rank", rank), ("world_size", world_size)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"ShardedEpochSampler {name} must be an int, got {type(v).__name__} {v!r}")
        if not isinstance(shuffle, bool):
            raise TypeError(f"ShardedEpochSampler shuffle must be True or False, got {shuffle!r}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"ShardedEpochSampler needs world_size >= 1 and 0 <= rank < world_size, "
                             f"got rank={rank}, world_size={world_size}")
        if seed < 0:
            raise ValueError(f"ShardedEpochSampler seed must be >= 0 (a numpy seed), got {seed}")
        if n < world_size:
            raise ValueError(f"ShardedEpochSampler: {n} items cannot give each of {world_size} ranks one")
        self.n, self.shuffle, self.seed, self.rank, self.world_size = n, shuffle, seed, rank, world_size
        self.per_rank = n // world_size  # m: items per rank and epoch
        self.epoch, self.offset = 0, 0

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, start = self.epoch, self.offset // self.world_size
        order = np.random.default_rng((self.seed, epoch)).permutation(self.n) if self.shuffle else range(self.n)
        for i in range(start, self.per_rank):
            self.offset = (i + 1) * self.world_size
            yield int(order[self.rank + i * self.world_size]), epoch  # position k = r + i W
        self.epoch, self.offset = epoch + 1, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if not isinstance(state, dict) or set(state) != {"epoch", "offset"}:
            raise ValueError(f"sampler state must be a dict with keys epoch and offset, got {state!r}")
        for name in ("epoch", "offset"):
            v = state[name]
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"sampler state {name} must be a non-negative int, got {v!r}")
        offset, used = state["offset"], self.per_rank * self.world_size
        if offset > used or offset % self.world_size:
            raise ValueError(f"sampler state offset {offset} is not a multiple of world_size {self.world_size} "
                             f"in 0..{used} (the positions {self.world_size} ranks consume of {self.n} items)")
        self.epoch, self.offset = state["epoch"], offset
