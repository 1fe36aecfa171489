"""Word-level tokenizer with fixed special tokens (derived in chapter 1)."""

from __future__ import annotations

import json
import numbers
import re
from pathlib import Path
from typing import Iterable, Sequence

import torch

# Special tokens, in this order, take ids 0..6; words follow from id 7.
SPECIALS: tuple[str, ...] = ("[PAD]", "[CLS]", "[SEP]", "[MASK]", "[UNK]", "[BOS]", "[EOS]")

# A word is a run of characters other than whitespace, "?" and ","; "?" and "," are tokens of their own.
_TOKEN_RE = re.compile(r"[^\s?,]+|[?,]")


class Tokenizer:
    """Maps words to ids and back: [PAD]=0, [CLS]=1, [SEP]=2, [MASK]=3, [UNK]=4, [BOS]=5, [EOS]=6, words."""

    def __init__(self, words: Iterable[str]) -> None:
        if isinstance(words, (str, bytes)):
            raise TypeError(f"words must be an iterable of words (e.g. a list of str), got a single "
                            f"{type(words).__name__} {words!r}")
        try:
            words = list(words)
        except TypeError:
            raise TypeError(f"words must be an iterable of str, got {type(words).__name__}") from None
        seen: set[str] = set()
        for w in words:
            if not isinstance(w, str):
                raise TypeError(f"words must be strings, got {type(w).__name__}: {w!r}")
            if w in SPECIALS:
                raise ValueError(f"word {w!r} clashes with a special token; specials are {list(SPECIALS)}")
            if w != w.lower() or not _TOKEN_RE.fullmatch(w):
                raise ValueError(f"word {w!r} is not a single lower-case token as tokenize() would produce")
            if w in seen:
                raise ValueError(f"duplicate word {w!r} in the vocabulary")
            seen.add(w)
        self.specials: tuple[str, ...] = SPECIALS
        self.vocab: list[str] = list(SPECIALS) + words  # id -> token
        self.token_to_id: dict[str, int] = {t: i for i, t in enumerate(self.vocab)}
        self.pad_id, self.cls_id, self.sep_id, self.mask_id, self.unk_id, self.bos_id, self.eos_id = range(7)

    def __len__(self) -> int:
        return len(self.vocab)

    def __repr__(self) -> str:
        return f"Tokenizer({len(self.vocab) - len(SPECIALS)} words + {len(SPECIALS)} specials)"

    def id_to_token(self, i: int) -> str:
        """The token with id `i` (an int, or a 0-d integer tensor)."""
        if isinstance(i, torch.Tensor):
            if i.numel() != 1 or i.is_floating_point() or i.is_complex() or i.dtype == torch.bool:
                raise TypeError(f"token id must be an integer, got a tensor of dtype {i.dtype} "
                                f"and shape {tuple(i.shape)}")
            i = int(i)
        elif isinstance(i, bool) or not isinstance(i, numbers.Integral):
            raise TypeError(f"token id must be an integer, got {type(i).__name__} {i!r}")
        if not 0 <= int(i) < len(self.vocab):
            raise ValueError(f"token id {int(i)} is out of range 0..{len(self.vocab) - 1}")
        return self.vocab[int(i)]

    @staticmethod
    def tokenize(text: str) -> list[str]:
        """Lower-case, split on whitespace, and split "?" and "," off as tokens of their own."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return _TOKEN_RE.findall(text.lower())

    def encode(self, text: str, add_bos_eos: bool = False, add_cls: bool = False,
               strict: bool = False) -> list[int]:
        """Token ids of `text`: optional [CLS] first, then [BOS] words [EOS]; unknown words -> [UNK].

        With strict=True an unknown word raises ValueError naming it and its position.
        """
        tokens = self.tokenize(text)
        ids = [self.token_to_id.get(t, self.unk_id) for t in tokens]
        if strict and self.unk_id in ids:
            unknown = [f"{t!r} at position {k}" for k, t in enumerate(tokens) if t not in self.token_to_id]
            raise ValueError(f"unknown word(s) {', '.join(unknown)} in text {text!r}")
        if add_bos_eos:
            ids = [self.bos_id] + ids + [self.eos_id]
        if add_cls:
            ids = [self.cls_id] + ids
        return ids

    def encode_batch(self, texts: Sequence[str], max_len: int | None = None, add_bos_eos: bool = False,
                     add_cls: bool = False, strict: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode and right-pad with [PAD]: ids (B, T) long and mask (B, T) bool, True = real token.

        T is the longest sequence in the batch, or `max_len` (longer sequences are cut silently). With
        add_bos_eos a cut sequence still ends in [EOS] (the last kept word makes way for it), so a caption
        decoder always sees its end token; max_len must then leave room for [BOS] and [EOS] (and [CLS]).
        """
        if isinstance(texts, str):
            raise TypeError("texts must be a sequence of strings, got a single str")
        if max_len is not None and (not isinstance(max_len, int) or max_len < 1):
            raise ValueError(f"max_len must be a positive integer or None, got {max_len!r}")
        if max_len is not None and add_bos_eos and max_len < 2 + int(add_cls):
            raise ValueError(f"max_len={max_len} cannot hold {'[CLS], ' if add_cls else ''}[BOS] and [EOS]; "
                             f"give max_len >= {2 + int(add_cls)}")
        seqs = [self.encode(t, add_bos_eos=add_bos_eos, add_cls=add_cls, strict=strict) for t in texts]
        if max_len is not None:
            if add_bos_eos:  # a cut caption keeps [EOS] as its last token
                seqs = [s if len(s) <= max_len else s[:max_len - 1] + [self.eos_id] for s in seqs]
            else:
                seqs = [s[:max_len] for s in seqs]
        T = max_len if max_len is not None else max((len(s) for s in seqs), default=0)
        ids = torch.full((len(seqs), T), self.pad_id, dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(seqs), T), dtype=torch.bool)  # (B, T)
        for b, s in enumerate(seqs):
            ids[b, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[b, : len(s)] = True
        return ids, mask

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special: bool = True) -> str:
        """Words of `ids` joined by spaces; with skip_special, specials are dropped and [EOS] ends the text."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"ids must be 1-D, got a tensor of shape {tuple(ids.shape)}")
            if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
                raise TypeError(f"ids must be an integer tensor, got dtype {ids.dtype}")
            ids = ids.tolist()
        elif isinstance(ids, (str, bytes)):
            raise TypeError(f"ids must be a sequence of integer token ids, got a {type(ids).__name__}")
        words = []
        for i in ids:
            token = self.id_to_token(i)
            if skip_special:
                if i == self.eos_id:
                    break
                if i < len(SPECIALS):
                    continue
            words.append(token)
        return " ".join(words)

    def save(self, path: str | Path) -> None:
        """Write the vocabulary as JSON (specials first, then words)."""
        Path(path).write_text(json.dumps({"specials": list(SPECIALS), "words": self.vocab[len(SPECIALS):]},
                                         indent=0) + "\n")

    @classmethod
    def from_texts(cls, texts: Iterable[str], min_count: int = 1) -> "Tokenizer":
        """A tokenizer over the words tokenize() finds in `texts`, seen at least `min_count` times.

        Words are ordered by descending count, ties alphabetically (by code point), so the same texts
        always give the same ids. tokenize() lower-cases, so a text's "[UNK]" is the ordinary word "[unk]",
        never the special token; a word the constructor would refuse raises ValueError naming its text.
        """
        if isinstance(texts, (str, bytes)):
            raise TypeError(f"texts must be an iterable of strings, got a single {type(texts).__name__}")
        if isinstance(min_count, bool) or not isinstance(min_count, int) or min_count < 1:
            raise ValueError(f"min_count must be a positive integer, got {min_count!r}")
        counts: dict[str, int] = {}
        first_text: dict[str, int] = {}
        n_texts = 0
        for k, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts must be strings, got {type(text).__name__} at position {k}: {text!r:.80}")
            n_texts += 1
            for w in cls.tokenize(text):
                counts[w] = counts.get(w, 0) + 1
                first_text.setdefault(w, k)
        if n_texts == 0:
            raise ValueError("texts is empty: a vocabulary needs at least one text")
        words = [w for w, c in sorted(counts.items(), key=lambda wc: (-wc[1], wc[0])) if c >= min_count]
        if not words:
            raise ValueError(f"no word is seen min_count={min_count} times in {n_texts} texts "
                             f"(the most frequent is seen {max(counts.values(), default=0)} times)")
        for w in words:  # the constructor's rules, checked here so the error can name the text
            if w in SPECIALS or w != w.lower() or not _TOKEN_RE.fullmatch(w):
                raise ValueError(f"word {w!r} of text {first_text[w]} cannot be a vocabulary word "
                                 f"(specials are {list(SPECIALS)}; words are lower-case single tokens)")
        return cls(words)

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        """Read a tokenizer written by save()."""
        try:
            data = json.loads(Path(path).read_text())
            specials, words = data["specials"], data["words"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"tokenizer file {path} is not a saved Tokenizer: {err!r}") from None
        if not isinstance(specials, list) or tuple(specials) != SPECIALS:
            raise ValueError(f"tokenizer file {path} has specials {specials!r}, expected {list(SPECIALS)}")
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            raise ValueError(f"tokenizer file {path}: 'words' must be a list of strings, got {words!r:.60}")
        try:
            return cls(words)
        except ValueError as err:
            raise ValueError(f"tokenizer file {path}: {err}") from None
