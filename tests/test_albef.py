"""The ALBEF/BLIP-style model, its pre-training task and its evaluation (mmlite.models.albef, mmlite.tasks.albef,
mmlite.evaluate.albef)."""

from __future__ import annotations

import math

import pytest
import torch

from mmlite.data import ANSWERS, DataConfig, build_tokenizer, collate, generate, make_loader
from mmlite.data.dataset import ShapesDataset
from mmlite.evaluate.albef import decode_captions, evaluate_albef
from mmlite.metrics import truth_matrix
from mmlite.models import ALBEF, ALBEFConfig
from mmlite.objectives import sample_hard_negatives
from mmlite.tasks import ALBEFObjectives, ALBEFPretraining, add_truth, albef_loss
from mmlite.tasks.albef import TERMS, itm_pairs

TOK = build_tokenizer()


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def world():
    return generate(DataConfig(n_train=48, n_val=8, n_test=24, n_comp=8), seed=1)


def small_config(**kw) -> ALBEFConfig:
    base = dict(vocab_size=len(TOK), n_answers=len(ANSWERS), d_model=32, d_embed=16, cnn_width=8, n_heads=2,
                text_depth=1, fusion_depth=1, decoder_depth=1, vit_depth=1)
    return ALBEFConfig(**{**base, **kw})


def batch_of(world, n=12, seed=0):
    loader = make_loader(world["train"], TOK, batch_size=n, shuffle=True, seed=seed)
    return add_truth(next(iter(loader)), TOK)


def test_config_refuses_impossible_values():
    with pytest.raises(ValueError, match="patch_size"):
        small_config(image_encoder="vit", patch_size=5)
    with pytest.raises(ValueError, match="n_heads"):
        small_config(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="image_encoder"):
        small_config(image_encoder="resnet")
    with pytest.raises(ValueError, match="fusion_depth"):
        small_config(fusion_depth=0)
    with pytest.raises(TypeError, match="d_model"):
        small_config(d_model=32.0)
    with pytest.raises(ValueError, match="dropout"):
        small_config(dropout=1.0)


@pytest.mark.parametrize("encoder", ["cnn", "vit"])
def test_every_path_has_the_documented_shapes(world, encoder):
    torch.manual_seed(0)
    model = ALBEF(small_config(image_encoder=encoder)).eval()
    b = batch_of(world, 6)
    image = model.encode_image(b["image"])
    n_tokens = 16 if encoder == "cnn" else (32 // 8) ** 2
    assert image.tokens.shape == (6, n_tokens, 32) and image.pooled.shape == (6, 32)
    text = model.encode_text(b["caption_ids"], b["caption_mask"])
    T = b["caption_ids"].shape[1]
    assert text.tokens.shape == (6, T, 32)
    z_i, z_t = model.image_embedding(image), model.text_embedding(text)
    torch.testing.assert_close(z_i.norm(dim=-1), torch.ones(6))
    torch.testing.assert_close(z_t.norm(dim=-1), torch.ones(6))
    fused = model.fuse(text, image)
    assert fused.shape == (6, T, 32)
    assert model.itm_logits(fused).shape == (6, 2)
    assert model.mlm_logits(fused).shape == (6, T, len(TOK))
    assert model.vqa_logits(fused).shape == (6, len(ANSWERS))
    assert model.caption_logits(image, b["caption_ids"], b["caption_mask"]).shape == (6, T, len(TOK))
    p = model.match_probability(b["image"], b["caption_ids"], b["caption_mask"])
    assert p.shape == (6,) and bool(((p >= 0) & (p <= 1)).all())
    with pytest.raises(ValueError, match="one image per text"):
        model.fuse(text, model.encode_image(b["image"][:3]))


def test_the_fused_text_attends_to_its_own_image(world):
    """Changing the image changes the fused tokens (cross-attention is wired), not the unimodal text tokens."""
    torch.manual_seed(0)
    model = ALBEF(small_config()).eval()
    b = batch_of(world, 4)
    text = model.encode_text(b["caption_ids"], b["caption_mask"])
    a = model.fuse(text, model.encode_image(b["image"]))
    c = model.fuse(text, model.encode_image(b["image"].flip(0)))
    assert not torch.allclose(a, c)
    torch.testing.assert_close(model.fuse(text, model.encode_image(b["image"])), a)


def test_the_loss_is_the_weighted_sum_of_its_terms(world):
    torch.manual_seed(0)
    model = ALBEF(small_config())
    b = batch_of(world)
    weights = dict(itc=0.5, itm=2.0, mlm=1.0, vqa=0.25, caption=3.0)
    torch.manual_seed(1)
    out = albef_loss(model, b, ALBEFObjectives(**weights), TOK)
    assert set(out) == {"loss", *TERMS}
    expected = sum(weights[t] * out[t] for t in TERMS)
    torch.testing.assert_close(out["loss"], expected)
    assert all(math.isfinite(float(v.detach())) for v in out.values())
    # at initialisation the caption and MLM losses are near log V and VQA's near log(answers)
    assert abs(float(out["vqa"]) - math.log(len(ANSWERS))) < 1.0
    assert abs(float(out["caption"]) - math.log(len(TOK))) < 1.5


@pytest.mark.parametrize("only", TERMS)
def test_a_switched_off_term_is_not_computed_and_trains_nothing(world, only):
    torch.manual_seed(0)
    model = ALBEF(small_config())
    b = batch_of(world)
    objectives = ALBEFObjectives(**{t: (1.0 if t == only else 0.0) for t in TERMS})
    out = albef_loss(model, b, objectives, TOK)
    assert set(out) == {"loss", only}
    out["loss"].backward()
    heads = {"itm": model.itm_head, "mlm": model.mlm_head, "vqa": model.vqa_head, "caption": model.decoder}
    for term, head in heads.items():
        grads = [p.grad for p in head.parameters()]
        if term == only:
            assert any(g is not None and bool(g.abs().sum() > 0) for g in grads), f"{term} head got no gradient"
        else:
            assert all(g is None for g in grads), f"{term} head trained although {only} is the only term"
    if only != "itc":
        assert model.logit_scale.value.grad is None


def test_objectives_refuse_bad_weights():
    with pytest.raises(ValueError, match="every weight is 0"):
        ALBEFObjectives(itc=0, itm=0, mlm=0, vqa=0, caption=0)
    with pytest.raises(ValueError, match="itm"):
        ALBEFObjectives(itm=-1)
    with pytest.raises(ValueError, match="mlm_prob"):
        ALBEFObjectives(mlm_prob=0)
    with pytest.raises(ValueError, match="false_negatives"):
        ALBEFObjectives(false_negatives="some")
    with pytest.raises(ValueError, match="caption"):
        ALBEFObjectives(caption=float("nan"))


def test_a_missing_batch_key_names_the_objective(world):
    model = ALBEF(small_config())
    b = batch_of(world)
    del b["question_ids"]
    with pytest.raises(KeyError, match="vqa"):
        albef_loss(model, b, ALBEFObjectives(), TOK)
    b = batch_of(world)
    del b["truth"]
    with pytest.raises(KeyError, match="truth"):
        albef_loss(model, b, ALBEFObjectives(), TOK)


def test_add_truth_is_the_worlds_truth_of_each_caption(world):
    b = batch_of(world, 16)
    texts = [TOK.decode(r) for r in b["caption_ids"]]
    expected = truth_matrix(b["objects"].numpy(), texts)
    assert torch.equal(b["truth"], torch.from_numpy(expected))
    assert bool(b["truth"].diagonal().all())  # every caption is true of its own image
    assert int(b["truth"].sum()) > 16  # and some are true of other images: the false negatives ITM must avoid


def test_hard_negatives_never_draw_an_excluded_pair():
    g = torch.Generator().manual_seed(0)
    b = 6
    sim = torch.randn(b, b, generator=g)
    exclude = torch.rand(b, b, generator=g) < 0.5
    exclude[2] = True  # image 2: every text is true of it, nothing to draw
    exclude[:, 4] = True  # text 4 is true of every image
    for _ in range(200):
        neg_t, neg_i = sample_hard_negatives(sim, generator=g, exclude=exclude)
        for i, j in enumerate(neg_t.tolist()):
            if i == 2:
                assert j == -1
            else:
                assert j != i and not exclude[i, j]
        for j, i in enumerate(neg_i.tolist()):
            if j == 4:
                assert i == -1
            else:
                assert i != j and not exclude[i, j]


def test_hard_negatives_without_exclusions_draw_as_before():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    sim = torch.randn(5, 5, generator=torch.Generator().manual_seed(0))
    a = sample_hard_negatives(sim, generator=g1)
    b = sample_hard_negatives(sim, generator=g2, exclude=torch.zeros(5, 5, dtype=torch.bool))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_itm_pairs_hold_no_false_negative(world):
    torch.manual_seed(0)
    model = ALBEF(small_config()).eval()
    b = batch_of(world, 16)
    image = model.encode_image(b["image"])
    text = model.encode_text(b["caption_ids"], b["caption_mask"])
    z_i, z_t = model.image_embedding(image), model.text_embedding(text)
    seen = 0
    for _ in range(20):
        logits, labels = itm_pairs(model, image, text, z_i, z_t, b["truth"])
        assert logits.shape == (len(labels), 2) and int(labels.sum()) == 16
        seen += int((labels == 0).sum())
    assert seen > 0
    # recompute the drawn pairs with the same random state and check them against the truth
    torch.manual_seed(5)
    sim = model.logit_scale().detach() * (z_i @ z_t.T)
    neg_t, neg_i = sample_hard_negatives(sim, exclude=b["truth"])
    for i, j in enumerate(neg_t.tolist()):
        assert j == -1 or not b["truth"][i, j]
    for j, i in enumerate(neg_i.tolist()):
        assert i == -1 or not b["truth"][i, j]


def test_the_pretraining_module_is_the_loss_and_clamps_the_temperature(world):
    torch.manual_seed(0)
    task = ALBEFPretraining(ALBEF(small_config()), ALBEFObjectives(), TOK)
    b = batch_of(world)
    torch.manual_seed(1)
    out = task(b)
    torch.manual_seed(1)
    expected = albef_loss(task.model, b, task.objectives, TOK)
    torch.testing.assert_close(out["loss"], expected["loss"])
    assert all(k.startswith("model.") for k in task.state_dict())
    with torch.no_grad():
        task.model.logit_scale.value.fill_(10.0)
    task.after_step()
    assert float(task.model.logit_scale.value.detach()) == pytest.approx(math.log(100.0))


def test_a_short_training_run_lowers_every_term(world):
    """Twelve AdamW steps on one repeated batch: each term falls (a wiring check, not a quality claim)."""
    torch.manual_seed(0)
    task = ALBEFPretraining(ALBEF(small_config()), ALBEFObjectives(), TOK)
    b = batch_of(world, 16)
    opt = torch.optim.AdamW(task.parameters(), lr=3e-3)
    torch.manual_seed(2)
    first = {k: float(v.detach()) for k, v in task(b).items()}
    for _ in range(12):
        out = task(b)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        task.after_step()
    torch.manual_seed(2)
    last = {k: float(v.detach()) for k, v in task(b).items()}
    for term in ("loss", "itc", "mlm", "vqa", "caption"):
        assert last[term] < first[term], f"{term}: {first[term]:.3f} -> {last[term]:.3f}"


def test_evaluation_reports_every_figure_with_an_interval(world):
    torch.manual_seed(0)
    model = ALBEF(small_config())
    ev = evaluate_albef(model, world["test"], TOK, k_rerank=4, n_bootstrap=30, batch_size=10)
    expected = {"i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5", "i2t_r1_itm", "i2t_r5_itm", "t2i_r1_itm", "t2i_r5_itm",
                "t2i_r1_ceiling", "t2i_r5_ceiling", "i2t_r1_ceiling", "itm_acc", "itm_auc", "vqa_acc", "bleu4",
                "cider", "caption_precision", "t2i_r1_first", "t2i_r5_first_itm", "t2i_r1_first_ceiling",
                "i2t_r5_first"}
    assert expected <= set(ev.metrics)
    for name, m in ev.metrics.items():
        assert m["low"] <= m["value"] <= m["high"], name
        assert all(math.isfinite(v) for v in m.values()), name
    n = len(world["test"])
    assert ev.similarity.shape == (n, 5 * n) and len(ev.captions) == n
    assert [len(a) for a in ev.answers] == [len(q) for q in world["test"].questions]
    # the ITC figures are those of the similarity matrix it returns
    from mmlite.metrics import retrieval_recall
    r = retrieval_recall(ev.similarity, ev.text_to_image, ks=(1, 5))
    assert ev.metrics["t2i_r1"]["value"] == pytest.approx(r["t2i_r1"])
    assert ev.metrics["i2t_r5"]["value"] == pytest.approx(r["i2t_r5"])
    assert model.training  # evaluation puts the model back in the mode it found


def test_decoded_captions_are_what_greedy_decoding_gives(world):
    from mmlite.models import greedy_decode

    torch.manual_seed(0)
    model = ALBEF(small_config()).eval()
    images = world["test"].image_tensor(list(range(3)))
    with torch.no_grad():
        caps = decode_captions(model, images, TOK)
        image = model.encode_image(images)
        ids = greedy_decode(model.decoder, TOK.bos_id, TOK.eos_id, model.cfg.max_len - 1, context=image.tokens,
                            context_mask=image.mask)
    assert caps == [TOK.decode(r) for r in ids]
    assert len(caps) == 3


def test_a_scene_without_a_negative_still_makes_an_item():
    """The rare scene the grammar cannot falsify gets an empty negative and kind -1, not an IndexError."""
    w = generate(DataConfig(n_train=64, n_val=4, n_test=4, n_comp=4), seed=0)
    split = w["train"]
    empty = [i for i in range(len(split)) if not split.negatives[i]]
    assert empty, "seed 0 with 64 images holds such a scene (found while building the trainer)"
    item = ShapesDataset(split, TOK)[empty[0]]
    assert int(item["negative_kind"]) == -1
    assert item["negative_ids"].tolist() == [TOK.bos_id, TOK.eos_id]
    collate([ShapesDataset(split, TOK)[i] for i in range(len(split))])  # every item of the split batches
