"""Multi-step reasoning questions (mmlite.data.reasoning) and the per-split instruction data
(mmlite.data.instruct): answers re-derived from the text and from the program, hops, balance,
held-out pairs, ambiguous relations and the vocabulary."""

import re
from collections import Counter, defaultdict

import numpy as np
import pytest

from mmlite.data import COLORS, HELD_OUT_PAIRS, NUMBERS, SHAPES, SIZES, DataConfig, generate, vocabulary
from mmlite.data.grammar import Draw
from mmlite.data.instruct import VOCABULARY as INSTRUCT_VOCABULARY
from mmlite.data.instruct import make_instructions
from mmlite.data.reasoning import (FAMILIES, MAX_HOPS, VOCABULARY, ReasoningQuestion, execute, program_hops,
                                   rationale, reasoning_questions)
from mmlite.data.semantics import relation, scene_list

MARGIN = 15
CONFIG = DataConfig(n_train=240, n_val=0, n_test=0, n_comp=80, image_size=16, relation_margin=MARGIN)
SEED = 11
S, C, Z = ({n: i for i, n in enumerate(names)} for names in (SHAPES, COLORS, SIZES))
ANY = (None, None, None)


@pytest.fixture(scope="module")
def world():
    return generate(CONFIG, SEED)


@pytest.fixture(scope="module")
def data(world):
    """{split: [(objects as dicts, questions of the image)]} for train and comp."""
    out = {}
    for name in ("train", "comp"):
        split = world[name]
        instructions = make_instructions(split.objects, SEED, name, MARGIN)
        out[name] = [(split.scene(i), split.objects[i], x["reasoning"]) for i, x in enumerate(instructions)]
    return out


def questions(data, name="train"):
    return [q for _, _, qs in data[name] for q in qs]


# ------------------------------------------------------------------ an independent reading of the question text
PLURALS = dict(zip(("circles", "squares", "triangles", "diamonds", "crosses", "stars"), SHAPES))
REL_WORDS = {"left of": 0, "to the left of": 0, "right of": 1, "to the right of": 1, "above": 2, "below": 3,
             "under": 3}
REL_RE = "|".join(sorted(REL_WORDS, key=len, reverse=True))
ATTR = "(color|shape|size)"


class Ambiguous(AssertionError):
    """A relation inside the margin was consulted to reach an answer."""


def describes(o: dict, words: str) -> bool:
    """Does a phrase like "small red circle", "large shapes" or "red object" fit object o?"""
    for w in words.split():
        if w in SIZES and o["size"] != w or w in COLORS and o["color"] != w:
            return False
        if w in SHAPES and o["shape"] != w or w in PLURALS and o["shape"] != PLURALS[w]:
            return False
        if w not in SIZES + COLORS + SHAPES + tuple(PLURALS) + ("object", "objects", "shape", "shapes"):
            raise AssertionError(f"unexpected word {w!r} in {words!r}")
    return True


def rel(a: dict, b: dict, r: int) -> bool:
    """a is left of / right of / above / below b, beyond the margin; Ambiguous inside it."""
    d = (b["x"] - a["x"], a["x"] - b["x"], b["y"] - a["y"], a["y"] - b["y"])[r]
    if 0 < d < MARGIN:
        raise Ambiguous(f"{a} vs {b}, relation {r}")
    return d >= MARGIN


def related(objs: list[dict], words: str) -> list[dict]:
    """The objects a set phrase names: "red objects left of the circle" or "red objects"."""
    m = re.fullmatch(rf"(.+?) ({REL_RE}) the (.+)", words)
    if m is None:
        return [o for o in objs if describes(o, words)]
    base = the(objs, m[3])
    # every candidate's relation must be clear, so no relation inside the margin can change the answer
    return [o for o in objs if o is not base and describes(o, m[1]) and rel(o, base, REL_WORDS[m[2]])]


def the(objs: list[dict], words: str) -> dict:
    found = related(objs, words)
    assert len(found) == 1, f"'the {words}' names {len(found)} objects in {objs}"
    return found[0]


def read(objs: list[dict], text: str) -> str:
    """Answer a reasoning question from its text and the objects alone."""
    yes = lambda v: "yes" if v else "no"  # noqa: E731
    m = re.fullmatch(rf"what {ATTR} is the (.+) \?", text)
    if m:
        return the(objs, m[2])[m[1]]
    m = re.fullmatch(rf"how many other (.+?) are the same {ATTR} as the (.+) \?", text)
    if m:
        base = the(objs, m[3])
        return NUMBERS[sum(o is not base and describes(o, m[1]) and o[m[2]] == base[m[2]] for o in objs)]
    m = re.fullmatch(r"how many (.+) are there \?", text)
    if m:
        return NUMBERS[len(related(objs, m[1]))]
    m = re.fullmatch(rf"how many (.+?) are ({REL_RE}) the (.+) \?", text)
    if m:
        return NUMBERS[len(related(objs, f"{m[1]} {m[2]} the {m[3]}"))]
    m = re.fullmatch(rf"is there another (.+?) with the same {ATTR} as the (.+) \?", text)
    if m:
        base = the(objs, m[3])
        return yes(any(o is not base and describes(o, m[1]) and o[m[2]] == base[m[2]] for o in objs))
    m = re.fullmatch(r"is there an? (.+) \?", text)
    if m:
        return yes(related(objs, m[1]))
    m = re.fullmatch(r"are there (more|fewer) (.+) than (.+) \?", text)
    if m:
        a, b = len(related(objs, m[2])), len(related(objs, m[3]))
        return yes(a > b if m[1] == "more" else a < b)
    m = re.fullmatch(r"are there as many (.+) as (.+) \?", text)
    if m:
        return yes(len(related(objs, m[1])) == len(related(objs, m[2])))
    m = re.fullmatch(rf"is the (.+) the same {ATTR} as the (.+) \?", text)
    if m:
        return yes(the(objs, m[1])[m[2]] == the(objs, m[3])[m[2]])
    raise AssertionError(f"question outside the grammar: {text!r}")


# ------------------------------------------------------------------ hand-built scenes
# 0 large red square at the right, 1 small purple circle at the left, 2 large green triangle below the circle,
# 3 small yellow star at the top.  Left of the square: circle, triangle, star.  Below the circle: triangle.
SCENE = [(S["square"], C["red"], Z["large"], 80, 50), (S["circle"], C["purple"], Z["small"], 20, 50),
         (S["triangle"], C["green"], Z["large"], 20, 85), (S["star"], C["yellow"], Z["small"], 50, 15)]
LEFT, RIGHT, ABOVE, BELOW = range(4)
CIRCLE = ("filter", (S["circle"], None, None))
TRIANGLE = ("filter", (S["triangle"], None, None))
SQUARE = ("filter", (S["square"], None, None))
STAR = ("filter", (S["star"], None, None))
U = ("unique",)
SMALL, LARGE = ("filter", (None, None, Z["small"])), ("filter", (None, None, Z["large"]))
EVERY = ("filter", ANY)

HAND_BUILT = [  # (family, hops, program, answer): "what color is the circle ?" ...
    ("query_attribute", 1, (CIRCLE, U, ("query", "color")), "purple"),
    ("query_attribute", 2, (CIRCLE, U, ("relate", BELOW), EVERY, U, ("query", "color")), "green"),
    ("query_attribute", 3, (CIRCLE, U, ("relate", BELOW), EVERY, U, ("relate", ABOVE), LARGE, U,
                            ("query", "shape")), "square"),  # the large object above the shape below the circle
    ("count", 1, (SMALL, ("count",)), "two"),
    ("count", 2, (SQUARE, U, ("relate", LEFT), EVERY, ("count",)), "three"),
    ("count", 2, (STAR, U, ("same", "size"), EVERY, ("count",)), "one"),  # other objects as small as the star
    ("count", 3, (CIRCLE, U, ("relate", ABOVE), EVERY, U, ("relate", BELOW), EVERY, ("count",)), "three"),
    ("exist", 1, (("filter", (S["cross"], None, None)), ("exist",)), "no"),
    ("exist", 2, (TRIANGLE, U, ("relate", RIGHT), ("filter", (None, C["red"], None)), ("exist",)), "yes"),
    ("exist", 2, (TRIANGLE, U, ("relate", RIGHT), ("filter", (None, C["blue"], None)), ("exist",)), "no"),
    ("exist", 3, (SQUARE, U, ("relate", BELOW), EVERY, U, ("relate", ABOVE), STAR, ("exist",)), "yes"),
    ("compare", 1, (SMALL, ("count",), ("scene",), LARGE, ("count",), ("compare", "equal")), "yes"),
    ("compare", 1, (SMALL, ("count",), ("scene",), LARGE, ("count",), ("compare", "more")), "no"),
    ("compare", 2, (SQUARE, U, ("relate", LEFT), EVERY, ("count",), ("scene",), CIRCLE, ("count",),
                    ("compare", "more")), "yes"),
    ("compare", 3, (CIRCLE, U, ("relate", ABOVE), EVERY, U, ("relate", BELOW), EVERY, ("count",), ("scene",),
                    SMALL, ("count",), ("compare", "fewer")), "no"),
    ("same_attribute", 1, (CIRCLE, U, ("scene",), STAR, U, ("equal", "size")), "yes"),
    ("same_attribute", 1, (CIRCLE, U, ("scene",), TRIANGLE, U, ("equal", "color")), "no"),
    ("same_attribute", 2, (CIRCLE, U, ("relate", BELOW), EVERY, U, ("scene",), SQUARE, U, ("equal", "size")), "yes"),
    ("same_attribute", 3, (CIRCLE, U, ("relate", BELOW), EVERY, U, ("relate", RIGHT), LARGE, U, ("scene",), CIRCLE, U,
                           ("equal", "shape")), "no"),  # the large object right of the triangle is the square
]


@pytest.mark.parametrize("family, hops, program, answer", HAND_BUILT, ids=lambda v: v if isinstance(v, str) else None)
def test_hand_built_programs_have_known_answers(family, hops, program, answer):
    assert execute(program, SCENE, MARGIN) == answer
    assert program_hops(program) == hops
    text = rationale(program, SCENE, MARGIN)
    assert text.endswith(answer) and set(text.split()) <= set(vocabulary()) | set(VOCABULARY), text


def test_hand_built_families_cover_every_hop_count():
    assert {(f, h) for f, h, _, _ in HAND_BUILT} == {(f, h) for f in FAMILIES for h in range(1, MAX_HOPS + 1)}


def test_a_rationale_walks_the_program():
    program = (CIRCLE, U, ("relate", BELOW), EVERY, U, ("query", "color"))
    assert rationale(program, SCENE, MARGIN) == (
        "the circle is the small purple circle at the left . the object below it is the large green triangle "
        "at the bottom left . its color is green")
    program = (SQUARE, U, ("relate", LEFT), ("filter", (None, None, Z["small"])), ("count",))
    assert rationale(program, SCENE, MARGIN) == (
        "the square is the large red square at the right . the small objects left of it are the small purple circle "
        "at the left and the small yellow star at the top . so the answer is two")


def test_ill_defined_programs_give_none():
    assert execute((SMALL, U, ("query", "color")), SCENE, MARGIN) is None  # two small objects
    assert execute((("filter", (S["cross"], None, None)), U, ("query", "color")), SCENE, MARGIN) is None  # no cross
    assert execute((SQUARE, U, ("relate", LEFT), EVERY, U, ("query", "color")), SCENE, MARGIN) is None  # three
    assert rationale((SMALL, U, ("query", "color")), SCENE, MARGIN) is None
    # 0 red square, 1 blue circle 10 % left of it (inside the margin), 2 green triangle clearly left of it
    near = [(S["square"], C["red"], Z["large"], 50, 50), (S["circle"], C["blue"], Z["small"], 40, 20),
            (S["triangle"], C["green"], Z["small"], 20, 50)]
    assert relation(near[1], near[0], LEFT, MARGIN) is None
    left_of_square = (SQUARE, U, ("relate", LEFT))
    assert execute(left_of_square + (EVERY, ("count",)), near, MARGIN) is None  # the circle would decide
    assert execute(left_of_square + (EVERY, U, ("query", "color")), near, MARGIN) is None
    assert execute(left_of_square + (("filter", (None, C["blue"], None)), ("exist",)), near, MARGIN) is None
    assert execute(left_of_square + (EVERY, ("exist",)), near, MARGIN) == "yes"  # the triangle, whatever the circle
    assert execute(left_of_square + (("filter", (None, C["green"], None)), U, ("query", "shape")), near,
                   MARGIN) == "triangle"
    assert execute(left_of_square + (("filter", (None, C["yellow"], None)), ("count",)), near, MARGIN) == "zero"


@pytest.mark.parametrize("program, message", [
    ((("fly",),), "must be a tuple starting with one of"),
    ((("filter", (9, None, None)),), "a filter is"),
    ((("relate", 0),), "needs an object, but the value so far is a set"),
    ((CIRCLE, U, ("relate", 7)), "relation must be an index"),
    ((CIRCLE, U, ("query", "weight")), "attribute must be one of"),
    ((CIRCLE, ("count",), ("compare", "more")), "needs a count kept by an earlier"),
    ((CIRCLE,), "must end on an answer"),
    ((), "an empty program"),
])
def test_malformed_programs_are_refused(program, message):
    with pytest.raises(ValueError, match=message):
        execute(program, SCENE, MARGIN)


def test_generator_refuses_bad_arguments():
    d = Draw(np.random.default_rng(0))
    with pytest.raises(ValueError, match="per_hops entries must be hop counts in 1..3"):
        reasoning_questions(SCENE, d, MARGIN, {}, per_hops=(1, 4))
    with pytest.raises(ValueError, match="at least one object"):
        reasoning_questions([], d, MARGIN, {})
    objects = np.zeros((2, 4, 6), dtype=np.int64)
    with pytest.raises(ValueError, match="split_name must be one of"):
        make_instructions(objects, 0, "dev")
    with pytest.raises(ValueError, match=r"shape \(N, 4, 6\)"):
        make_instructions(objects[:, :, :5], 0, "train")
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        make_instructions(objects, -1, "train")


def test_a_hand_built_scene_gets_one_question_per_hop_count():
    qs = reasoning_questions(SCENE, Draw(np.random.default_rng(0)), MARGIN, {}, per_hops=(1, 2, 3, 3))
    assert [q.hops for q in qs] == [1, 2, 3, 3] and len({q.text for q in qs}) == 4
    objs = [{"shape": SHAPES[o[0]], "color": COLORS[o[1]], "size": SIZES[o[2]], "x": o[3], "y": o[4]} for o in SCENE]
    for q in qs:
        assert read(objs, q.text) == q.answer == execute(q.program, SCENE, MARGIN), q
    one = reasoning_questions(SCENE[:1], Draw(np.random.default_rng(0)), MARGIN, {})  # nothing to relate to
    assert [q.hops for q in one] == [1, 2]  # "how many objects are left of the square ?" still has an answer


# ------------------------------------------------------------------ generated questions, re-derived
def test_every_answer_is_recomputed_from_text_and_program(data):
    checked = Counter()
    for name in data:
        for objs, row, qs in data[name]:
            scene = scene_list(row)
            for q in qs:
                assert isinstance(q, ReasoningQuestion) and q.family in FAMILIES
                assert execute(q.program, scene, MARGIN) == q.answer, q
                assert read(objs, q.text) == q.answer, (q, objs)  # Ambiguous if a margin relation would decide
                assert program_hops(q.program) == q.hops
                assert q.rationale == rationale(q.program, scene, MARGIN) and q.rationale.endswith(" " + q.answer)
                checked[q.family] += 1
    assert min(checked.values()) > 50, checked


def test_rationales_describe_real_objects_where_they_are(data):
    full = re.compile(rf"the ({'|'.join(SIZES)}) ({'|'.join(COLORS)}) ({'|'.join(SHAPES)}) (?:is )?"
                      r"(at the (?:top|bottom|left|right)(?: left| right)?|in the middle)")
    seen = 0
    for objs, _, qs in data["train"]:
        for q in qs:
            for m in full.finditer(q.rationale):
                (o,) = [o for o in objs if (o["size"], o["color"], o["shape"]) == m.groups()[:3]]
                where = m[4].split()[2:] if m[4].startswith("at") else []
                vertical = next((w for w in where if w in ("top", "bottom")), "")
                horizontal = next((w for w in where if w in ("left", "right")), "")
                assert vertical == ("top" if o["y"] < 100 / 3 else "bottom" if o["y"] > 200 / 3 else ""), (q, o)
                assert horizontal == ("left" if o["x"] < 100 / 3 else "right" if o["x"] > 200 / 3 else ""), (q, o)
                seen += 1
    assert seen > len(data["train"])


def test_ambiguous_relations_are_common_but_never_decide(data):
    """read() raises Ambiguous whenever a relation inside the margin is consulted for an object its noun phrase
    names; it passed for every question above. Here: such relations are frequent, so that check has teeth."""
    scenes_with = 0
    for objs, _, _ in data["train"]:
        pairs = [(a, b) for a in objs for b in objs if a is not b]
        scenes_with += any(0 < abs(a["x"] - b["x"]) < MARGIN or 0 < abs(a["y"] - b["y"]) < MARGIN for a, b in pairs)
    assert scenes_with > 0.3 * len(data["train"])
    with pytest.raises(Ambiguous):
        near = [{"shape": "square", "color": "red", "size": "large", "x": 50, "y": 50},
                {"shape": "circle", "color": "blue", "size": "small", "x": 40, "y": 20}]
        read(near, "how many objects are left of the square ?")


def test_determinism_and_chunk_prefix(world, data):
    objects = world["train"].objects
    again = make_instructions(objects, SEED, "train", MARGIN)
    assert [x["reasoning"] for x in again] == [qs for _, _, qs in data["train"]]
    other = make_instructions(objects, SEED + 1, "train", MARGIN)
    assert [x["reasoning"] for x in other] != [qs for _, _, qs in data["train"]]
    assert make_instructions(objects[:40], SEED, "train", MARGIN) == again[:40]  # an image depends on its chunk
    assert make_instructions(objects[:40], SEED, "val", MARGIN) != again[:40]  # splits draw apart


def test_hops_families_and_answer_balance(data):
    qs = questions(data)
    n = len(data["train"])
    hops = Counter(q.hops for q in qs)
    assert hops[1] == hops[2] == n and hops[3] > 0.6 * n, hops  # one per hop count where the scene allows
    cells = Counter((q.family, q.hops) for q in qs)
    for h in (1, 2):  # families used evenly at each hop count, within 10 % (a 3-hop question of some is rarer)
        assert max(cells[f, h] for f in FAMILIES) - min(cells[f, h] for f in FAMILIES) <= 0.1 * n / 5, cells
    assert min(cells[f, 3] for f in FAMILIES) > 0.1 * hops[3], cells
    answers = defaultdict(Counter)
    for q in qs:
        answers[q.family, q.hops][q.answer] += 1
    # yes/no per family and hop count: |yes - no| within 10 % of the questions (or 3) for exist and compare, 25 %
    # for same_attribute (two objects that share a colour are rare, so "no" runs ahead in small scenes)
    for family, tolerance in (("exist", 0.1), ("compare", 0.1), ("same_attribute", 0.25)):
        for h in range(1, MAX_HOPS + 1):
            a = answers[family, h]
            assert set(a) == {"yes", "no"}, (family, h, a)
            assert abs(a["yes"] - a["no"]) <= max(3, tolerance * sum(a.values())), (family, h, a)
    for h in (1, 2):  # counts: no number word takes more than half of a hop count's answers
        a = answers["count", h]
        assert max(a.values()) <= 0.5 * sum(a.values()) and len(a) >= 3, (h, a)
    sizes = Counter(q.answer for q in qs if q.family == "query_attribute" and q.answer in SIZES)
    assert abs(sizes["small"] - sizes["large"]) <= max(4, 0.15 * sum(sizes.values())), sizes
    colors = Counter(q.answer for q in qs if q.family == "query_attribute" and q.answer in COLORS)
    assert len(colors) == len(COLORS) and max(colors.values()) <= 3 * min(colors.values()), colors


def test_no_question_outside_comp_names_a_held_out_pair(data):
    named = re.compile("|".join(rf"\b{c} {s}(e?s)?\b" for c, s in HELD_OUT_PAIRS))
    train = [t for q in questions(data, "train") for t in (q.text, q.rationale)]
    assert not any(named.search(t) for t in train)
    comp = [q.text for q in questions(data, "comp")]
    assert any(named.search(t) for t in comp)  # in comp the held-out pairs are what the scenes are about


def test_vocabulary_covers_every_text(data):
    assert VOCABULARY == tuple(sorted(set(VOCABULARY))) and not set(VOCABULARY) & set(vocabulary())
    assert set(VOCABULARY) <= set(INSTRUCT_VOCABULARY)
    words = set(vocabulary()) | set(VOCABULARY)
    used = set()
    for name in data:
        for q in questions(data, name):
            for text in (q.text, q.rationale, q.answer):
                assert re.fullmatch(r"[a-z?.]+( [a-z?.]+)*", text), text  # single spaces, no other punctuation
                used |= set(text.split())
    assert used <= words, used - words
    assert set(VOCABULARY) <= used  # every listed word is needed
