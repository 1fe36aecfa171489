"""Checkpoints: round trip, weights_only loading, atomic writes, and errors that name the file and the problem."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from mmlite.train.checkpoint import CheckpointError, load_checkpoint, restore, save_checkpoint

CONFIG = {"d_model": 8, "lr": 1e-3, "preset": "tiny"}


def _trained():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 3)).square().mean().backward()
        opt.step()
        sched.step()
    return model, opt, sched


def test_round_trip_restores_weights_optimizer_scheduler_rng_and_step(tmp_path):
    model, opt, sched = _trained()
    random.seed(1)
    np.random.seed(2)
    path = save_checkpoint(tmp_path / "run" / "ckpt.pt", model, step=3, config=CONFIG, optimizer=opt,
                           scheduler=sched, sampler={"epoch": 1, "offset": 64})
    draws = (random.random(), np.random.rand(), torch.rand(1))  # what comes next after the save
    torch.load(path, weights_only=True)  # plain tensors and containers only
    fresh = nn.Sequential(nn.Linear(3, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    opt2 = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1.0 / (1 + s))
    state = load_checkpoint(path, config=CONFIG)
    assert restore(state, fresh, opt2, sched2) == 3 and state["sampler"] == {"epoch": 1, "offset": 64}
    assert (random.random(), np.random.rand()) == draws[:2] and torch.equal(torch.rand(1), draws[2])
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)
    assert sched2.last_epoch == 3 and opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    # the optimizer continues identically: one more step from both gives the same weights
    x = torch.randn(4, 3)
    for m, o in ((model, opt), (fresh, opt2)):
        o.zero_grad()
        m(x).square().mean().backward()
        o.step()
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)


def test_a_failed_save_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    model, opt, _ = _trained()
    path = save_checkpoint(tmp_path / "ckpt.pt", model, step=1, config=CONFIG)
    before = path.read_bytes()

    def killed(obj, f, *args, **kwargs):  # half a file written, then the process dies
        f.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, model, step=2, config=CONFIG)
    assert path.read_bytes() == before and load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"], "no temporary file is left behind"


def test_bad_checkpoints_name_the_file_and_the_problem(tmp_path):
    model, _, _ = _trained()
    good = save_checkpoint(tmp_path / "good.pt", model, step=5, config=CONFIG)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(CheckpointError, match=r"truncated\.pt: not a readable checkpoint"):
        load_checkpoint(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": model.state_dict()}, foreign)
    with pytest.raises(CheckpointError, match=r"foreign\.pt: not an mmlite checkpoint"):
        load_checkpoint(foreign)
    pickled = tmp_path / "pickled.pt"
    torch.save({"format": "mmlite-checkpoint", "model": nn.Linear(2, 2)}, pickled)  # a whole module: code
    with pytest.raises(CheckpointError, match=r"pickled\.pt: not a readable checkpoint"):
        load_checkpoint(pickled)
    with pytest.raises(CheckpointError, match=r"good\.pt: made with another configuration \(d_model: checkpoint 8, now 16"):
        load_checkpoint(good, config={**CONFIG, "d_model": 16})
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="do not fit this model"):
        restore(load_checkpoint(good), nn.Linear(3, 2))
    with pytest.raises(CheckpointError, match="is a folder"):
        save_checkpoint(tmp_path, model, step=0)


RESUMED_RUNS = {
    "fp32": {},
    "accumulate": dict(accumulate=2),  # two micro-batches per step: a step is 2 batches, the stop falls mid-step
    "bf16": dict(precision="bf16"),  # autocast on the CPU
    "logged": dict(val_every=2),  # dict losses, a validation that draws random numbers, a JSONL log
}


@pytest.mark.parametrize("kind", list(RESUMED_RUNS))
def test_an_interrupted_and_resumed_run_ends_bit_identical(tmp_path, kind):
    from mmlite.data import DataConfig, build_tokenizer, generate, make_loader
    from mmlite.train import Checkpointing, FitConfig, cycle, fit, read_jsonl

    split, tok = generate(DataConfig(n_train=40, n_val=4, n_test=4, n_comp=4), seed=1)["train"], build_tokenizer()
    options = RESUMED_RUNS[kind]
    logged = kind == "logged"
    accumulate = options.get("accumulate", 1)

    class Net(nn.Module):  # dropout draws from the global torch RNG, which the checkpoint must restore
        def __init__(self):
            super().__init__()
            self.embed, self.drop, self.out = nn.Embedding(len(tok), 8), nn.Dropout(0.3), nn.Linear(8 + 3, 1)

        def forward(self, b):
            text = self.drop(self.embed(b["caption_ids"]).mean(1))
            return self.out(torch.cat([text, b["image"].mean((2, 3))], 1)).square().mean()

    def validate(m):  # draws from the global RNG too: it must run at the same point of both runs
        return {"draw": torch.rand(()).item(), "weight": m.out.weight.sum().item()}

    def run(stop_at=None, resume=None, path=None, log=None):
        # 7 steps of 16 images: 2 batches a pass, so the stop falls mid-epoch
        cfg = FitConfig(steps=7, warmup=2, log_path=str(log) if log else None, **options)
        torch.manual_seed(0)
        net = Net()
        # a DataLoader draws a seed for its workers at every pass, from its own generator when it has one and from
        # torch's global RNG otherwise: that draw would fall before the checkpoint in one run and after it in the other
        loader = make_loader(split, tok, batch_size=16, shuffle=True, seed=3, drop_last=True,
                             generator=torch.Generator().manual_seed(3))
        if resume is not None:
            loader.sampler.load_state_dict(resume["sampler"])
        ckpt = Checkpointing(path, every=3, config={"steps": 7}, sampler=loader.sampler) if path else None
        calls = []

        def loss_fn(m, b):
            calls.append(1)
            if len(calls) == stop_at:
                raise KeyboardInterrupt  # the run is killed while computing this step
            loss = m(b)
            return {"loss": loss, "half": 0.5 * loss.detach()} if logged else loss

        return net, fit(net, cycle(loader), loss_fn, cfg, checkpointing=ckpt, resume=resume,
                        validate=validate if logged else None)

    whole, whole_history = run(log=tmp_path / "whole.jsonl" if logged else None)
    with pytest.raises(KeyboardInterrupt):  # killed in step 5; the last checkpoint is of step 3
        run(stop_at=4 * accumulate + 1, path=tmp_path / "ckpt.pt", log=tmp_path / "run.jsonl" if logged else None)
    state = load_checkpoint(tmp_path / "ckpt.pt", config={"steps": 7})
    assert state["step"] == 3
    if kind == "fp32":
        assert state["sampler"] == {"epoch": 1, "offset": 16}  # mid-epoch
    torch.manual_seed(123)  # whatever happened in between
    resumed, resumed_history = run(resume=state, path=tmp_path / "ckpt.pt",
                                   log=tmp_path / "run.jsonl" if logged else None)
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), f"{name} differs after resuming"
    assert resumed_history.losses == whole_history.losses and resumed_history.lrs == whole_history.lrs
    assert resumed_history.terms == whole_history.terms and resumed_history.validation == whole_history.validation
    assert load_checkpoint(tmp_path / "ckpt.pt")["step"] == 7
    if logged:
        assert [r["step"] for r in whole_history.validation] == [2, 4, 6, 7]
        assert len(whole_history.terms["half"]) == 7

        def timeless(path):  # the log without its clock readings
            return [{k: v for k, v in r.items() if k not in ("seconds", "samples_per_s")} for r in read_jsonl(path)]

        # the resumed log kept steps 1-3 of the interrupted run, dropped its step 4, and appended 4-7: each step once
        assert timeless(tmp_path / "run.jsonl") == timeless(tmp_path / "whole.jsonl")
        assert [r["step"] for r in read_jsonl(tmp_path / "run.jsonl")] == [1, 2, 2, 3, 4, 4, 5, 6, 6, 7, 7]


def test_the_grad_scaler_state_round_trips_and_is_not_dropped(tmp_path):
    from mmlite.train import FitConfig, cycle, fit

    model, opt, sched = _trained()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=7)
    path = save_checkpoint(tmp_path / "ckpt.pt", model, step=3, optimizer=opt, scheduler=sched, scaler=scaler)
    fresh = torch.amp.GradScaler("cpu")
    restore(load_checkpoint(path), nn.Sequential(nn.Linear(3, 8), nn.LayerNorm(8), nn.Linear(8, 2)), scaler=fresh)
    assert fresh.get_scale() == 1024.0 and fresh.state_dict()["growth_interval"] == 7
    with pytest.raises(CheckpointError, match="holds no scaler state"):
        restore(load_checkpoint(save_checkpoint(tmp_path / "plain.pt", model, step=1)), model, scaler=fresh)
    # an fp16 run's checkpoint resumed with another precision would lose its loss scale: refused
    with pytest.raises(CheckpointError, match=r"grad-scaler state \(an fp16 run\), but this run's precision is 'fp32'"):
        fit(model, cycle([torch.ones(2, 3)]), lambda m, b: m(b).mean(), FitConfig(steps=4),
            resume=load_checkpoint(path))
