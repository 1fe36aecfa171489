"""Training and evaluation data for the generative vision-language model (chapter 5): the world's text as
conversations about an image, in the chat template of mmlite.tasks.vlm.

Every task turns one image's text into (question, answer) turns; encode_chat writes them as
[<image>] (<user> question <assistant> answer <end>)* and labels the answers and their <end>:

  caption    <user> describe the image <assistant> a red circle left of a blue square <end>
             The caption is drawn from the image's five per (index, epoch), like ShapesDataset's
             caption="random" (caption="first": always the first, the listing of every object).
  vqa        <user> what color is the large diamond ? <assistant> green <end>
             One of the image's questions (mmlite.data.questions), drawn per (index, epoch).
  reasoning  <user> what color is the circle below the large green diamond ? <assistant> yellow <end>
             One of the image's reasoning questions (mmlite.data.reasoning), drawn per (index, epoch).
  rationale  <user> reason step by step , what color is the circle below ... ? <assistant> the large green
             diamond is in the middle . the circle below it is ... . its color is yellow . so the answer is
             yellow <end>
             The same questions, answered "reason, then answer". The prefix tells the two tasks apart (the
             same question must not have two targets). A rationale of a query program ends with "its color is
             yellow", the others with "so the answer is X"; rationale_answer appends " . so the answer is X"
             only where it is missing, so every such answer ends with exactly one "so the answer is X" and
             final_answer() reads it back.
  dialogue   the image's whole dialogue (mmlite.data.dialogue), 3-5 turns, every answer labelled; "it" in
             a later question refers to an earlier turn, so the conversation stays in one sequence.

ChatDataset draws a task per (index, epoch) from `weights` (uniform by default), then the task's text, from
numpy.random.default_rng((seed, epoch, index)): like ShapesDataset, an item depends only on those three. The
instruction data (reasoning questions, dialogues) comes from mmlite.data.instruct.make_instructions with the
world's seed and relation margin, computed on first use and kept on the dataset.

TextDataset is stage 0, language-model pre-training on the world's text alone: no image and no chat
template, each item one plain document [BOS] text <end> with every token after [BOS] labelled, so the
decoder learns the grammar and vocabulary of captions, questions and answers (and the answer priors a
blind model can know) before it ever sees an image. The document of a task is its turns written one after
another, "question answer question answer ..." (a caption document is the caption alone). [BOS] gives the
first word something to be predicted from; <end> closes a document as it closes an answer in the chat.

prompts_for builds evaluation prompts (the last answer left open) with their references and the metadata
needed to score free-form answers per question type, family, hop count or dialogue turn. A dialogue is
evaluated turn by turn with teacher-forced history: the prompt for turn k holds turns 0..k-1 with their
true answers, so a wrong early answer does not change what later turns are asked about.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from mmlite.data import instruct
from mmlite.data.splits import Split
from mmlite.tasks.vlm import END, ChatBatch, ChatExample, chat_ids, chat_tokenizer, collate_chat, encode_chat
from mmlite.text import Tokenizer

TASKS: tuple[str, ...] = ("caption", "vqa", "reasoning", "rationale", "dialogue")
CAPTION_PROMPT = "describe the image"
RATIONALE_PREFIX = "reason step by step ,"
ANSWER_LEAD = "so the answer is"
# Words of the prompts above beyond mmlite.data.dataset.vocabulary() and instruct.VOCABULARY.
PROMPT_WORDS: tuple[str, ...] = ("describe", "reason", "step", "by", ",")
_INSTRUCTED = ("reasoning", "rationale", "dialogue")  # tasks that need make_instructions


def vlm_tokenizer() -> Tokenizer:
    """The chat tokenizer over every word this module emits: base vocabulary, chat tokens, instruction data,
    prompt words (mmlite.tasks.vlm.chat_tokenizer; the base and chat token ids do not move)."""
    return chat_tokenizer(extra_words=(*instruct.VOCABULARY, *PROMPT_WORDS))


def rationale_answer(rationale: str, answer: str) -> str:
    """The "reason, then answer" reply: the rationale, ending with exactly one "so the answer is <answer>"."""
    tail = f"{ANSWER_LEAD} {answer}"
    return rationale if rationale.endswith(tail) else f"{rationale} . {tail}"


def final_answer(reply: str) -> str | None:
    """The words after the last "so the answer is" of a reply (None without one): a rationale's answer."""
    words = reply.split()
    lead = ANSWER_LEAD.split()
    for k in range(len(words) - len(lead), -1, -1):
        if words[k:k + len(lead)] == lead:
            return " ".join(words[k + len(lead):]) or None
    return None


def _check_tasks(tasks: Sequence[str]) -> tuple[str, ...]:
    if isinstance(tasks, str):
        tasks = (tasks,)
    tasks = tuple(tasks)
    if not tasks:
        raise ValueError(f"tasks must name at least one of {TASKS}")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; the tasks are {TASKS}")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks must not repeat, got {tasks}")
    return tasks


def _check_weights(weights: Sequence[float] | None, tasks: tuple[str, ...]) -> np.ndarray:
    if weights is None:
        return np.full(len(tasks), 1 / len(tasks))
    w = np.asarray(weights, dtype=float)
    if w.shape != (len(tasks),) or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"weights must be {len(tasks)} non-negative numbers (one per task of {tasks}) with a "
                         f"positive sum, got {weights!r}")
    return w / w.sum()


def _turns_of(task: str, split: Split, records: list[dict] | None, index: int, u: float,
              caption: str) -> list[tuple[str, str]]:
    """The (question, answer) turns of one image for a task; u in [0, 1) picks the caption / question."""
    if task == "caption":
        captions = split.captions[index]
        return [(CAPTION_PROMPT, captions[0] if caption == "first" else captions[int(u * len(captions))])]
    if task == "vqa":
        questions = split.questions[index]
        question, answer, _ = questions[int(u * len(questions))]
        return [(question, answer)]
    if task == "dialogue":
        return [(t.question, t.answer) for t in records[index]["dialogue"]]
    qs = records[index]["reasoning"]
    q = qs[int(u * len(qs))]
    if task == "reasoning":
        return [(q.text, q.answer)]
    return [(f"{RATIONALE_PREFIX} {q.text}", rationale_answer(q.rationale, q.answer))]


def _has(task: str, split: Split, records: list[dict] | None, index: int) -> bool:
    if task == "caption":
        return bool(split.captions[index])
    if task == "vqa":
        return bool(split.questions[index])
    return bool(records[index]["dialogue" if task == "dialogue" else "reasoning"])


class _Base(Dataset):
    def __init__(self, split: Split, tokenizer: Tokenizer, tasks: Sequence[str], seed: int,
                 weights: Sequence[float] | None, instructions: list[dict] | None, world_seed: int | None,
                 margin: int, caption: str) -> None:
        if not isinstance(split, Split):
            raise TypeError(f"split must be a mmlite.data.Split, got {type(split).__name__}")
        chat_ids(tokenizer)  # a Tokenizer with the chat tokens
        self.tasks = _check_tasks(tasks)
        self.weights = _check_weights(weights, self.tasks)
        if caption not in ("random", "first"):
            raise ValueError(f"caption must be 'random' or 'first', got {caption!r}")
        if instructions is not None and len(instructions) != len(split):
            raise ValueError(f"instructions hold {len(instructions)} images, the split {len(split)}")
        self.split, self.tokenizer, self.seed, self.caption = split, tokenizer, seed, caption
        self.world_seed = seed if world_seed is None else world_seed
        self.margin = margin
        self._instructions = instructions

    @property
    def instructions(self) -> list[dict] | None:
        """make_instructions(split.objects, world_seed, split.name, margin), computed once on first use
        (None when no task needs it). Touch it before starting DataLoader workers to compute it only once."""
        if self._instructions is None and any(t in _INSTRUCTED for t in self.tasks):
            self._instructions = instruct.make_instructions(self.split.objects, self.world_seed, self.split.name,
                                                            self.margin)
        return self._instructions

    def __len__(self) -> int:
        return len(self.split)

    def _draw(self, key: int | tuple[int, int]) -> tuple[int, int, list[tuple[str, str]]]:
        """(index, task index, turns) of an item; the task is drawn among those the image has text for."""
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        index = int(index)
        if not 0 <= index < len(self.split):
            raise IndexError(f"index {index} out of range for a split of {len(self.split)} images")
        u = np.random.default_rng((self.seed, int(epoch), index)).random(2)  # task, text within the task
        records = self.instructions
        w = np.array([p if _has(t, self.split, records, index) else 0.0 for t, p in zip(self.tasks, self.weights)])
        if w.sum() <= 0:
            raise ValueError(f"image {index} has no text for any of the tasks {self.tasks}")
        k = min(int(np.searchsorted(np.cumsum(w / w.sum()), u[0], side="right")), len(w) - 1)
        while w[k] == 0:  # only reachable through rounding at the top end
            k -= 1
        return index, k, _turns_of(self.tasks[k], self.split, records, index, float(u[1]), self.caption)


class ChatDataset(_Base):
    """Conversations about the images of a split, one per visit, for VLM training.

    dataset[i] draws with epoch 0, dataset[(i, epoch)] that epoch's task and text (pass EpochSampler's pairs).
    An item: image (3, H, W) float32 in [0, 1]; image_index () long; task () long (index into self.tasks);
    ids (T,) long and labels (T,) bool from encode_chat. tasks: names from TASKS; weights: the chance of each
    (uniform by default; an image without text for a task, which the generator makes rare, draws among the
    rest). instructions: make_instructions' output for this split (computed from world_seed, default `seed`,
    and margin, the world's DataConfig.relation_margin, when not given). caption: "random" or "first".
    max_len: if given, an item of more ids raises (naming the task), so a preset's limit is checked at once.
    """

    def __init__(self, split: Split, tokenizer: Tokenizer, tasks: Sequence[str] = ("caption", "vqa", "reasoning",
                 "dialogue"), seed: int = 0, weights: Sequence[float] | None = None,
                 instructions: list[dict] | None = None, world_seed: int | None = None, margin: int = 15,
                 caption: str = "random", max_len: int | None = None) -> None:
        super().__init__(split, tokenizer, tasks, seed, weights, instructions, world_seed, margin, caption)
        self.max_len = max_len

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        index, k, turns = self._draw(key)
        ex = encode_chat(self.tokenizer, turns, image=True, strict=True)
        if self.max_len is not None and len(ex.ids) > self.max_len:
            raise ValueError(f"image {index}'s {self.tasks[k]} item has {len(ex.ids)} ids, more than "
                             f"max_len={self.max_len}")
        long = lambda v: torch.tensor(v, dtype=torch.long)  # noqa: E731
        return {
            "image": torch.from_numpy(self.split.images[index]).permute(2, 0, 1).float().contiguous() / 255,
            "image_index": long(index),
            "task": long(k),
            "ids": ex.ids,
            "labels": ex.labels,
        }


def encode_text(tokenizer: Tokenizer, text: str) -> ChatExample:
    """A plain document for language-model pre-training: [BOS] text <end>, every token after [BOS] labelled."""
    words = tokenizer.encode(text, strict=True)
    if not words:
        raise ValueError("text is empty")
    ids = [tokenizer.bos_id, *words, chat_ids(tokenizer)[END]]
    return ChatExample(torch.tensor(ids, dtype=torch.long), torch.tensor([False] + [True] * (len(ids) - 1)))


class TextDataset(_Base):
    """Stage 0: the world's text alone, as plain documents (see the module docstring); no image, no template.

    Items as ChatDataset's without "image": image_index, task, ids, labels (encode_text of the drawn task's
    turns written "question answer ..."; a caption document is the caption alone). Default tasks: captions
    and the world's questions with their answers.
    """

    def __init__(self, split: Split, tokenizer: Tokenizer, tasks: Sequence[str] = ("caption", "vqa"),
                 seed: int = 0, weights: Sequence[float] | None = None, instructions: list[dict] | None = None,
                 world_seed: int | None = None, margin: int = 15, caption: str = "random") -> None:
        super().__init__(split, tokenizer, tasks, seed, weights, instructions, world_seed, margin, caption)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        index, k, turns = self._draw(key)
        if self.tasks[k] == "caption":
            text = turns[0][1]
        else:
            text = " ".join(f"{q} {a}" for q, a in turns)
        ex = encode_text(self.tokenizer, text)
        long = lambda v: torch.tensor(v, dtype=torch.long)  # noqa: E731
        return {"image_index": long(index), "task": long(k), "ids": ex.ids, "labels": ex.labels}


def collate_chat_items(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor | None]:
    """Batch ChatDataset (or TextDataset) items: image (B, 3, H, W) (None for text items), image_index and task
    (B,), and collate_chat's inputs, input_mask, targets, target_mask (B, T-1). chat_batch(batch) gives the
    ChatBatch for vlm_loss(model, batch["image"], chat_batch(batch))."""
    if not items:
        raise ValueError("collate_chat_items got an empty list of items")
    cb = collate_chat([ChatExample(it["ids"], it["labels"]) for it in items])
    with_image = ["image" in it for it in items]
    if any(with_image) and not all(with_image):
        raise ValueError("a batch must not mix items with and without an image")
    return {
        "image": torch.stack([it["image"] for it in items]) if all(with_image) else None,
        "image_index": torch.stack([it["image_index"] for it in items]),
        "task": torch.stack([it["task"] for it in items]),
        **cb._asdict(),
    }


def chat_batch(batch: dict[str, torch.Tensor | None]) -> ChatBatch:
    """The ChatBatch fields of a collate_chat_items batch."""
    return ChatBatch(*(batch[name] for name in ChatBatch._fields))


class EvalPrompt(NamedTuple):
    """One prompt for generation with what to score the reply against."""

    image_index: int
    prompt: ChatExample  # encode_chat with the last answer None (collate_prompts left-pads a list of them)
    references: tuple[str, ...]  # the image's captions for "caption", else the one true answer
    meta: dict  # per task: question type / family, hops, answer / dialogue turn, kind, refers_back


def prompts_for(split: Split, tokenizer: Tokenizer, task: str, instructions: list[dict] | None = None,
                images: Sequence[int] | None = None) -> list[EvalPrompt]:
    """Every evaluation prompt of a task over a split's images (all, or those in `images`), in image order.

    caption: one per image, references = its captions, meta {}; vqa: one per question, meta {"type"};
    reasoning: one per reasoning question, meta {"family", "hops"}; rationale: the same questions with the
    prefix, reference the full reply, meta {"family", "hops", "answer"} (score final_answer(reply) against
    "answer"); dialogue: one per turn with the true earlier turns as history (teacher forcing), meta {"turn",
    "n_turns", "kind", "refers_back"}. instructions: make_instructions' output for the split (needed for
    reasoning, rationale and dialogue).
    """
    if not isinstance(task, str) or task not in TASKS:
        raise ValueError(f"unknown task {task!r}; the tasks are {TASKS}")
    chat_ids(tokenizer)
    if task in _INSTRUCTED and instructions is None:
        raise ValueError(f"task {task!r} needs instructions: make_instructions(split.objects, seed, split.name)")
    if instructions is not None and len(instructions) != len(split):
        raise ValueError(f"instructions hold {len(instructions)} images, the split {len(split)}")
    enc = lambda turns: encode_chat(tokenizer, turns, image=True, strict=True)  # noqa: E731
    out: list[EvalPrompt] = []
    for i in (range(len(split)) if images is None else images):
        i = int(i)
        if task == "caption":
            out.append(EvalPrompt(i, enc([(CAPTION_PROMPT, None)]), tuple(split.captions[i]), {}))
        elif task == "vqa":
            for question, answer, qtype in split.questions[i]:
                out.append(EvalPrompt(i, enc([(question, None)]), (answer,), {"type": qtype}))
        elif task == "dialogue":
            turns = instructions[i]["dialogue"]
            for k, t in enumerate(turns):
                history = [(p.question, p.answer) for p in turns[:k]]
                out.append(EvalPrompt(i, enc([*history, (t.question, None)]), (t.answer,),
                                      {"turn": k, "n_turns": len(turns), "kind": t.kind,
                                       "refers_back": t.refers_back}))
        else:
            for q in instructions[i]["reasoning"]:
                meta = {"family": q.family, "hops": q.hops}
                if task == "reasoning":
                    out.append(EvalPrompt(i, enc([(q.text, None)]), (q.answer,), meta))
                else:
                    out.append(EvalPrompt(i, enc([(f"{RATIONALE_PREFIX} {q.text}", None)]),
                                          (rationale_answer(q.rationale, q.answer),), {**meta, "answer": q.answer}))
    return out
