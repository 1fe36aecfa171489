"""Seeding, thread and device helpers."""

import pytest
import torch

from mmlite.utils import count_parameters, get_device, seed_everything, set_threads, setup


def test_seed_everything_repeats_draws():
    seed_everything(7)
    a = torch.rand(3)
    seed_everything(7)
    assert torch.equal(a, torch.rand(3))


@pytest.mark.parametrize("bad", [-1, 1.5, "0"])
def test_bad_seed_is_named(bad):
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        seed_everything(bad)


def test_threads_and_setup():
    before = torch.get_num_threads()
    try:
        assert setup(seed=0, threads=1) == torch.device("cpu")
        assert torch.get_num_threads() == 1
        with pytest.raises(ValueError, match="thread count"):
            set_threads(0)
    finally:
        torch.set_num_threads(before)


def _machine(monkeypatch, cuda: bool, mps: bool) -> None:
    """Pretend the machine has (or lacks) CUDA and MPS."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)


@pytest.mark.parametrize("cuda, mps, best", [(True, True, "cuda"), (True, False, "cuda"), (False, True, "mps"),
                                             (False, False, "cpu")])
def test_device_choice(monkeypatch, cuda, mps, best):
    _machine(monkeypatch, cuda, mps)
    assert get_device() == torch.device(best)  # cuda, then mps, then cpu
    assert get_device("cpu") == torch.device("cpu")  # an explicit choice wins
    if cuda:
        assert get_device("cuda:1") == torch.device("cuda", 1)
    else:
        with pytest.raises(ValueError, match="device 'cuda' was asked for"):
            get_device("cuda")
    if mps:
        assert get_device("mps") == torch.device("mps")
    else:
        with pytest.raises(ValueError, match="device 'mps' was asked for"):
            get_device("mps")


def test_count_parameters():
    m = torch.nn.Linear(3, 2)
    assert count_parameters(m) == 8
    m.bias.requires_grad_(False)
    assert count_parameters(m, trainable_only=True) == 6
