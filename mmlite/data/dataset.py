"""Tokenizer, torch Dataset, batching and loaders for the shapes world (derived in chapter 1)."""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from mmlite.data.grammar import NEGATIVE_KINDS
from mmlite.data.questions import ANSWERS, QUESTION_TYPES
from mmlite.data.semantics import COUNT_INTROS, LISTING_INTROS, NOUN_PLURALS, NOUNS, RELATION_PHRASES
from mmlite.data.splits import Split
from mmlite.data.world import COLORS, NUMBERS, SHAPE_PLURALS, SHAPES, SIZES
from mmlite.text import Tokenizer

# Function words of the caption and question templates (mmlite.data.grammar, mmlite.data.questions).
_TEMPLATE_WORDS = ("a an the and is are there what how many in image color shape size ?")


def vocabulary() -> list[str]:
    """Every word the grammar can emit in captions, questions and answers, sorted."""
    words = set(_TEMPLATE_WORDS.split())
    for group in (SHAPES, SHAPE_PLURALS, COLORS, SIZES, NUMBERS, NOUNS, NOUN_PLURALS, ANSWERS):
        words.update(group)
    for phrase in (*LISTING_INTROS, *COUNT_INTROS, *(p for ps in RELATION_PHRASES for p in ps)):
        words.update(phrase.split())
    return sorted(words)


def build_tokenizer() -> Tokenizer:
    """A word-level tokenizer over vocabulary()."""
    return Tokenizer(vocabulary())


class ShapesDataset(Dataset):
    """Items of a split as tensors, with a random caption, hard negative and question per visit.

    dataset[i] draws with epoch 0; dataset[(i, epoch)] draws that epoch's choices (the loaders of
    make_loader pass epochs, so each epoch sees other captions). An item holds:
      image (3, H, W) float32 in [0, 1]; image_index and caption_index () long;
      objects (MAX_OBJECTS, 6) long (columns mmlite.data.world.FIELDS);
      caption_ids, negative_ids, question_ids (T,) long, each wrapped as [BOS] ... [EOS];
      negative_kind () long (index into NEGATIVE_KINDS; -1 with negative_ids [BOS] [EOS] for the rare scene
      that has no negative); answer () long (index into ANSWERS);
      question_type () long (index into QUESTION_TYPES).
    """

    def __init__(self, split: Split, tokenizer: Tokenizer, caption: str | int = "random", seed: int = 0,
                 question: str | int = "random") -> None:
        if not isinstance(split, Split):
            raise TypeError(f"split must be a mmlite.data.Split, got {type(split).__name__}")
        if not isinstance(tokenizer, Tokenizer):
            raise TypeError(f"tokenizer must be a mmlite.text.Tokenizer, got {type(tokenizer).__name__}")
        n_captions = len(split.captions[0]) if len(split) else 0
        if caption not in ("random", "first") and not (isinstance(caption, int) and 0 <= caption < n_captions):
            raise ValueError(f"caption must be 'random', 'first' or an index in 0..{n_captions - 1}, got {caption!r}")
        n_questions = len(QUESTION_TYPES)
        if question != "random" and not (isinstance(question, int) and 0 <= question < n_questions):
            raise ValueError(f"question must be 'random' or an index in 0..{n_questions - 1}, got {question!r}")
        self.split, self.tokenizer, self.caption, self.seed, self.question = split, tokenizer, caption, seed, question

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        index = int(index)
        if not 0 <= index < len(self.split):
            raise IndexError(f"index {index} out of range for a split of {len(self.split)} images")
        s, enc = self.split, self.tokenizer.encode
        u = np.random.default_rng((self.seed, int(epoch), index)).random(3)  # caption, negative, question
        captions = s.captions[index]
        c = int(u[0] * len(captions)) if self.caption == "random" else 0 if self.caption == "first" else self.caption
        negs = s.negatives[index]
        # a scene the grammar cannot falsify (about 1 in 1,300: one object, every edit held out) has no negative
        negative, kind = negs[int(u[1] * len(negs))] if negs else ("", None)
        questions = s.questions[index]
        q = int(u[2] * len(questions)) if self.question == "random" else self.question
        question, answer, qtype = questions[q]
        long = lambda v: torch.tensor(v, dtype=torch.long)  # noqa: E731
        return {
            "image": torch.from_numpy(s.images[index]).permute(2, 0, 1).float().contiguous() / 255,  # (3, H, W)
            "image_index": long(index),
            "objects": torch.from_numpy(s.objects[index].astype(np.int64)),
            "caption_index": long(c),
            "caption_ids": long(enc(captions[c], add_bos_eos=True, strict=True)),
            "negative_ids": long(enc(negative, add_bos_eos=True, strict=True)),
            "negative_kind": long(NEGATIVE_KINDS.index(kind) if kind is not None else -1),
            "question_ids": long(enc(question, add_bos_eos=True, strict=True)),
            "answer": long(ANSWERS.index(answer)),
            "question_type": long(QUESTION_TYPES.index(qtype)),
        }


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack items into a batch; each "<name>_ids" is right-padded with [PAD] (id 0) to the batch's
    longest and gets a "<name>_mask" (B, T) bool, True = real token."""
    if not items:
        raise ValueError("collate got an empty list of items")
    batch = {}
    for key in items[0]:
        values = [item[key] for item in items]
        if key.endswith("_ids"):
            T = max(len(v) for v in values)
            ids = torch.zeros((len(values), T), dtype=torch.long)  # (B, T), 0 = [PAD]
            mask = torch.zeros((len(values), T), dtype=torch.bool)  # (B, T)
            for b, v in enumerate(values):
                ids[b, :len(v)] = v
                mask[b, :len(v)] = True
            batch[key], batch[key[:-4] + "_mask"] = ids, mask
        else:
            batch[key] = torch.stack(values)
    return batch


class EpochSampler(Sampler):
    """Yields (index, epoch) pairs; each pass over the data is the next epoch.

    With shuffle, epoch e visits the images in the order permutation(n) of
    numpy.random.default_rng((seed, e)), so the order depends only on the seed and the epoch.
    state_dict() is {"epoch", "offset"}: the pass in progress (or the next one) and how many of its indices
    were handed out. load_state_dict() makes the next pass start there, so a resumed run sees exactly the
    batches the interrupted one would have. With DataLoader workers the loader fetches ahead of the model:
    save the position the trainer consumed, (epoch, batches done * batch_size), rather than the sampler's own.
    """

    def __init__(self, n: int, shuffle: bool, seed: int = 0) -> None:
        self.n, self.shuffle, self.seed = n, shuffle, seed
        self.epoch, self.offset = 0, 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, start = self.epoch, self.offset
        order = np.random.default_rng((self.seed, epoch)).permutation(self.n) if self.shuffle else range(self.n)
        for k in range(start, self.n):
            self.offset = k + 1
            yield int(order[k]), epoch
        self.epoch, self.offset = epoch + 1, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if not isinstance(state, dict) or set(state) != {"epoch", "offset"}:
            raise ValueError(f"sampler state must be a dict with keys epoch and offset, got {state!r}")
        epoch, offset = state["epoch"], state["offset"]
        for name, v in (("epoch", epoch), ("offset", offset)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"sampler state {name} must be a non-negative int, got {v!r}")
        if offset > self.n:
            raise ValueError(f"sampler state offset {offset} is past the end of an epoch of {self.n} items")
        self.epoch, self.offset = epoch, offset


def make_loader(split: Split, tokenizer: Tokenizer, batch_size: int, shuffle: bool, seed: int = 0,
                caption: str | int = "random", **kw: object) -> DataLoader:
    """A DataLoader of collated batches whose order and draws depend only on `seed` and the epoch.

    Extra keyword arguments go to torch.utils.data.DataLoader (num_workers, drop_last, pin_memory...).
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    dataset = ShapesDataset(split, tokenizer, caption=caption, seed=seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=EpochSampler(len(split), shuffle, seed),
                      collate_fn=collate, **kw)
