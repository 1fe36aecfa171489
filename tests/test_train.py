"""The training loop: config validation, global-norm clipping, decoupled weight decay by group, loss checks."""

import math

import pytest
import torch
from torch import nn

from mmlite.train import FitConfig, cycle, evaluating, fit, to_device, unwrap


class _Tiny(nn.Module):
    """One parameter of each kind param_groups tells apart: a weight matrix, a bias, a norm, an embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 4)
        self.norm = nn.LayerNorm(4)
        self.embed = nn.Embedding(5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.linear(x)) + self.embed.weight[:1]


@pytest.mark.parametrize("kwargs, message", [
    (dict(grad_clip=-1.0), "grad_clip must be positive"),
    (dict(grad_clip=0.0), "grad_clip must be positive"),
    (dict(grad_clip=float("nan")), "grad_clip must be finite"),
    (dict(weight_decay=-0.01), "weight_decay must be >= 0"),
    (dict(weight_decay=float("inf")), "weight_decay must be finite"),
    (dict(lr=float("nan")), "lr must be finite"),
    (dict(lr=float("inf")), "lr must be finite"),
    (dict(lr=0.0), "lr > 0"),
    (dict(steps=2.5), "steps must be a whole number"),
    (dict(steps=0), "steps >= 1"),
    (dict(warmup=1.5), "warmup must be a whole number"),
    (dict(min_lr_ratio=1.5), "ratio in"),
    (dict(log_every=-1), "log_every must be >= 0"),
    (dict(check_every=0), "check_every must be >= 1"),
    (dict(check_every=2.0), "check_every must be a whole number"),
])
def test_fit_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FitConfig(**kwargs)


def test_fit_config_type_errors_and_accepted_values():
    with pytest.raises(TypeError, match="steps must be a number"):
        FitConfig(steps="3")
    with pytest.raises(TypeError, match="grad_clip must be a number"):
        FitConfig(grad_clip=True)
    FitConfig(grad_clip=None, weight_decay=0.0, warmup=0)  # no clipping, no decay, no warm-up
    FitConfig(grad_clip=float("inf"))  # clipping at +inf never changes a gradient


def _raw_gradients(model: nn.Module, loss_fn, batch) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss_fn(model, batch).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("clip", [0.5, None])
def test_fit_clips_the_global_gradient_norm(clip):
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    x = torch.randn(8, 3)

    def loss_fn(m, b):
        return 50.0 * m(b).pow(2).mean()  # gradient norm far above 0.5

    raw = _raw_gradients(model, loss_fn, x)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in raw]))
    assert norm > 5.0
    seen = []
    fit(model, cycle([x]), loss_fn, FitConfig(steps=1, warmup=0, grad_clip=clip),
        after_step=lambda m: seen.append([p.grad.clone() for p in m.parameters()]))
    # clip_grad_norm_ scales every gradient by clip / (||g|| + 1e-6): the global norm, not one per parameter
    factor = 1.0 if clip is None else clip / (norm.item() + 1e-6)
    for got, g in zip(seen[0], raw):
        torch.testing.assert_close(got, g * factor, rtol=1e-5, atol=1e-7)  # float32, one product
    if clip is not None:
        clipped = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in seen[0]]))
        assert clipped.item() == pytest.approx(clip, rel=1e-5)


def test_fit_decays_only_weight_matrices_and_decay_is_decoupled():
    torch.manual_seed(0)
    model = _Tiny()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def zero_gradient(m, b):  # every parameter gets an exact zero gradient: only the decay can move it
        return sum((p * 0.0).sum() for p in m.parameters())

    lr, wd = 0.1, 0.5
    fit(model, cycle([None]), zero_gradient, FitConfig(steps=1, lr=lr, weight_decay=wd, warmup=0))
    after = dict(model.named_parameters())
    # AdamW: w <- w (1 - lr wd) with zero gradient; the first step's lr is the peak (warm-up 0, cosine at 0)
    torch.testing.assert_close(after["linear.weight"].detach(), before["linear.weight"] * (1 - lr * wd),
                               rtol=1e-6, atol=0.0)
    for name in ("linear.bias", "norm.weight", "norm.bias", "embed.weight"):
        assert torch.equal(after[name].detach(), before[name]), f"{name} must not be decayed"


def test_fit_requires_a_scalar_tensor_loss():
    model = nn.Linear(2, 1)
    x = torch.ones(3, 2)
    with pytest.raises(ValueError, match=r"scalar loss, got shape \(3, 1\)"):
        fit(model, cycle([x]), lambda m, b: m(b), FitConfig(steps=1, warmup=0))
    with pytest.raises(TypeError, match="must return a tensor, got float"):
        fit(model, cycle([x]), lambda m, b: 1.0, FitConfig(steps=1, warmup=0))
    with pytest.raises(FloatingPointError, match="loss is nan at step 0"):
        fit(model, cycle([x]), lambda m, b: m(b).sum() * float("nan"), FitConfig(steps=1, warmup=0))


def test_fit_checks_parameters_after_the_last_step_and_clears_gradients():
    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    x = torch.ones(3, 2)
    history = fit(model, cycle([x]), lambda m, b: m(b).pow(2).mean(), FitConfig(steps=3, warmup=1))
    assert len(history.losses) == len(history.lrs) == 3 and all(math.isfinite(v) for v in history.losses)
    assert all(p.grad is None for p in model.parameters()), "fit leaves no gradient of its last step behind"

    def poison(m):
        with torch.no_grad():
            m.bias.fill_(float("inf"))

    with pytest.raises(FloatingPointError, match=r"\['bias'\] are not finite after the last step"):
        fit(model, cycle([x]), lambda m, b: m(b).pow(2).mean(), FitConfig(steps=1, warmup=0), after_step=poison)


@pytest.mark.parametrize("start_training", [True, False])
def test_evaluating_switches_to_eval_without_autograd_and_restores_the_mode(start_training):
    model = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5)).train(start_training)
    x = torch.randn(4, 3)
    with evaluating(model) as m:
        assert m is model and not model.training and not model[1].training
        assert torch.is_inference_mode_enabled()
        y = model(x)
        torch.testing.assert_close(model(x), y, rtol=0, atol=0)  # no dropout in eval mode
    assert not y.requires_grad and model.training is start_training and model[1].training is start_training
    assert not torch.is_inference_mode_enabled()


def test_evaluating_restores_the_mode_after_an_exception():
    model = nn.Linear(3, 3).train()
    with pytest.raises(RuntimeError, match="boom"):
        with evaluating(model):
            assert not model.training
            raise RuntimeError("boom")
    assert model.training and not torch.is_inference_mode_enabled()
    model.eval()
    with pytest.raises(ValueError):
        with evaluating(model):
            raise ValueError("inside")
    assert not model.training  # an eval-mode model stays in eval mode


def test_fit_reads_losses_back_every_check_every_steps_and_names_the_first_bad_step():
    model = nn.Linear(2, 1)
    x = torch.ones(3, 2)
    calls = []

    def loss_fn(m, b):
        calls.append(len(calls))
        return m(b).pow(2).mean() * (float("nan") if len(calls) == 3 else 1.0)  # step 2 is NaN

    with pytest.raises(FloatingPointError, match="loss is nan at step 2"):
        fit(model, cycle([x]), loss_fn, FitConfig(steps=10, warmup=0, check_every=4))
    assert len(calls) == 4, "the losses are read back at step 4, not every step"
    history = fit(nn.Linear(2, 1), cycle([x]), lambda m, b: m(b).pow(2).mean(),
                  FitConfig(steps=7, warmup=0, check_every=3))
    assert len(history.losses) == 7, "and always after the last step"


def test_fit_moves_batches_to_the_device_and_hooks_see_the_unwrapped_model():
    model = _Tiny()
    seen = []

    def loss_fn(m, batch):
        seen.append((batch["x"].device, batch["pair"][0].device, batch["name"]))
        return m(batch["x"]).pow(2).mean()

    batch = {"x": torch.ones(2, 3), "pair": (torch.zeros(1), torch.zeros(1)), "name": "kept"}
    fit(nn.DataParallel(model), cycle([batch]), loss_fn, FitConfig(steps=2, warmup=0),
        after_step=lambda m: seen.append(type(m)))
    assert seen[1] is _Tiny and seen[0] == (torch.device("cpu"), torch.device("cpu"), "kept")
    moved = to_device({"a": [torch.ones(1)], "b": (torch.ones(1), 3)}, "meta")
    assert moved["a"][0].device.type == "meta" and moved["b"][0].device.type == "meta" and moved["b"][1] == 3
    assert unwrap(nn.DataParallel(model)) is model and unwrap(model) is model


# --------------------------------------------------------------------------- accumulation, precision, terms, logs
@pytest.mark.parametrize("kwargs, error, message", [
    (dict(accumulate=0), ValueError, "accumulate must be >= 1"),
    (dict(accumulate=2.5), ValueError, "accumulate must be a whole number"),
    (dict(accumulate=True), TypeError, "accumulate must be a number"),
    (dict(precision="fp8"), ValueError, r"precision must be one of \('fp32', 'bf16', 'fp16'\), got 'fp8'"),
    (dict(precision=16), TypeError, "precision must be a string"),
    (dict(compile=1), TypeError, "compile must be True or False"),
    (dict(progress="yes"), TypeError, "progress must be True or False"),
    (dict(log_path=3), TypeError, "log_path must be a path"),
    (dict(log_path=""), ValueError, "log_path must name a file"),
    (dict(val_every=-1), ValueError, "val_every must be >= 0"),
    (dict(val_every=0.5), ValueError, "val_every must be a whole number"),
])
def test_fit_config_rejects_bad_new_fields(kwargs, error, message):
    with pytest.raises(error, match=message):
        FitConfig(**kwargs)


def test_fit_config_log_path_must_not_be_a_folder(tmp_path):
    with pytest.raises(ValueError, match="log_path must name a file"):
        FitConfig(log_path=str(tmp_path))


def _mean_square(m, b):
    return m(b).pow(2).mean()  # a mean over the batch


def test_accumulating_two_half_batches_equals_one_whole_batch():
    torch.manual_seed(0)
    whole = [torch.randn(8, 3) for _ in range(4)]
    halves = [h for x in whole for h in (x[:4], x[4:])]  # each batch split in two micro-batches, in order
    torch.manual_seed(1)
    a = _Tiny()
    b = _Tiny()
    b.load_state_dict(a.state_dict())
    cfg = dict(steps=4, warmup=1, lr=1e-2, grad_clip=None)  # no clipping: it would hide a gradient's scale
    grads = {"a": [], "b": []}
    ha = fit(a, iter(whole), _mean_square, FitConfig(**cfg),
             after_step=lambda m: grads["a"].append([p.grad.clone() for p in m.parameters()]))
    hb = fit(b, iter(halves), _mean_square, FitConfig(**cfg, accumulate=2),  # draws exactly 8 batches
             after_step=lambda m: grads["b"].append([p.grad.clone() for p in m.parameters()]))
    # AdamW hardly sees a gradient's scale, so check the gradients themselves: each micro-loss is divided by 2
    for g, h in zip(grads["a"][0], grads["b"][0]):
        torch.testing.assert_close(h, g, rtol=1e-5, atol=1e-7)
    # the mean of two half-batch means is the whole batch's mean: equal up to float32 rounding, and AdamW's
    # normalised update keeps it there over 4 steps (measured: losses 1.2e-7 apart, weights 7e-9)
    torch.testing.assert_close(hb.losses, ha.losses, rtol=1e-5, atol=1e-6)
    assert hb.lrs == ha.lrs, "the schedule counts optimizer steps, not micro-batches"
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)
    with pytest.raises(ValueError, match="batches ran out after 3 steps of 4"):
        fit(_Tiny(), iter(halves[:7]), _mean_square, FitConfig(**cfg, accumulate=2))


def test_bf16_autocast_runs_on_the_cpu_close_to_fp32():
    torch.manual_seed(0)
    xs = [torch.randn(16, 3) for _ in range(3)]
    seen = []

    def loss_fn(m, b):
        y = m.linear(b)
        seen.append(y.dtype)  # a matmul under autocast runs in bfloat16
        return m.norm(y).pow(2).mean() + m.embed.weight.pow(2).mean()

    torch.manual_seed(1)
    ref = _Tiny()
    low = _Tiny()
    low.load_state_dict(ref.state_dict())
    h32 = fit(ref, cycle(xs), loss_fn, FitConfig(steps=6, warmup=0, lr=1e-2))
    h16 = fit(low, cycle(xs), loss_fn, FitConfig(steps=6, warmup=0, lr=1e-2, precision="bf16"))
    assert seen[:6] == [torch.float32] * 6 and seen[6:] == [torch.bfloat16] * 6
    assert all(math.isfinite(v) for v in h16.losses)
    # bfloat16 keeps 8 significant bits (relative rounding 2^-9 ~ 0.2% per operation); measured gap 0.07%, allowed 1%
    torch.testing.assert_close(h16.losses, h32.losses, rtol=1e-2, atol=1e-3)
    assert all(q.dtype == torch.float32 for q in low.parameters()), "autocast computes in bf16, weights stay fp32"
    # AdamW's step is ~lr * sign(gradient), so a weight whose gradient is near 0 may move either way: compare
    # what the two trained models compute instead, in float32, on the training batches (measured gap 0.005%)
    with torch.no_grad():
        after = [sum(loss_fn(m, x).item() for x in xs) for m in (ref, low)]
    assert after[1] == pytest.approx(after[0], rel=1e-2)


def test_fp16_is_refused_on_the_cpu():
    with pytest.raises(ValueError, match=r"precision='fp16' needs a CUDA device .* the model is on cpu"):
        fit(_Tiny(), cycle([torch.ones(2, 3)]), _mean_square, FitConfig(steps=1, precision="fp16"))


def test_dict_losses_back_propagate_loss_and_log_every_term():
    torch.manual_seed(0)
    xs = [torch.randn(4, 3) for _ in range(2)]

    def loss_fn(m, b):
        y = m(b)
        a, c = y.pow(2).mean(), y.abs().mean()
        return {"loss": a + 0.5 * c, "itc": a, "itm": c}

    torch.manual_seed(1)
    model = _Tiny()
    twin = _Tiny()
    twin.load_state_dict(model.state_dict())
    history = fit(model, cycle(xs), loss_fn, FitConfig(steps=3, warmup=0))
    plain = fit(twin, cycle(xs), lambda m, b: loss_fn(m, b)["loss"], FitConfig(steps=3, warmup=0))
    assert history.losses == plain.losses and plain.terms == {}  # "loss" is what is back-propagated
    assert list(history.terms) == ["itc", "itm"] and all(len(v) == 3 for v in history.terms.values())
    for a, c, total in zip(history.terms["itc"], history.terms["itm"], history.losses):
        assert total == pytest.approx(a + 0.5 * c, rel=1e-6)
    x = torch.ones(2, 3)
    with pytest.raises(ValueError, match="dict without 'loss'"):
        fit(_Tiny(), cycle([x]), lambda m, b: {"itc": m(b).mean()}, FitConfig(steps=1))
    with pytest.raises(ValueError, match=r"shape \(2, 4\) for its loss term 'itm'"):
        fit(_Tiny(), cycle([x]), lambda m, b: {"loss": m(b).mean(), "itm": m(b)}, FitConfig(steps=1))
    with pytest.raises(ValueError, match=r"clash with the log's own keys"):
        fit(_Tiny(), cycle([x]), lambda m, b: {"loss": m(b).mean(), "lr": m(b).mean()}, FitConfig(steps=1))
    calls = []

    def changing(m, b):
        calls.append(1)
        out = {"loss": m(b).mean(), "itc": m(b).mean()}
        return out if len(calls) == 1 else {"loss": out["loss"]}

    with pytest.raises(ValueError, match=r"terms \[\] at step 1, but \['itc'\] before"):
        fit(_Tiny(), cycle([x]), changing, FitConfig(steps=2))
    with pytest.raises(FloatingPointError, match="loss term 'itm' is inf at step 0"):
        fit(_Tiny(), cycle([x]), lambda m, b: {"loss": m(b).mean(), "itm": torch.tensor(float("inf"))},
            FitConfig(steps=1))


def test_validation_runs_every_val_every_steps_on_the_unwrapped_model_in_eval_mode():
    model = nn.Sequential(nn.Linear(3, 2), nn.Dropout(0.5))
    calls = []

    def validate(m):
        calls.append((type(m), m.training, m[1].training, torch.is_inference_mode_enabled()))
        return {"acc": 0.25 * len(calls), "loss": torch.tensor(1.5)}

    x = torch.ones(4, 3)
    history = fit(nn.DataParallel(model), cycle([x]), _mean_square, FitConfig(steps=5, warmup=0, val_every=2),
                  validate=validate)
    assert calls == [(nn.Sequential, False, False, True)] * 3  # after steps 2, 4 and the last, 5
    assert history.validation == [{"step": 2, "acc": 0.25, "loss": 1.5}, {"step": 4, "acc": 0.5, "loss": 1.5},
                                  {"step": 5, "acc": 0.75, "loss": 1.5}]
    assert model.training and model[1].training, "fit puts the model back in train mode"
    with pytest.raises(ValueError, match="val_every is 0 but validate is given"):
        fit(model, cycle([x]), _mean_square, FitConfig(steps=1), validate=validate)
    with pytest.raises(ValueError, match="val_every is 2 but validate is None"):
        fit(model, cycle([x]), _mean_square, FitConfig(steps=1, val_every=2))
    with pytest.raises(TypeError, match="metric 'acc' must be a number, got str"):
        fit(model, cycle([x]), _mean_square, FitConfig(steps=1, val_every=1), validate=lambda m: {"acc": "high"})
    with pytest.raises(FloatingPointError, match="metric 'acc' is nan after step 1"):
        fit(model, cycle([x]), _mean_square, FitConfig(steps=1, val_every=1), validate=lambda m: {"acc": math.nan})


def test_the_jsonl_log_has_a_line_per_step_and_per_validation(tmp_path):
    import json

    from mmlite.train import read_jsonl, warmup_cosine

    torch.manual_seed(0)
    xs = [{"x": torch.randn(6, 3), "names": ["a"] * 6}, {"x": torch.randn(6, 3), "names": ["b"] * 6}]

    def loss_fn(m, b):
        y = m(b["x"])
        return {"loss": y.pow(2).mean(), "mlm": y.abs().mean()}

    path = tmp_path / "logs" / "run.jsonl"
    cfg = FitConfig(steps=4, warmup=2, lr=1e-2, log_path=str(path), val_every=3, accumulate=2)
    history = fit(_Tiny(), cycle(xs), loss_fn, cfg, validate=lambda m: {"recall@1": 0.5})
    lines = path.read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert records == read_jsonl(path)
    train = [r for r in records if "split" not in r]
    assert [r["step"] for r in records] == [1, 2, 3, 3, 4, 4]  # each validation after its step's line
    assert [r for r in records if "split" in r] == [{"step": 3, "split": "val", "recall@1": 0.5},
                                                    {"step": 4, "split": "val", "recall@1": 0.5}]
    assert all(list(r) == ["step", "loss", "mlm", "lr", "samples_per_s", "seconds"] for r in train)
    assert [r["loss"] for r in train] == history.losses and [r["mlm"] for r in train] == history.terms["mlm"]
    assert [r["lr"] for r in train] == [1e-2 * warmup_cosine(s, cfg) for s in range(4)]  # the rate each step used
    assert all(r["samples_per_s"] > 0 for r in train)  # 2 micro-batches of 6 samples per step
    assert all(0 < a["seconds"] < b["seconds"] for a, b in zip(train, train[1:]))
    fit(_Tiny(), cycle(xs), loss_fn, FitConfig(steps=1, log_path=str(path)))
    assert len(read_jsonl(path)) == 1, "a new run (no resume) starts a new log"
    with pytest.raises(ValueError, match="holds no such tensor"):
        fit(_Tiny(), cycle([None]), lambda m, b: m.embed.weight.sum(), FitConfig(steps=1, log_path=str(path)))


def test_read_jsonl_skips_a_cut_last_line_and_names_a_bad_one(tmp_path):
    from mmlite.train import read_jsonl

    path = tmp_path / "log.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')  # killed while writing step 2
    assert read_jsonl(path) == [{"step": 1, "loss": 2.0}]
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"log\.jsonl line 2 is not JSON"):
        read_jsonl(path)


def test_progress_bar_shows_loss_and_samples_per_second(capsys):
    fit(_Tiny(), cycle([torch.ones(5, 3)]), _mean_square, FitConfig(steps=3, warmup=0, progress=True, log_every=3))
    captured = capsys.readouterr()
    assert "samples_per_s" in captured.err and "loss" in captured.err and "3/3" in captured.err
    assert "step     3  loss" in captured.out  # log_every still prints, above the bar


def test_compile_computes_the_loss_through_the_compiled_model(monkeypatch):
    class Compiled(nn.Module):  # stands in for torch.compile's OptimizedModule, which keeps the module as _orig_mod
        def __init__(self, module):
            super().__init__()
            self._orig_mod = module

        def forward(self, *args):
            return self._orig_mod(*args)

    compiled = []
    monkeypatch.setattr(torch, "compile", lambda m: compiled.append(Compiled(m)) or compiled[-1])
    model, seen = _Tiny(), []
    fit(model, cycle([torch.ones(2, 3)]), lambda m, b: seen.append(type(m)) or _mean_square(m, b),
        FitConfig(steps=2, warmup=0, compile=True), after_step=lambda m: seen.append(type(m)))
    assert len(compiled) == 1 and compiled[0]._orig_mod is model
    assert seen == [Compiled, _Tiny, Compiled, _Tiny], "the loss goes through the compiled model, hooks get the module"
    seen.clear()
    fit(model, cycle([torch.ones(2, 3)]), lambda m, b: seen.append(type(m)) or _mean_square(m, b),
        FitConfig(steps=1, warmup=0))
    assert len(compiled) == 1 and seen == [_Tiny], "compile is off by default"


def test_plot_learning_curves_draws_each_term_and_validation_markers(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from mmlite.plot import plot_learning_curves

    records = [{"step": s, "loss": 3.0 / s, "itc": 2.0 / s, "lr": 1e-3, "samples_per_s": 100.0, "seconds": s}
               for s in range(1, 6)] + [{"step": 5, "split": "val", "recall@1": 0.4}]
    fig = plot_learning_curves(records)
    ax = fig.axes[0]
    labels = [line.get_label() for line in ax.get_lines()]
    assert labels == ["loss", "itc", "val recall@1"]
    assert list(ax.get_lines()[0].get_xdata()) == [1, 2, 3, 4, 5]
    assert ax.get_lines()[2].get_marker() == "o" and list(ax.get_lines()[2].get_ydata()) == [0.4]
    path = tmp_path / "log.jsonl"
    path.write_text("".join(__import__("json").dumps(r) + "\n" for r in records))
    fig2 = plot_learning_curves(str(path), keys=["itc"])
    assert [line.get_label() for line in fig2.axes[0].get_lines()] == ["itc"]
    with pytest.raises(ValueError, match=r"keys \['mlm'\] are in no record"):
        plot_learning_curves(records, keys=["mlm"])
    with pytest.raises(ValueError, match="no records"):
        plot_learning_curves([])
    import matplotlib.pyplot as plt

    plt.close("all")


def test_a_loss_module_runs_a_loss_that_calls_methods_and_unwraps_to_the_model(tmp_path):
    from mmlite.train import Checkpointing, LossModule, load_checkpoint

    torch.manual_seed(0)
    model = _Tiny()
    twin = _Tiny()
    twin.load_state_dict(model.state_dict())
    x = torch.randn(4, 3)

    def by_parts(m, b):  # calls submodules, as the book's contrastive and ALBEF losses do
        return m.norm(m.linear(b)).pow(2).mean() + m.embed.weight.pow(2).mean()

    seen = []
    fit(LossModule(model, by_parts), cycle([x]), lambda m, b: m(b), FitConfig(steps=2, warmup=0),
        after_step=lambda m: seen.append(type(m)), checkpointing=Checkpointing(tmp_path / "c.pt", every=2))
    fit(twin, cycle([x]), by_parts, FitConfig(steps=2, warmup=0))
    assert seen == [_Tiny, _Tiny] and unwrap(LossModule(model, by_parts)) is model
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b), "the wrapper changes nothing of the computation"
    assert set(load_checkpoint(tmp_path / "c.pt")["model"]) == set(model.state_dict()), "the bare model is stored"
