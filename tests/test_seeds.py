"""The seed offset that CI's perturbed pass uses, and the inline-figure switch of the chapters' setup."""

import pytest
import torch

from mmlite.utils import SEED_OFFSET_VAR, inline_figures, run_seed, seed_offset, setup


def test_no_offset_leaves_seeds_alone(monkeypatch):
    monkeypatch.delenv(SEED_OFFSET_VAR, raising=False)
    assert seed_offset() == 0 and [run_seed(s) for s in (0, 1, 5)] == [0, 1, 5]


def test_offset_moves_every_training_seed_to_unused_values(monkeypatch):
    monkeypatch.setenv(SEED_OFFSET_VAR, "2")
    moved = [run_seed(s) for s in range(10)]
    assert moved == [2000 + s for s in range(10)]
    assert not set(moved) & set(range(10))  # a chapter's "seed 1" run never becomes another's "seed 0"


def test_offset_changes_what_setup_draws(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv(SEED_OFFSET_VAR, raising=False)
        setup(seed=0, threads=1)
        a = torch.rand(4)
        monkeypatch.setenv(SEED_OFFSET_VAR, "1")
        setup(seed=0, threads=1)
        b = torch.rand(4)
        monkeypatch.setenv(SEED_OFFSET_VAR, "0")
        setup(seed=0, threads=1)
        assert torch.equal(torch.rand(4), a) and not torch.equal(a, b)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("bad", ["-1", "x", "1.5"])
def test_bad_offset_is_named(monkeypatch, bad):
    monkeypatch.setenv(SEED_OFFSET_VAR, bad)
    with pytest.raises(ValueError, match=SEED_OFFSET_VAR):
        seed_offset()


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_bad_run_seed(bad):
    with pytest.raises(ValueError, match="seed"):
        run_seed(bad)


def test_inline_figures_is_a_no_op_outside_a_kernel():
    import matplotlib

    backend = matplotlib.get_backend()
    assert inline_figures() is False and matplotlib.get_backend() == backend
