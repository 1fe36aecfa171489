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
