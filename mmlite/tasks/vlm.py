"""The generative vision-language model's task: a chat template around the image, and its loss (chapter 5).

One example is a conversation about one image, written as a single token sequence:

    <image> <user> what color is the circle ? <assistant> red <end> <user> how many ... ? <assistant> two <end>
    label:     .      .    .    .    .    .   .      .      X    X      .   ...        .      .      X    X

The label mask is True exactly on the assistant's answer tokens and on the <end> that closes each answer: what
the model must learn to emit (and the <end> is what makes generation stop). The image placeholder, the user
turns and the role tokens are context only. For next-token prediction the labels move with the targets: input
position t predicts token t + 1, so it is trained iff token t + 1 is labelled (collate_chat shifts once, here).

A prompt for generation is the same template up to the last <assistant> (encode_chat with the last answer
None); the model continues it with an answer and <end> (VLM.generate, decode_reply).
"""

from __future__ import annotations

from typing import Iterable, NamedTuple, Sequence

import torch
from torch import Tensor, nn

from mmlite.data.dataset import vocabulary
from mmlite.models.vlm import VLMConfig
from mmlite.objectives import caption_loss
from mmlite.text import Tokenizer

IMAGE, USER, ASSISTANT, END = "<image>", "<user>", "<assistant>", "<end>"
CHAT_TOKENS = (IMAGE, USER, ASSISTANT, END)  # ordinary vocabulary words to the Tokenizer, after the base words


def chat_tokenizer(extra_words: Iterable[str] = ()) -> Tokenizer:
    """The base vocabulary (mmlite.data.dataset.vocabulary(), ids unchanged), then CHAT_TOKENS, then extra_words.

    The chat tokens come right after the base words, so their ids do not depend on extra_words; an extra word
    already in the vocabulary is skipped. Words follow the Tokenizer's rules (lower case, one token each).
    """
    if isinstance(extra_words, (str, bytes)):
        raise TypeError(f"extra_words must be an iterable of words, got a single {type(extra_words).__name__} "
                        f"{extra_words!r}")
    words = list(vocabulary())
    seen = set(words)
    for w in (*CHAT_TOKENS, *extra_words):
        if not isinstance(w, str):
            raise TypeError(f"extra_words must be strings, got {type(w).__name__}: {w!r}")
        if w not in seen:
            words.append(w)
            seen.add(w)
    return Tokenizer(words)


def chat_ids(tokenizer: Tokenizer) -> dict[str, int]:
    """{"<image>": id, "<user>": id, "<assistant>": id, "<end>": id}; raises unless the tokenizer has them all."""
    if not isinstance(tokenizer, Tokenizer):
        raise TypeError(f"tokenizer must be a mmlite.text.Tokenizer, got {type(tokenizer).__name__}")
    missing = [t for t in CHAT_TOKENS if t not in tokenizer.token_to_id]
    if missing:
        raise ValueError(f"the tokenizer lacks the chat tokens {missing}; build it with chat_tokenizer()")
    return {t: tokenizer.token_to_id[t] for t in CHAT_TOKENS}


def vlm_config(tokenizer: Tokenizer, **overrides: object) -> VLMConfig:
    """A VLMConfig whose vocab_size, image_id, end_id and pad_id are the tokenizer's; other fields by keyword."""
    ids = chat_ids(tokenizer)
    return VLMConfig(vocab_size=len(tokenizer), image_id=ids[IMAGE], end_id=ids[END], pad_id=tokenizer.pad_id,
                     **overrides)


class ChatExample(NamedTuple):
    """One encoded conversation."""

    ids: Tensor  # (T,) long: the template's token ids
    labels: Tensor  # (T,) bool: True on the answer tokens and the <end> closing each answer


def _words(tokenizer: Tokenizer, text: object, what: str, strict: bool) -> list[int]:
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a str, got {type(text).__name__} {text!r}")
    tokens = tokenizer.tokenize(text)
    if not tokens:
        raise ValueError(f"{what} is empty")
    clash = [t for t in tokens if t in CHAT_TOKENS]
    if clash:
        raise ValueError(f"{what} {text!r} contains the chat token(s) {clash}, which only the template may write")
    try:
        return tokenizer.encode(text, strict=strict)
    except ValueError as err:
        raise ValueError(f"{what}: {err}") from None


def encode_chat(tokenizer: Tokenizer, turns: Sequence[tuple[str, str | None]], image: bool = True,
                strict: bool = True) -> ChatExample:
    """Encode turns [(question, answer), ...] as [<image>] (<user> question <assistant> answer <end>)*.

    The last answer may be None: the sequence then ends with <assistant>, a prompt for generation (no labels
    in that turn). image=False leaves out the placeholder (a text-only conversation). strict: an unknown word
    raises (naming it) rather than becoming [UNK]. Returns ChatExample(ids (T,), labels (T,)).
    """
    ids_of = chat_ids(tokenizer)
    if isinstance(turns, (str, bytes)) or not isinstance(turns, Sequence) or len(turns) == 0:
        raise ValueError(f"turns must be a non-empty sequence of (question, answer) pairs, got {turns!r:.80}")
    ids: list[int] = [ids_of[IMAGE]] if image else []
    labels: list[bool] = [False] if image else []
    for k, turn in enumerate(turns):
        if isinstance(turn, (str, bytes)) or not isinstance(turn, Sequence) or len(turn) != 2:
            raise ValueError(f"turn {k} must be a (question, answer) pair, got {turn!r:.80}")
        question, answer = turn
        q = _words(tokenizer, question, f"turn {k}'s question", strict)
        ids += [ids_of[USER], *q, ids_of[ASSISTANT]]
        labels += [False] * (len(q) + 2)
        if answer is None:
            if k != len(turns) - 1:
                raise ValueError(f"turn {k}'s answer is None, but only the last turn may be left open (a prompt)")
            continue
        a = _words(tokenizer, answer, f"turn {k}'s answer", strict)
        ids += [*a, ids_of[END]]
        labels += [True] * (len(a) + 1)
    return ChatExample(torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.bool))


class ChatBatch(NamedTuple):
    """Padded conversations, already shifted for next-token prediction (collate_chat)."""

    inputs: Tensor  # (B, T-1) ids[:, :-1], fed to the model
    input_mask: Tensor  # (B, T-1) True = real input token
    targets: Tensor  # (B, T-1) ids[:, 1:], what input position t must predict
    target_mask: Tensor  # (B, T-1) labels[:, 1:]: True where the target is an answer token or its <end>


def _check_examples(examples: Sequence[ChatExample]) -> None:
    if isinstance(examples, ChatExample) or not isinstance(examples, Sequence) or len(examples) == 0:
        raise ValueError("examples must be a non-empty list of ChatExample (from encode_chat)")
    for k, ex in enumerate(examples):
        if not isinstance(ex, ChatExample):
            raise TypeError(f"example {k} must be a ChatExample (from encode_chat), got {type(ex).__name__}")


def collate_chat(examples: Sequence[ChatExample], pad_id: int = 0) -> ChatBatch:
    """Right-pad the examples to the longest, (B, T), and shift once: inputs ids[:, :-1], targets ids[:, 1:],
    target_mask labels[:, 1:] (False at padding). Every example must have something to learn (a labelled token)."""
    _check_examples(examples)
    for k, ex in enumerate(examples):
        if not bool(ex.labels.any()):
            raise ValueError(f"example {k} has no answer token to learn (a prompt? left-pad prompts with "
                             "collate_prompts for generation)")
    t = max(len(ex.ids) for ex in examples)
    ids = torch.full((len(examples), t), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(examples), t), dtype=torch.bool)  # (B, T)
    labels = torch.zeros((len(examples), t), dtype=torch.bool)  # (B, T)
    for b, ex in enumerate(examples):
        ids[b, :len(ex.ids)] = ex.ids
        mask[b, :len(ex.ids)] = True
        labels[b, :len(ex.ids)] = ex.labels
    return ChatBatch(ids[:, :-1], mask[:, :-1], ids[:, 1:], labels[:, 1:])


def collate_prompts(examples: Sequence[ChatExample], pad_id: int = 0) -> tuple[Tensor, Tensor]:
    """Left-pad prompts (encode_chat with the last answer None) for VLM.generate: ids (B, P), mask (B, P).

    Left padding puts every row's last real token in the last column, where generation continues.
    """
    _check_examples(examples)
    p = max(len(ex.ids) for ex in examples)
    ids = torch.full((len(examples), p), pad_id, dtype=torch.long)  # (B, P)
    mask = torch.zeros((len(examples), p), dtype=torch.bool)  # (B, P)
    for b, ex in enumerate(examples):
        ids[b, p - len(ex.ids):] = ex.ids
        mask[b, p - len(ex.ids):] = True
    return ids, mask


def vlm_loss(model: nn.Module, images: Tensor | None, batch: ChatBatch, label_smoothing: float = 0.0) -> Tensor:
    """Mean next-token cross-entropy over the labelled targets only (answers and their <end>).

    images (B, 3, S, S) (or None for text-only conversations), batch from collate_chat; model a
    mmlite.models.vlm.VLM. Raises when the batch holds no labelled target (nothing would be learned).
    """
    if not isinstance(batch, ChatBatch):
        raise TypeError(f"batch must be a ChatBatch (from collate_chat), got {type(batch).__name__}")
    if not bool(batch.target_mask.any()):
        raise ValueError("the batch has no labelled target: nothing to learn (check the label mask)")
    logits = model(images, batch.inputs, batch.input_mask)  # (B, T-1, V), aligned with the inputs
    return caption_loss(logits, batch.targets, batch.target_mask, label_smoothing=label_smoothing)


def decode_reply(tokenizer: Tokenizer, ids: Sequence[int] | Tensor) -> str:
    """The words of generated ids (L,) up to the first <end> (specials such as [PAD] skipped)."""
    end = chat_ids(tokenizer)[END]
    ids = ids.tolist() if isinstance(ids, Tensor) else list(ids)
    if end in ids:
        ids = ids[:ids.index(end)]
    return tokenizer.decode(ids)
