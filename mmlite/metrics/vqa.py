"""VQA metrics: the official answer normalisation, exact-match accuracy per type, the soft VQA score (chapter 6)."""

from __future__ import annotations

import re
from itertools import combinations
from typing import Sequence

# The normalisation of the official VQA evaluation (Antol et al., ICCV 2015; the VQA API's vqaEval.py,
# github.com/GT-Vision-Lab/VQA), written from its description:
#  1. newlines and tabs become spaces; strip.
#  2. punctuation: each mark of _PUNCT is deleted if it touches a space somewhere in the text, or if the text
#     holds a digit-comma-digit group ("1,000"); otherwise every occurrence becomes a space ("yes/no" -> "yes no").
#     Apostrophes, colons and the marks not listed are kept.
#  3. a period is deleted unless a digit follows it ("3.5" stays, "yes." -> "yes").
#  4. lower-case, split on whitespace; number words zero..ten (and "none") become digits; the articles
#     a, an, the are dropped; contractions written without their apostrophe get it back ("dont" -> "don't").
_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD = re.compile(r"\.(?!\d)")
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset(("a", "an", "the"))
# Contractions the official table restores. Every spelling with one or more of the apostrophes left out maps
# to the full form ("couldnt've", "couldn'tve", "couldntve" -> "couldn't've"). Left out on purpose, as in the
# official table, are the ones whose bare spelling is a word: its, id, ill, lets, shell, well, were, wed, hell.
# Two differences from the official table, both where it cannot have meant what it does: its keys "Im",
# "Ive", "Id've" are capitalised and so never match the lower-cased text (here "im" -> "i'm"), and its
# "somebody'd" entry is reversed (here "somebodyd" -> "somebody'd").
_CONTRACTED = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't "
    "he'd he'd've he's how'd how'll how's i'd've i'm i've isn't it'd it'd've it'll ma'am mightn't mightn't've "
    "might've mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've should've shouldn't "
    "shouldn't've somebody'd somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's "
    "something'd something'd've something'll that's there'd there'd've there're there's they'd they'd've "
    "they'll they're they've 'twas wasn't we'd've we've weren't what'll what're what's what've when's where'd "
    "where's where've who'd who'd've who'll who's who've why'll why're why's won't would've wouldn't "
    "wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've").split()


def _spellings(form: str) -> list[str]:
    """Every spelling of a contraction with a non-empty subset of its apostrophes left out."""
    at = [i for i, ch in enumerate(form) if ch == "'"]
    out = []
    for k in range(1, len(at) + 1):
        for drop in combinations(at, k):
            out.append("".join(ch for i, ch in enumerate(form) if i not in drop))
    return out


_CONTRACTIONS = {spelling: form for form in _CONTRACTED for spelling in _spellings(form)}


def normalize_answer(text: str) -> str:
    """An answer in the official VQA evaluation's normal form: "Two dogs." -> "2 dogs", "the Red one" -> "red 1".

    Steps: see the comment above. The official script applies them to the ground truth and the prediction
    only when the annotators disagree (its ground-truth answers were normalised when the data set was made);
    when all agree it compares the raw prediction, lower-cased, so "Two." against ten "2" scores 0 there.
    Here both sides are always normalised (that prediction scores 1); on predictions already in normal form
    the two agree.
    """
    if not isinstance(text, str):
        raise ValueError(f"an answer must be a string, got {type(text).__name__}")
    text = text.replace("\n", " ").replace("\t", " ").strip()
    out = text
    comma_number = _DIGIT_COMMA_DIGIT.search(text) is not None
    for p in _PUNCT:
        out = out.replace(p, "" if (p + " " in text or " " + p in text or comma_number) else " ")
    out = _PERIOD.sub("", out)
    words = [_NUMBER_WORDS.get(w, w) for w in out.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def _check_strings(name: str, values: Sequence[str]) -> None:
    if isinstance(values, str) or not isinstance(values, Sequence):
        raise ValueError(f"{name} must be a list of strings, got {type(values).__name__}")
    for i, v in enumerate(values):
        if not isinstance(v, str):
            raise ValueError(f"{name}[{i}] must be a string, got {type(v).__name__}")


def vqa_exact_accuracy(predictions: Sequence[str], answers: Sequence[str],
                       question_types: Sequence[str] | None = None) -> dict[str, object]:
    """Exact-match accuracy after normalisation: mean over questions of [normalize(pred) == normalize(answer)].

    One answer per question (as in the shapes world; for ten annotator answers use `vqa_soft_accuracy`).
    Returns {"overall": float, "n": int, "per_type": {type: float}, "n_per_type": {type: int}}, the types
    in order of first appearance (empty dicts without question_types).
    """
    _check_strings("predictions", predictions)
    _check_strings("answers", answers)
    if len(predictions) == 0:
        raise ValueError("predictions is empty")
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions but {len(answers)} answers")
    if question_types is not None:
        _check_strings("question_types", question_types)
        if len(question_types) != len(answers):
            raise ValueError(f"{len(question_types)} question types but {len(answers)} answers")
    hits = [normalize_answer(p) == normalize_answer(a) for p, a in zip(predictions, answers)]
    per_type: dict[str, list[bool]] = {}
    for t, hit in zip(question_types or (), hits):
        per_type.setdefault(t, []).append(hit)
    return {"overall": sum(hits) / len(hits), "n": len(hits),
            "per_type": {t: sum(h) / len(h) for t, h in per_type.items()},
            "n_per_type": {t: len(h) for t, h in per_type.items()}}


def vqa_soft_score(prediction: str, annotator_answers: Sequence[str]) -> float:
    """The VQA accuracy of one prediction against the answers of m >= 2 annotators (m = 10 in VQA v1/v2).

    acc = (1/m) sum_{j=1..m} min(1, #{l != j : answer_l == prediction} / 3)     (after normalisation)
    the mean over the m leave-one-annotator-out subsets of "min(#humans that said it / 3, 1)".
    With m = 10 and k matching annotators it is 0, 0.3, 0.6, 0.9 and 1 for k = 0, 1, 2, 3 and >= 4.
    """
    _check_strings("annotator_answers", annotator_answers)
    if len(annotator_answers) < 2:
        raise ValueError(f"the soft VQA score needs at least 2 annotator answers, got {len(annotator_answers)}")
    pred = normalize_answer(prediction)
    match = [normalize_answer(a) == pred for a in annotator_answers]
    k = sum(match)
    return sum(min(1.0, (k - m) / 3) for m in match) / len(match)


def vqa_soft_accuracy(predictions: Sequence[str], annotator_answers: Sequence[Sequence[str]]) -> float:
    """Corpus VQA accuracy: the mean of `vqa_soft_score` over questions."""
    _check_strings("predictions", predictions)
    if isinstance(annotator_answers, str) or not isinstance(annotator_answers, Sequence):
        raise ValueError(f"annotator_answers must be a list of lists, got {type(annotator_answers).__name__}")
    if len(predictions) == 0:
        raise ValueError("predictions is empty")
    if len(predictions) != len(annotator_answers):
        raise ValueError(f"{len(predictions)} predictions but {len(annotator_answers)} answer lists")
    return sum(vqa_soft_score(p, a) for p, a in zip(predictions, annotator_answers)) / len(predictions)
