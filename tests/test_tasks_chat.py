"""Tests for mmlite.tasks.chat: the VLM's training conversations, stage-0 text and evaluation prompts."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from mmlite.data import DataConfig, build_tokenizer, generate
from mmlite.tasks.chat import (ANSWER_LEAD, CAPTION_PROMPT, RATIONALE_PREFIX, TASKS, ChatDataset, TextDataset,
                              chat_batch, collate_chat_items, final_answer, prompts_for, rationale_answer,
                              vlm_tokenizer)
from mmlite.data.instruct import make_instructions
from mmlite.models.vlm import VLM
from mmlite.tasks.vlm import ASSISTANT, END, IMAGE, USER, ChatBatch, collate_prompts, vlm_config, vlm_loss

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

SEED = 3
CONFIG = DataConfig(n_train=300, n_val=0, n_test=0, n_comp=100, image_size=16)
TOK = vlm_tokenizer()
# Longest ids (placeholder and template included) measured over 2,000 train and 500 comp images of seed 0:
# caption 29, vqa 19, reasoning 33, rationale 139, dialogue 70. The bounds leave a little room.
MAX_IDS = {"caption": 32, "vqa": 24, "reasoning": 40, "rationale": 150, "dialogue": 80}


@pytest.fixture(scope="module")
def world():
    return generate(CONFIG, SEED)


@pytest.fixture(scope="module")
def records(world):
    return {name: make_instructions(world[name].objects, SEED, name, CONFIG.relation_margin)
            for name in ("train", "comp")}


def _dataset(world, records, name="train", **kw):
    kw.setdefault("tasks", TASKS)
    return ChatDataset(world[name], TOK, seed=1, instructions=records[name], **kw)


def _spans(ids, labels):
    """The decoded runs of labelled tokens, each ending with <end>."""
    out, run = [], []
    for i, lab in zip(ids.tolist(), labels.tolist()):
        if lab:
            run.append(TOK.vocab[i])
            if TOK.vocab[i] == END:
                out.append(" ".join(run))
                run = []
        else:
            assert not run, "a labelled run must end with <end>"
    assert not run
    return out


def _user_turns(ids):
    words = [TOK.vocab[i] for i in ids.tolist()]
    turns, k = [], 0
    while USER in words[k:]:
        k = words.index(USER, k) + 1
        j = words.index(ASSISTANT, k)
        turns.append(" ".join(words[k:j]))
    return turns


# --------------------------------------------------------------------------- tokenizer and templates


def test_tokenizer_covers_every_text(world, records):
    for name in ("train", "comp"):
        for task in TASKS:
            for p in prompts_for(world[name], TOK, task, records[name]):  # strict encode_chat: raises if unknown
                for ref in p.references:
                    TOK.encode(ref, strict=True)
            ds = _dataset(world, records, name, tasks=(task,))
            text = TextDataset(world[name], TOK, tasks=(task,), seed=1, instructions=records[name])
            for i in range(len(ds)):
                assert TOK.unk_id not in ds[i]["ids"].tolist()
                assert TOK.unk_id not in text[i]["ids"].tolist()


def test_rationale_answer_has_one_lead(records):
    seen = set()
    for rec in records["train"]:
        for q in rec["reasoning"]:
            reply = rationale_answer(q.rationale, q.answer)
            assert reply.count(ANSWER_LEAD) == 1 and reply.endswith(f"{ANSWER_LEAD} {q.answer}")
            assert final_answer(reply) == q.answer
            seen.add(q.rationale.endswith(ANSWER_LEAD + " " + q.answer))
    assert seen == {True, False}  # both kinds of rationale ending occur
    assert final_answer("its color is blue") is None


def test_items_are_deterministic(world, records):
    a, b = _dataset(world, records), _dataset(world, records)
    for key in [0, (0, 0), (5, 2), (299, 7)]:
        x, y = a[key], b[key]
        assert set(x) == {"image", "image_index", "task", "ids", "labels"}
        for k in x:
            assert torch.equal(x[k], y[k])
    assert torch.equal(a[3]["ids"], a[(3, 0)]["ids"])
    other_epoch = sum(not torch.equal(a[(i, 0)]["ids"], a[(i, 1)]["ids"]) for i in range(50))
    other_seed = ChatDataset(world["train"], TOK, tasks=TASKS, seed=2, instructions=records["train"])
    assert other_epoch > 25 and sum(not torch.equal(a[i]["ids"], other_seed[i]["ids"]) for i in range(50)) > 25
    item = a[(7, 3)]
    assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.float32
    assert 0 <= item["image"].min() and item["image"].max() <= 1
    assert torch.equal(item["image"], world["train"].image_tensor([7])[0])


def test_lazy_instructions_match(world, records):
    lazy = ChatDataset(world["train"], TOK, tasks=TASKS, seed=1, world_seed=SEED)
    given = _dataset(world, records)
    for key in [(0, 0), (11, 4), (123, 1)]:
        assert torch.equal(lazy[key]["ids"], given[key]["ids"])
    assert ChatDataset(world["train"], TOK, tasks=("caption", "vqa")).instructions is None


def test_labels_are_exactly_the_answers(world, records):
    s, rec = world["train"], records["train"]
    ds = _dataset(world, records)
    counts = Counter()
    for i in range(0, len(s), 3):
        for epoch in range(2):
            item = ds[(i, epoch)]
            ids, labels, task = item["ids"], item["labels"], ds.tasks[int(item["task"])]
            counts[task] += 1
            assert ids[0] == TOK.token_to_id[IMAGE] and int((ids == TOK.token_to_id[IMAGE]).sum()) == 1
            answers, questions = [sp[:-len(END) - 1] for sp in _spans(ids, labels)], _user_turns(ids)
            assert len(answers) == len(questions)
            if task == "caption":
                assert questions == [CAPTION_PROMPT] and answers[0] in s.captions[i]
            elif task == "vqa":
                assert (questions[0], answers[0]) in [(q, a) for q, a, _ in s.questions[i]]
            elif task == "reasoning":
                assert (questions[0], answers[0]) in [(q.text, q.answer) for q in rec[i]["reasoning"]]
            elif task == "rationale":
                assert (questions[0], answers[0]) in [(f"{RATIONALE_PREFIX} {q.text}",
                                                       rationale_answer(q.rationale, q.answer))
                                                      for q in rec[i]["reasoning"]]
            else:
                assert questions == [t.question for t in rec[i]["dialogue"]]
                assert answers == [t.answer for t in rec[i]["dialogue"]]
    assert set(counts) == set(TASKS)


def test_first_caption(world, records):
    ds = _dataset(world, records, tasks=("caption",), caption="first")
    for i in range(20):
        assert _spans(ds[(i, i)]["ids"], ds[(i, i)]["labels"]) == [f"{world['train'].captions[i][0]} {END}"]


def test_task_mixing_frequencies(world, records):
    weights = np.array([1.0, 2.0, 3.0, 0.0, 4.0])
    ds = _dataset(world, records, weights=weights)
    n_epochs, n = 4, len(world["train"])
    counts = np.bincount([int(ds[(i, e)]["task"]) for e in range(n_epochs) for i in range(n)], minlength=len(TASKS))
    total, p = n * n_epochs, weights / weights.sum()
    assert counts[3] == 0
    assert np.all(np.abs(counts - total * p) <= 4 * np.sqrt(total * p * (1 - p)) + 1), counts
    uniform = _dataset(world, records)
    counts = np.bincount([int(uniform[(i, 0)]["task"]) for i in range(n)], minlength=len(TASKS))
    assert np.all(np.abs(counts - n / 5) <= 4 * np.sqrt(n * 0.2 * 0.8)), counts


def test_bad_arguments(world, records):
    with pytest.raises(ValueError, match="unknown task.*captions"):
        ChatDataset(world["train"], TOK, tasks=("captions",))
    with pytest.raises(ValueError, match="unknown task"):
        TextDataset(world["train"], TOK, tasks=("image",))
    with pytest.raises(ValueError, match="unknown task 'qa'"):
        prompts_for(world["train"], TOK, "qa", records["train"])
    with pytest.raises(ValueError, match="needs instructions"):
        prompts_for(world["train"], TOK, "dialogue")
    with pytest.raises(ValueError, match="weights"):
        ChatDataset(world["train"], TOK, tasks=("caption", "vqa"), weights=(1.0,))
    with pytest.raises(ValueError, match="weights"):
        ChatDataset(world["train"], TOK, tasks=("caption", "vqa"), weights=(0, 0))
    with pytest.raises(ValueError, match="instructions hold"):
        ChatDataset(world["train"], TOK, instructions=records["comp"])
    with pytest.raises(IndexError):
        ChatDataset(world["train"], TOK, tasks=("vqa",))[len(world["train"])]
    with pytest.raises(ValueError, match="chat tokens"):
        ChatDataset(world["train"], build_tokenizer(), tasks=("vqa",))
    with pytest.raises(ValueError, match="max_len=10"):
        _dataset(world, records, tasks=("dialogue",), max_len=10)[0]


def test_lengths_fit(world, records):
    for name in ("train", "comp"):
        for task in TASKS:
            longest = max(len(p.prompt.ids) + max(len(TOK.tokenize(r)) for r in p.references) + 1
                          for p in prompts_for(world[name], TOK, task, records[name]))
            assert longest <= MAX_IDS[task], (name, task, longest)
        ds = _dataset(world, records, name, max_len=max(MAX_IDS.values()))
        for i in range(len(ds)):
            assert len(ds[i]["ids"]) <= MAX_IDS[ds.tasks[int(ds[i]["task"])]]


# --------------------------------------------------------------------------- stage 0: text alone


def test_text_dataset(world, records):
    s, rec = world["train"], records["train"]
    ds = TextDataset(s, TOK, tasks=("caption", "vqa", "dialogue"), seed=1, instructions=rec)
    chat_words = {TOK.token_to_id[t] for t in (IMAGE, USER, ASSISTANT)}
    for i in range(40):
        item = ds[(i, 1)]
        assert set(item) == {"image_index", "task", "ids", "labels"}
        ids, labels = item["ids"].tolist(), item["labels"].tolist()
        assert ids[0] == TOK.bos_id and ids[-1] == TOK.token_to_id[END] and not chat_words & set(ids)
        assert labels == [False] + [True] * (len(ids) - 1)
        text, task = TOK.decode(ids[1:-1]), ds.tasks[int(item["task"])]
        if task == "caption":
            assert text in s.captions[i]
        elif task == "vqa":
            assert text in [f"{q} {a}" for q, a, _ in s.questions[i]]
        else:
            assert text == " ".join(f"{t.question} {t.answer}" for t in rec[i]["dialogue"])
    batch = collate_chat_items([ds[i] for i in range(4)])
    assert batch["image"] is None and batch["task"].shape == (4,)


# --------------------------------------------------------------------------- batches into the model


def test_collate_feeds_vlm_loss(world, records):
    ds = _dataset(world, records)
    items = [ds[(i, 2)] for i in range(6)]
    batch = collate_chat_items(items)
    assert batch["image"].shape == (6, 3, 16, 16) and batch["image_index"].tolist() == list(range(6))
    cb = chat_batch(batch)
    assert isinstance(cb, ChatBatch) and cb.inputs.shape == cb.targets.shape == cb.target_mask.shape
    assert int(cb.target_mask.sum()) == sum(int(it["labels"][1:].sum()) for it in items)
    torch.manual_seed(0)
    model = VLM(vlm_config(TOK, image_size=16, cnn_width=4, cnn_depth=2, d_vision=8, d_model=16, n_heads=2,
                           depth=1, max_len=MAX_IDS["rationale"] + 16))
    assert torch.isfinite(vlm_loss(model, batch["image"], cb))
    text = TextDataset(world["train"], TOK, seed=1)
    tb = collate_chat_items([text[i] for i in range(6)])
    assert torch.isfinite(vlm_loss(model, tb["image"], chat_batch(tb)))
    with pytest.raises(ValueError, match="mix"):
        collate_chat_items([items[0], text[0]])


# --------------------------------------------------------------------------- evaluation prompts


def test_prompts_for(world, records):
    s, rec = world["comp"], records["comp"]
    assist = TOK.token_to_id[ASSISTANT]
    caps = prompts_for(s, TOK, "caption")
    assert [p.references for p in caps] == [tuple(c) for c in s.captions]
    vqa = prompts_for(s, TOK, "vqa", images=[4, 2])
    assert [p.image_index for p in vqa] == [4] * 6 + [2] * 6
    assert [(p.references[0], p.meta["type"]) for p in vqa] == [(a, t) for i in (4, 2) for _, a, t in s.questions[i]]
    reasoning = prompts_for(s, TOK, "reasoning", rec)
    assert [(p.references[0], p.meta["family"], p.meta["hops"]) for p in reasoning] == \
        [(q.answer, q.family, q.hops) for r in rec for q in r["reasoning"]]
    rationale = prompts_for(s, TOK, "rationale", rec)
    assert [p.meta["answer"] for p in rationale] == [q.answer for r in rec for q in r["reasoning"]]
    assert all(final_answer(p.references[0]) == p.meta["answer"] for p in rationale)
    dialogue = prompts_for(s, TOK, "dialogue", rec)
    assert [(p.references[0], p.meta["kind"], p.meta["refers_back"]) for p in dialogue] == \
        [(t.answer, t.kind, t.refers_back) for r in rec for t in r["dialogue"]]
    for p in caps + vqa + reasoning + rationale + dialogue:
        assert p.prompt.ids[-1] == assist and not bool(p.prompt.labels[-1])
    # teacher-forced history: turn k's prompt holds the true answers of turns 0..k-1
    p = next(p for p in dialogue if p.meta["turn"] == 2)
    turns = rec[p.image_index]["dialogue"]
    assert _spans(p.prompt.ids, p.prompt.labels) == [f"{t.answer} {END}" for t in turns[:2]]
    assert _user_turns(p.prompt.ids) == [t.question for t in turns[:3]]
    ids, mask = collate_prompts([q.prompt for q in dialogue[:5]])
    assert ids.shape[0] == 5 and bool(mask[:, -1].all())
