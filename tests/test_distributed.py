"""The contrastive loss across processes: 2 CPU ranks (gloo) against the single-process loss of the whole batch."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mmlite.objectives import contrastive_loss

W, B, D = 2, 4, 6


def _features():
    g = torch.Generator().manual_seed(0)
    return torch.randn(W * B, D, generator=g), torch.randn(W * B, D, generator=g)


def _rank(rank: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=W)
    try:
        img, txt = _features()
        zi = img[rank * B:(rank + 1) * B].clone().requires_grad_(True)
        zt = txt[rank * B:(rank + 1) * B].clone().requires_grad_(True)
        loss, logits = contrastive_loss(zi, zt, 10.0, return_logits=True, gather=True)
        loss.backward()
        out[rank] = (loss.item(), tuple(logits.shape), zi.grad.clone(), zt.grad.clone())
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available(), reason="torch built without torch.distributed")
def test_gathered_contrastive_loss_is_the_whole_batch_loss():
    img, txt = _features()
    img.requires_grad_(True)
    txt.requires_grad_(True)
    whole = contrastive_loss(img, txt, 10.0)
    whole.backward()
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank, args=(_free_port(), out), nprocs=W, join=True)
        out = dict(out)
    losses = [out[r][0] for r in range(W)]
    assert all(out[r][1] == (B, W * B) for r in range(W))  # each rank's rows against the global batch
    assert losses[0] != pytest.approx(losses[1])  # the ranks see different positives
    assert sum(losses) / W == pytest.approx(whole.item(), rel=1e-5)
    # each rank's gradient is W times its rows' share of the whole loss's; DDP's average divides by W again
    for r in range(W):
        rows = slice(r * B, (r + 1) * B)
        torch.testing.assert_close(out[r][2] / W, img.grad[rows], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(out[r][3] / W, txt.grad[rows], atol=1e-6, rtol=1e-5)


def test_gather_without_a_process_group_is_the_plain_loss():
    img, txt = _features()
    assert torch.equal(contrastive_loss(img, txt, 10.0, gather=True), contrastive_loss(img, txt, 10.0))
