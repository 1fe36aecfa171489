"""Training on many processes: torchrun's environment, the sharded epoch sampler, and fit under DDP on 2 CPU ranks
(gloo) against one process on the same global batches."""

from __future__ import annotations

import io
import os
import socket
from contextlib import redirect_stdout

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, Dataset

from mmlite.data import EpochSampler
from mmlite.objectives import LogitScale, contrastive_loss
from mmlite.train import (Checkpointing, DistInfo, FitConfig, LossModule, ShardedEpochSampler, barrier, cleanup, cycle,
                          fit, init_distributed, is_main, unwrap, wrap_ddp)

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


# --------------------------------------------------------------------------- the sampler
def test_one_shard_is_the_epoch_sampler():
    single, sharded = EpochSampler(11, True, seed=5), ShardedEpochSampler(11, True, 5, 0, 1)
    for _ in range(3):  # three epochs, each a new permutation
        assert list(sharded) == list(single) and sharded.state_dict() == single.state_dict()
    assert list(ShardedEpochSampler(4, False, 0, 0, 1)) == [(0, 0), (1, 0), (2, 0), (3, 0)]


@pytest.mark.parametrize("n, world, batch", [(23, 3, 2), (20, 2, 4), (8, 4, 1)])
def test_the_ranks_batches_together_are_the_single_process_global_batches(n, world, batch):
    single = list(EpochSampler(n, True, seed=9))  # epoch 0's (index, epoch) pairs in order
    ranks = [list(ShardedEpochSampler(n, True, 9, r, world)) for r in range(world)]
    assert {len(items) for items in ranks} == {n // world}, "every rank gets n // world items"
    for r, items in enumerate(ranks):
        assert items == single[r:(n // world) * world:world]  # positions k with k % world == r
    for i in range(n // world // batch):  # the i-th batches of all ranks hold the single process's i-th global one
        together = [pair for items in ranks for pair in items[i * batch:(i + 1) * batch]]
        assert sorted(together) == sorted(single[i * world * batch:(i + 1) * world * batch])
    dropped = {pair for pair in single} - {pair for items in ranks for pair in items}
    assert dropped == set(single[(n // world) * world:]), "only the last n % world positions are left out"


def test_the_sharded_state_is_the_single_process_state_and_resumes_mid_epoch():
    world, n = 3, 14
    shards = [ShardedEpochSampler(n, True, 2, r, world) for r in range(world)]
    single = EpochSampler(n, True, seed=2)
    heads = [[pair for _, pair in zip(range(3), iter(s))] for s in shards]  # 3 items on each rank, then stop
    rest_single = iter(single)
    for _ in range(3 * world):
        next(rest_single)
    assert all(s.state_dict() == single.state_dict() == {"epoch": 0, "offset": 9} for s in shards)
    for r, s in enumerate(shards):
        again = ShardedEpochSampler(n, True, 2, r, world)
        again.load_state_dict(s.state_dict())
        whole = list(ShardedEpochSampler(n, True, 2, r, world))
        assert heads[r] + list(again) == whole  # the resumed pass hands out the rest of the epoch
        assert again.state_dict() == {"epoch": 1, "offset": 0}
    with pytest.raises(ValueError, match="offset 4 is not a multiple of world_size 3"):
        shards[0].load_state_dict({"epoch": 0, "offset": 4})
    with pytest.raises(ValueError, match="offset 15 is not a multiple"):
        shards[0].load_state_dict({"epoch": 0, "offset": 15})
    with pytest.raises(ValueError, match="keys epoch and offset"):
        shards[0].load_state_dict({"epoch": 0})


@pytest.mark.parametrize("args, error, message", [
    ((10, True, 0, 2, 2), ValueError, "0 <= rank < world_size"),
    ((10, True, 0, 0, 0), ValueError, "world_size >= 1"),
    ((1, True, 0, 0, 2), ValueError, "1 items cannot give each of 2 ranks one"),
    ((10, True, -1, 0, 1), ValueError, "seed must be >= 0"),
    ((10.0, True, 0, 0, 1), TypeError, "n must be an int"),
    ((10, 1, 0, 0, 1), TypeError, "shuffle must be True or False"),
])
def test_sharded_sampler_rejects_bad_arguments(args, error, message):
    with pytest.raises(error, match=message):
        ShardedEpochSampler(*args)


# --------------------------------------------------------------------------- the environment
def test_without_torchrun_everything_is_a_single_process(monkeypatch):
    for k in _ENV:
        monkeypatch.delenv(k, raising=False)
    info = init_distributed(device="cpu")
    assert info == DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    assert not dist.is_initialized() and is_main()
    model = nn.Linear(2, 2)
    assert wrap_ddp(model, info) is model
    with pytest.raises(TypeError, match="find_unused_parameters must be True or False"):
        wrap_ddp(model, info, find_unused_parameters="yes")
    barrier()
    cleanup()  # both no-ops without a process group
    with pytest.raises(ValueError, match="needs a process group for world_size 2"):
        wrap_ddp(model, DistInfo(rank=0, world_size=2, local_rank=0, device=torch.device("cpu")))


def test_a_partial_or_inconsistent_environment_is_refused(monkeypatch):
    for k in _ENV:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match=r"only \['RANK'\] are set"):
        init_distributed()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "zero")
    with pytest.raises(ValueError, match="LOCAL_RANK must be an integer, got 'zero'"):
        init_distributed()
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="RANK=2, WORLD_SIZE=2"):
        init_distributed()
    assert not dist.is_initialized()


# --------------------------------------------------------------------------- fit under DDP
W, B, N, D_IN, D = 2, 4, 20, 5, 6  # 2 ranks of 4 pairs: global batches of 8 from 20 pairs, 2 a pass
STEPS, SEED = 3, 7


class _Pairs(Dataset):
    """N random (image, text) feature pairs, indexed by the samplers' (index, epoch) pairs."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(N, D_IN, generator=g), torch.randn(N, D_IN, generator=g)

    def __len__(self) -> int:
        return N

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[key[0]], self.y[key[0]]


class _TwoTowers(nn.Module):
    """Two linear encoders and CLIP's logit scale; forward returns all three, so a loss calls the model once."""

    def __init__(self) -> None:
        super().__init__()
        self.image, self.text, self.logit_scale = nn.Linear(D_IN, D), nn.Linear(D_IN, D), LogitScale()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.image(x), self.text(y), self.logit_scale()


def _loss(m, batch):
    z_i, z_t, scale = m(*batch)
    loss = contrastive_loss(z_i, z_t, scale, gather=True)  # each rank's rows against the global batch
    return {"loss": loss, "scale": scale.detach()}


def _loss_by_parts(m, batch):  # calls the encoders, not forward: under DDP only through a LossModule
    x, y = batch
    loss = contrastive_loss(m.image(x), m.text(y), m.logit_scale, gather=True)
    return {"loss": loss, "scale": m.logit_scale().detach()}


def _train(model, loader, accumulate, **kw):
    """fit for STEPS steps; returns (History, first step's gradients, final weights), as seen by after_step."""
    grads = []

    def after(m):
        if not grads:
            grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
        m.logit_scale.clamp_()

    cfg = FitConfig(steps=STEPS, warmup=1, lr=1e-2, accumulate=accumulate, **kw.pop("cfg", {}))
    history = fit(model, cycle(loader), kw.pop("loss_fn", _loss), cfg, after_step=after, **kw)
    return history, grads[0], {n: p.detach().clone() for n, p in unwrap(model).named_parameters()}


def _rank(rank: int, port: int, folder: str, out: dict) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(W), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    info = init_distributed(backend="gloo", device="cpu")
    try:
        results = {}
        for accumulate in (1, 2):
            torch.manual_seed(rank)  # different initial weights on each rank: DDP copies rank 0's to all
            model = wrap_ddp(_TwoTowers(), info)
            sampler = ShardedEpochSampler(N, True, SEED, info.rank, info.world_size)
            loader = DataLoader(_Pairs(), batch_size=B, sampler=sampler, drop_last=True)
            printed = io.StringIO()
            with redirect_stdout(printed):
                history, grads, weights = _train(
                    model, loader, accumulate, cfg=dict(log_every=1, log_path=f"{folder}/log{rank}.jsonl"),
                    checkpointing=Checkpointing(f"{folder}/ckpt{rank}.pt", every=1))
            results[accumulate] = (history.losses, history.terms, grads, weights, printed.getvalue(), is_main())
        torch.manual_seed(0)
        model = wrap_ddp(LossModule(_TwoTowers(), _loss_by_parts), info)
        loader = DataLoader(_Pairs(), batch_size=B, sampler=ShardedEpochSampler(N, True, SEED, rank, W), drop_last=True)
        history, grads, weights = _train(model, loader, 1, loss_fn=lambda m, b: m(b))
        results["parts"] = (history.losses, history.terms, grads, weights, "", is_main())
        out[rank] = results
    finally:
        cleanup()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available(), reason="torch built without torch.distributed")
def test_fit_under_ddp_on_two_ranks_is_one_process_on_the_global_batch(tmp_path):
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank, args=(_free_port(), str(tmp_path), out), nprocs=W, join=True)
        out = dict(out)
    for run, accumulate in ((1, 1), (2, 2), ("parts", 1)):  # "parts": a LossModule whose loss calls the encoders
        torch.manual_seed(0)
        model = _TwoTowers()  # rank 0's initial weights, which DDP broadcast to every rank
        # one process, the whole global batch of W * B (a single-shard sampler is EpochSampler)
        loader = DataLoader(_Pairs(), batch_size=W * B, sampler=ShardedEpochSampler(N, True, SEED, 0, 1),
                            drop_last=True)
        history, grads, weights = _train(model, loader, accumulate)
        for rank in range(W):
            losses, terms, rank_grads, rank_weights, printed, main = out[rank][run]
            # float32 sums taken in another order (the gathered batch is a permutation of the single one, and
            # the loss a mean of rank means): measured losses 1 ulp apart (4.8e-7 at ~6), gradients 8e-8,
            # weights 6e-8; allowed a few ulps of the losses and 1e-6 elsewhere
            torch.testing.assert_close(losses, history.losses, atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(terms["scale"], history.terms["scale"], atol=1e-6, rtol=1e-6)
            for name in grads:
                torch.testing.assert_close(rank_grads[name], grads[name], atol=1e-6, rtol=0, msg=name)
                torch.testing.assert_close(rank_weights[name], weights[name], atol=1e-6, rtol=0, msg=name)
            assert main is (rank == 0)
            if run != "parts":
                assert (printed.count("loss") == STEPS) if rank == 0 else printed == "", "only rank 0 prints"
        for name in grads:  # the ranks agree with each other exactly: DDP gives them the same averaged gradient
            assert torch.equal(out[0][run][3][name], out[1][run][3][name])
        assert out[0][run][0] == out[1][run][0], "the losses are averaged over the ranks"
    assert (tmp_path / "ckpt0.pt").is_file() and (tmp_path / "log0.jsonl").is_file()
    assert not (tmp_path / "ckpt1.pt").exists() and not (tmp_path / "log1.jsonl").exists(), "only rank 0 writes"
    from mmlite.train import load_checkpoint, read_jsonl

    assert load_checkpoint(tmp_path / "ckpt0.pt")["step"] == STEPS
    records = read_jsonl(tmp_path / "log0.jsonl")  # of the last run, accumulate=2
    assert [r["step"] for r in records] == [1, 2, 3]
    assert [r["loss"] for r in records] == out[0][2][0]
