"""Tests for mmlite.train.groups: which parameters decay, per-component learning rates."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mmlite.adapt import freeze, trainable_parameters
from mmlite.train import param_groups
from test_adapt import TinyDualEncoder  # the model with every kind of parameter


def test_param_groups_partition_and_decay_rule():
    model = TinyDualEncoder()
    freeze(model.image_encoder.stages[0])
    groups = param_groups(model, lr=1e-3, weight_decay=0.1,
                          lr_overrides={"image_encoder": 1e-4, "image_encoder.proj": 5e-4})
    seen = [id(p) for g in groups for p in g["params"]]
    expected = [id(p) for p in trainable_parameters(model)]
    assert len(seen) == len(set(seen)) and sorted(seen) == sorted(expected)  # each trainable param exactly once
    by_name = {n: g for g in groups for n in g["names"]}
    assert not any(n.startswith("image_encoder.stages.0.") for n in by_name)  # frozen ones left out
    decayed = {n for n, g in by_name.items() if g["weight_decay"] > 0}
    assert decayed == {
        "image_encoder.stages.1.0.0.weight", "image_encoder.stages.1.1.0.weight", "image_encoder.proj.weight",
        "text_encoder.stack.blocks.0.attn.q_proj.weight", "text_encoder.stack.blocks.0.attn.k_proj.weight",
        "text_encoder.stack.blocks.0.attn.v_proj.weight", "text_encoder.stack.blocks.0.attn.out_proj.weight",
        "text_encoder.stack.blocks.0.ff.linear1.weight", "text_encoder.stack.blocks.0.ff.linear2.weight",
        "image_proj.weight", "text_proj.weight",
    }  # embeddings, positions, class token, norms, biases and the logit scale are not decayed
    assert by_name["image_encoder.stages.1.0.0.weight"]["lr"] == 1e-4
    assert by_name["image_encoder.proj.weight"]["lr"] == 5e-4  # the longest prefix wins
    assert by_name["text_proj.weight"]["lr"] == 1e-3
    torch.optim.AdamW(groups)  # the groups are valid optimizer input


def test_param_groups_rejects_unknown_prefix():
    model = TinyDualEncoder()
    with pytest.raises(ValueError, match="image"):
        param_groups(model, 1e-3, 0.1, lr_overrides={"image": 1e-4})  # whole components only
    freeze(model.text_encoder)
    with pytest.raises(ValueError, match="text_encoder"):
        param_groups(model, 1e-3, 0.1, lr_overrides={"text_encoder": 1e-4})


def test_a_tied_parameter_is_grouped_once_by_its_first_owner():
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight  # tied, as an LM head is to its token embedding
    model = nn.Sequential(emb, head)
    groups = param_groups(model, lr=1e-3, weight_decay=0.1)
    params = [p for g in groups for p in g["params"]]
    assert len(params) == 1 and params[0] is emb.weight
    assert [g["weight_decay"] for g in groups] == [0.0]  # an embedding table is never decayed
    torch.optim.AdamW(groups)  # torch accepts the groups (it refuses a parameter in two groups)
