"""The shipped small run (data/models/small): complete, loadable with weights_only, and its weights still give the
figures its metrics.json stored for the first 200 test images."""

from __future__ import annotations

import json

import pytest
import torch

from mmlite.data.splits import generate
from mmlite.evaluate.albef import evaluate_albef
from mmlite.experiment.run import SHIP_COMMAND, SHIPPED_SMALL, _head, flat_config, load_run
from mmlite.train import load_checkpoint

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not (SHIPPED_SMALL / "model.pt").is_file(),
                                 reason=f"no shipped model: make it with {SHIP_COMMAND}")]


def test_shipped_run_is_complete_and_small():
    names = {p.name for p in SHIPPED_SMALL.iterdir()}
    assert {"config.json", "model.pt", "metrics.json", "log.jsonl", "report.md"} <= names
    assert "checkpoint.pt" not in names  # --ship keeps the weights only (no optimiser state)
    assert (SHIPPED_SMALL / "model.pt").stat().st_size < 8e6
    config = json.loads((SHIPPED_SMALL / "config.json").read_text())
    assert config["fit"]["steps"] == json.loads((SHIPPED_SMALL / "metrics.json").read_text())["steps"]


def test_shipped_weights_load_with_weights_only_and_match_the_config():
    state = load_checkpoint(SHIPPED_SMALL / "model.pt")  # torch.load(weights_only=True) inside
    model, _, job, _ = load_run(SHIPPED_SMALL)
    assert state["config"] == flat_config(job)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state["model"].items())


def test_shipped_weights_reproduce_the_stored_slice():
    model, tokenizer, job, metrics = load_run(SHIPPED_SMALL)
    stored = metrics["slice"]
    # a split depends only on its own size and the seed, so the other splits can be made tiny here
    data = job.data.replace(n_train=job.job.batch_size, n_val=8, n_comp=8)
    split = _head(generate(data, job.job.data_seed)[stored["split"]], stored["images"])
    ev = evaluate_albef(model, split, tokenizer, k_rerank=min(job.job.k_rerank, stored["images"]), n_bootstrap=10,
                        margin=job.data.relation_margin)
    checked = [k for k in ("t2i_r1_first", "i2t_r1_first", "t2i_r5", "itm_acc", "itm_auc", "vqa_acc", "bleu4",
                           "caption_precision") if k in stored]
    assert len(checked) == 8
    for key in checked:
        # another CPU rounds differently; a rank or an argmax on a near-tie may flip for a few of 200 queries
        assert ev.metrics[key]["value"] == pytest.approx(stored[key], abs=0.02), key
