"""VQA metrics: the official normalisation on hand cases, exact-match accuracy on the world's questions,
and the soft VQA score against its closed form and the literal leave-one-annotator-out average."""

import random

import pytest

from mmlite.data import ANSWERS, QUESTION_TYPES, load
from mmlite.metrics.vqa import normalize_answer, vqa_exact_accuracy, vqa_soft_accuracy, vqa_soft_score


@pytest.fixture(scope="module")
def test_questions():
    split = load("tiny", seed=0)["test"]
    return [q for qs in split.questions for q in qs]  # (question, answer, type)


@pytest.mark.parametrize("text, expected", [
    ("Two", "2"),                      # number words become digits
    ("two dogs.", "2 dogs"),           # a final period goes
    ("The red one", "red 1"),          # articles go, after lower-casing
    ("an apple", "apple"),
    ("none", "0"),
    ("3.5", "3.5"),                    # a period followed by a digit stays
    ("U.S.", "us"),
    ("1,000", "1000"),                 # digit-comma-digit: every mark is deleted, not spaced
    ("yes/no", "yes no"),              # a mark touching no space becomes a space
    ("yes / no", "yes no"),            # a mark next to a space is deleted
    ("red?", "red"),
    ("(blue)", "blue"),
    ("Hello, world", "hello world"),
    ("x-ray", "x ray"),
    ("  Circle\n", "circle"),          # whitespace
    ("dont", "don't"),                 # contractions get their apostrophe back
    ("isnt it", "isn't it"),
    ("couldnt've", "couldn't've"),
    ("couldn'tve", "couldn't've"),
    ("what's", "what's"),              # apostrophes are kept
    ("well", "well"),                  # a word, not "we'll"
    ("its", "its"),
    ("", ""),
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_normalize_every_world_answer_is_stable():
    normal = [normalize_answer(a) for a in ANSWERS]
    assert len(set(normal)) == len(ANSWERS)  # no two answers collapse
    assert normal[ANSWERS.index("two")] == "2" and normal[ANSWERS.index("zero")] == "0"
    assert all(normalize_answer(x) == x for x in normal)  # idempotent


def test_exact_accuracy_on_world(test_questions):
    answers = [a for _, a, _ in test_questions]
    types = [t for _, _, t in test_questions]
    perfect = vqa_exact_accuracy(answers, answers, types)
    assert perfect["overall"] == 1.0 and set(perfect["per_type"].values()) == {1.0}
    assert list(perfect["per_type"]) == list(QUESTION_TYPES)
    assert perfect["n"] == len(answers) == sum(perfect["n_per_type"].values())
    # digits and number words, upper case and a final period are the same answer
    assert vqa_exact_accuracy([normalize_answer(a).upper() + "." for a in answers], answers)["overall"] == 1.0
    # a constant "one": the count share of "one", and the other types only where their answer is "one" (never)
    const = vqa_exact_accuracy(["one"] * len(answers), answers, types)
    for t in QUESTION_TYPES:
        sel = [a for a, ty in zip(answers, types) if ty == t]
        assert const["per_type"][t] == sum(a == "one" for a in sel) / len(sel)
    assert 0.3 < const["per_type"]["count"] < 0.7 and const["per_type"]["color"] == 0.0
    assert const["overall"] == pytest.approx(sum(a == "one" for a in answers) / len(answers), abs=1e-15)
    # random predictions over ANSWERS: the hit rate counted by hand
    rng = random.Random(0)
    preds = [rng.choice(ANSWERS) for _ in answers]
    assert vqa_exact_accuracy(preds, answers)["overall"] == sum(p == a for p, a in zip(preds, answers)) / len(preds)


def test_exact_accuracy_without_types():
    out = vqa_exact_accuracy(["yes", "no"], ["yes", "yes"])
    assert out == {"overall": 0.5, "n": 2, "per_type": {}, "n_per_type": {}}


@pytest.mark.parametrize("k, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (7, 1.0), (10, 1.0)])
def test_soft_score_closed_form(k, expected):
    answers = ["red"] * k + ["blue"] * (10 - k)
    random.Random(k).shuffle(answers)
    assert vqa_soft_score("red", answers) == pytest.approx(expected, abs=1e-12)


def test_soft_score_hand_cases():
    assert vqa_soft_score("Two", ["2", "2", "two", "3", "3", "3", "3", "3", "3", "3"]) == pytest.approx(0.9)
    assert vqa_soft_score("the cat", ["cat", "dog"]) == pytest.approx(0.5 * 0 + 0.5 * 1 / 3)  # m = 2
    assert vqa_soft_score("dog", ["cat"] * 10) == 0.0


def test_soft_score_is_the_leave_one_out_mean():
    rng, pool = random.Random(1), ["red", "blue", "two", "2", "Red.", "yes"]
    for _ in range(300):
        answers = [rng.choice(pool) for _ in range(rng.randint(2, 12))]
        pred = rng.choice(pool)
        norm = [normalize_answer(a) for a in answers]
        literal = []
        for j in range(len(answers)):  # drop annotator j, count the others who gave the prediction
            others = norm[:j] + norm[j + 1:]
            literal.append(min(1.0, others.count(normalize_answer(pred)) / 3))
        assert vqa_soft_score(pred, answers) == pytest.approx(sum(literal) / len(literal), abs=1e-12)


def test_soft_accuracy_is_the_mean():
    preds, answers = ["red", "blue"], [["red"] * 10, ["blue"] + ["red"] * 9]
    assert vqa_soft_accuracy(preds, answers) == pytest.approx((1.0 + 0.3) / 2)


def test_bad_input():
    with pytest.raises(ValueError, match="empty"):
        vqa_exact_accuracy([], [])
    with pytest.raises(ValueError, match="2 predictions but 1 answers"):
        vqa_exact_accuracy(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="question types"):
        vqa_exact_accuracy(["a", "b"], ["a", "b"], ["color"])
    with pytest.raises(ValueError, match="list of strings"):
        vqa_exact_accuracy("ab", "ab")
    with pytest.raises(ValueError, match=r"answers\[1\] must be a string"):
        vqa_exact_accuracy(["a", "b"], ["a", 2])
    with pytest.raises(ValueError, match="at least 2"):
        vqa_soft_score("red", ["red"])
    with pytest.raises(ValueError, match="must be a string"):
        normalize_answer(None)
    with pytest.raises(ValueError, match="1 predictions but 2 answer lists"):
        vqa_soft_accuracy(["red"], [["red"] * 10, ["red"] * 10])
    with pytest.raises(ValueError, match="empty"):
        vqa_soft_accuracy([], [])
