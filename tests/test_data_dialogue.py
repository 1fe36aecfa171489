"""Multi-turn dialogues about one image (mmlite.data.dialogue): every answer replayed from the forms and
re-read from the text with its own discourse state, "there is none" turns, references back, balance,
held-out pairs and the vocabulary."""

import re
from collections import Counter

import numpy as np
import pytest

from mmlite.data import COLORS, HELD_OUT_PAIRS, NUMBERS, SHAPES, SIZES, DataConfig, generate, vocabulary
from mmlite.data.dialogue import (MAX_TURNS, MIN_TURNS, NONE_ANSWER, NONE_KINDS, REFERRING_KINDS, TURN_KINDS,
                                  VOCABULARY, Turn, answer_turn, make_dialogue, replay)
from mmlite.data.grammar import Draw
from mmlite.data.instruct import VOCABULARY as INSTRUCT_VOCABULARY
from mmlite.data.instruct import make_instructions
from mmlite.data.semantics import scene_list

MARGIN = 15
CONFIG = DataConfig(n_train=300, n_val=0, n_test=0, n_comp=80, image_size=16, relation_margin=MARGIN)
SEED = 5
S, C, Z = ({n: i for i, n in enumerate(names)} for names in (SHAPES, COLORS, SIZES))


@pytest.fixture(scope="module")
def world():
    return generate(CONFIG, SEED)


@pytest.fixture(scope="module")
def data(world):
    """{split: [(objects as dicts, objects row, dialogue)]} for train and comp."""
    out = {}
    for name in ("train", "comp"):
        split = world[name]
        instructions = make_instructions(split.objects, SEED, name, MARGIN)
        out[name] = [(split.scene(i), split.objects[i], x["dialogue"]) for i, x in enumerate(instructions)]
    return out


def turns(data, name="train"):
    return [t for _, _, dialogue in data[name] for t in dialogue]


# ------------------------------------------------------------------ an independent reading of the dialogue text
PLURALS = dict(zip(("circles", "squares", "triangles", "diamonds", "crosses", "stars"), SHAPES))
REL_WORDS = {"left of": 0, "to the left of": 0, "right of": 1, "to the right of": 1, "above": 2, "below": 3,
             "under": 3}
REL_RE = "|".join(sorted(REL_WORDS, key=len, reverse=True))
ATTR = "(color|shape|size)"


class Ambiguous(AssertionError):
    """A relation inside the margin was consulted to reach an answer."""


def describes(o: dict, words: str) -> bool:
    for w in words.split():
        if w in SIZES and o["size"] != w or w in COLORS and o["color"] != w:
            return False
        if w in SHAPES and o["shape"] != w or w in PLURALS and o["shape"] != PLURALS[w]:
            return False
        if w not in SIZES + COLORS + SHAPES + tuple(PLURALS) + ("object", "objects", "shape", "shapes"):
            raise AssertionError(f"unexpected word {w!r} in {words!r}")
    return True


def rel(a: dict, b: dict, r: int) -> bool:
    d = (b["x"] - a["x"], a["x"] - b["x"], b["y"] - a["y"], a["y"] - b["y"])[r]
    if 0 < d < MARGIN:
        raise Ambiguous(f"{a} vs {b}, relation {r}")
    return d >= MARGIN


def read_dialogue(objs: list[dict], questions: list[str]) -> list[str]:
    """Answer a dialogue's questions from the text and the objects alone, keeping its own focus: the object the
    last question named, forgotten after "there is none"; "and the one ... it ?" repeats the last attribute."""
    focus, last_attr, answers = None, None, []
    for q in questions:
        m = re.fullmatch(rf"(?:and|what {ATTR} is) the one ({REL_RE}) it \?", q)
        if m:
            assert focus is not None, f"'it' with nothing in focus: {q!r}"
            attr = m[1] or last_attr
            assert attr is not None, f"an ellipsis with no attribute to repeat: {q!r}"
            found = [o for o in objs if o is not focus and rel(o, focus, REL_WORDS[m[2]])]
            assert len(found) <= 1, f"'the one' names {len(found)} objects: {q!r} in {objs}"
            focus, last_attr = (found[0], attr) if found else (None, None)
            answers.append(focus[attr] if found else NONE_ANSWER)
            continue
        m = re.fullmatch(rf"what {ATTR} is it \?", q)
        if m:
            assert focus is not None, q
            answers.append(focus[m[1]])
            last_attr = m[1]
            continue
        m = re.fullmatch(rf"how many other (objects|shapes) are the same {ATTR} as it \?", q)
        if m:
            assert focus is not None, q
            answers.append(NUMBERS[sum(o is not focus and o[m[2]] == focus[m[2]] for o in objs)])
            last_attr = None
            continue
        m = re.fullmatch(rf"is there an? (.+?) ({REL_RE}) it \?", q)
        if m:
            assert focus is not None, q
            hits = [rel(o, focus, REL_WORDS[m[2]]) for o in objs if o is not focus and describes(o, m[1])]
            answers.append("yes" if any(hits) else "no")
            last_attr = None
            continue
        m = re.fullmatch(rf"what {ATTR} is the (.+) \?", q)
        if m:
            found = [o for o in objs if describes(o, m[2])]
            assert len(found) <= 1, f"'the {m[2]}' names {len(found)} objects in {objs}"
            focus, last_attr = (found[0], m[1]) if found else (None, None)
            answers.append(focus[m[1]] if found else NONE_ANSWER)
            continue
        raise AssertionError(f"question outside the dialogue grammar: {q!r}")
    return answers


# ------------------------------------------------------------------ a hand-built scene and dialogue
# 0 large red square at the right, 1 small purple circle at the left, 2 large green triangle below the square,
# 3 small yellow star at the top.  Below the square: the triangle.  Right of the star: square and triangle.
SCENE = [(S["square"], C["red"], Z["large"], 80, 50), (S["circle"], C["purple"], Z["small"], 20, 50),
         (S["triangle"], C["green"], Z["large"], 80, 85), (S["star"], C["yellow"], Z["small"], 50, 15)]
LEFT, RIGHT, ABOVE, BELOW = range(4)
SCRIPT = [  # (form, answer, focus after the turn)
    (("query", (S["square"], None, None), "color"), "red", 0),  # what color is the square ?
    (("relate", BELOW, "color"), "green", 2),  # and the one below it ?
    (("same", "size"), "one", 2),  # how many other objects are the same size as it ? (the square)
    (("exist", ABOVE, (None, C["yellow"], None)), "yes", 2),  # is there a yellow object above it ?
    (("exist", LEFT, (S["square"], None, None)), "no", 2),  # is there a square left of it ?
    (("attribute", "shape"), "triangle", 2),  # what shape is it ?
    (("relate", BELOW, "size"), NONE_ANSWER, None),  # and the one below it ? nothing is
    (("query", (S["cross"], None, None), "color"), NONE_ANSWER, None),  # what color is the cross ? there is none
    (("query", (None, None, Z["small"]), "color"), None, None),  # "the small object": there are two
    (("query", (S["star"], None, None), "size"), "small", 3),  # what size is the star ?
    (("relate", RIGHT, "color"), None, None),  # right of the star: the square and the triangle
    (("relate", LEFT, "color"), "purple", 1),  # what color is the one left of it ? the circle
]


def test_hand_built_turns_have_known_answers():
    focus = None
    for form, answer, after in SCRIPT:
        got = answer_turn(form, SCENE, MARGIN, focus)
        if answer is None:
            assert got is None, form
            continue
        assert got == (answer, after), form
        focus = after
    assert answer_turn(("attribute", "size"), SCENE, MARGIN, None) is None  # "it" with nothing in focus


def test_ambiguous_relations_make_a_turn_ill_defined():
    # 1: the circle is 10 % left of the square, inside the margin; 2: the triangle clearly left of it
    near = [(S["square"], C["red"], Z["large"], 50, 50), (S["circle"], C["blue"], Z["small"], 40, 20),
            (S["triangle"], C["green"], Z["small"], 20, 50)]
    assert answer_turn(("relate", LEFT, "color"), near, MARGIN, 0) is None  # the circle might be "the one" too
    assert answer_turn(("exist", LEFT, (None, C["blue"], None)), near, MARGIN, 0) is None
    assert answer_turn(("exist", LEFT, (None, C["green"], None)), near, MARGIN, 0) == ("yes", 0)
    assert answer_turn(("exist", LEFT, (None, C["red"], None)), near, MARGIN, 0) == ("no", 0)
    assert answer_turn(("relate", ABOVE, "shape"), near, MARGIN, 0) == ("circle", 1)  # 30 % above: clear
    dialogue = [Turn("what color is the square ?", "red", "query", False, ("query", (S["square"], None, None),
                                                                           "color")),
                Turn("and the one left of it ?", "green", "relate", True, ("relate", LEFT, "color"))]
    with pytest.raises(ValueError, match="turn 1 'and the one left of it \\?'.*ill-defined"):
        replay(dialogue, near, MARGIN)
    with pytest.raises(ValueError, match="one of the dialogue module's forms"):
        answer_turn(("guess", 1), near, MARGIN, 0)


def test_a_hand_built_scene_gets_a_dialogue():
    objs = [{"shape": SHAPES[o[0]], "color": COLORS[o[1]], "size": SIZES[o[2]], "x": o[3], "y": o[4]} for o in SCENE]
    for seed in range(20):
        dialogue = make_dialogue(SCENE, Draw(np.random.default_rng(seed)), MARGIN, {}, n_turns=5)
        assert len(dialogue) == 5 and not dialogue[0].refers_back
        assert replay(dialogue, SCENE, MARGIN) == [t.answer for t in dialogue]
        assert read_dialogue(objs, [t.question for t in dialogue]) == [t.answer for t in dialogue]
    d = Draw(np.random.default_rng(0))
    with pytest.raises(ValueError, match="n_turns must be a positive integer"):
        make_dialogue(SCENE, d, MARGIN, {}, n_turns=0)
    with pytest.raises(ValueError, match="at least one object"):
        make_dialogue([], d, MARGIN, {})


# ------------------------------------------------------------------ generated dialogues, re-derived
def test_every_answer_is_replayed_and_re_read(data):
    for name in data:
        for objs, row, dialogue in data[name]:
            assert MIN_TURNS <= len(dialogue) <= MAX_TURNS
            answers = [t.answer for t in dialogue]
            assert replay(dialogue, scene_list(row), MARGIN) == answers
            # re-read from the text with an independent focus; Ambiguous if a margin relation would decide
            assert read_dialogue(objs, [t.question for t in dialogue]) == answers, (dialogue, objs)
            assert len({t.question for t in dialogue}) == len(dialogue)  # no question asked twice
    lengths = Counter(len(d) for _, _, d in data["train"])
    assert set(lengths) == set(range(MIN_TURNS, MAX_TURNS + 1)), lengths


def test_kinds_none_turns_and_references_back(data):
    ts = turns(data)
    kinds = Counter(t.kind for t in ts)
    assert set(kinds) == set(TURN_KINDS), kinds
    for t in ts:
        assert (t.answer == NONE_ANSWER) == (t.kind in NONE_KINDS), t
        assert t.refers_back == (t.kind in REFERRING_KINDS), t
        assert t.form[0] == t.kind.replace("_none", ""), t
    none_rate = sum(t.kind in NONE_KINDS for t in ts) / len(ts)
    assert 0.15 <= none_rate <= 0.25, none_rate  # truthful: every answer was re-read above
    assert kinds["relate_none"] > 0.25 * (kinds["relate"] + kinds["relate_none"])  # "none" is no rare exception
    assert kinds["query_none"] > 0.15 * (kinds["query"] + kinds["query_none"])
    refer_rate = sum(t.refers_back for t in ts) / len(ts)
    assert 0.4 <= refer_rate <= 0.6, refer_rate
    dialogues = [d for _, _, d in data["train"]]
    assert all(not d[0].refers_back for d in dialogues)  # the first question cannot point back
    assert sum(any(t.refers_back for t in d) for d in dialogues) > 0.75 * len(dialogues)
    ellipses = [t for t in ts if t.question.startswith("and the one")]
    assert len(ellipses) > 0.03 * len(ts)


def test_answer_balance(data):
    ts = turns(data)
    exist = Counter(t.answer for t in ts if t.kind == "exist")
    assert abs(exist["yes"] - exist["no"]) <= max(4, 0.1 * sum(exist.values())), exist
    same = Counter(t.answer for t in ts if t.kind == "same")
    assert max(same.values()) <= 0.5 * sum(same.values()) and len(same) >= 3, same
    sizes = Counter(t.answer for t in ts if t.answer in SIZES)
    assert abs(sizes["small"] - sizes["large"]) <= 0.2 * sum(sizes.values()), sizes


def test_determinism(world, data):
    objects = world["train"].objects
    again = make_instructions(objects, SEED, "train", MARGIN)
    assert [x["dialogue"] for x in again] == [d for _, _, d in data["train"]]
    other = make_instructions(objects, SEED + 1, "train", MARGIN)
    assert [x["dialogue"] for x in other] != [d for _, _, d in data["train"]]


def test_no_turn_outside_comp_names_a_held_out_pair(data):
    named = re.compile("|".join(rf"\b{c} {s}(e?s)?\b" for c, s in HELD_OUT_PAIRS))
    assert not any(named.search(t.question) for t in turns(data, "train"))
    assert any(named.search(t.question) for t in turns(data, "comp"))


def test_vocabulary_covers_every_turn(data):
    assert VOCABULARY == tuple(sorted(set(VOCABULARY))) and not set(VOCABULARY) & set(vocabulary())
    assert set(VOCABULARY) <= set(INSTRUCT_VOCABULARY)
    words = set(vocabulary()) | set(VOCABULARY)
    used = set()
    for name in data:
        for t in turns(data, name):
            for text in (t.question, t.answer):
                assert re.fullmatch(r"[a-z?.]+( [a-z?.]+)*", text), text  # single spaces, no other punctuation
                used |= set(text.split())
    assert used <= words, used - words
    assert set(VOCABULARY) <= used  # every listed word is needed
