"""Multi-step reasoning questions computed from small programs over a scene (CLEVR-style).

A program is a tuple of plain-data steps, run left to right on one value (a set of objects, one object,
a number, a truth value or a word) that starts as the set of all objects of the scene:
  ("filter", F)      set -> its members matching F = (shape, colour, size) ids, None = any value
  ("unique",)        set -> its single member (ill-defined unless it has exactly one, clearly)
  ("relate", r)      object -> the set of other objects in relation r (index into RELATIONS) to it
  ("same", attr)     object -> the set of other objects with the same attr ("shape", "color" or "size")
  ("count",)         set -> its number of members
  ("exist",)         set -> does it have a member?
  ("query", attr)    object -> the word of its attr ("red", "circle", "small")
  ("scene",)         keep the value aside and start a second chain from the set of all objects
  ("compare", op)    the first chain's number, this chain's number -> is it "more", "fewer" or "equal"?
  ("equal", attr)    the first chain's object, this chain's object -> do they share attr?
Relations use the world's margin (mmlite.data.semantics.relation): an object inside the margin of a
relate step is neither in nor out of its set, and a program whose answer would depend on such an
object (a count, a unique reference, "no" to an existence question) is ill-defined: `execute` gives
None for it and the generator never asks it. The generator is stricter still: no relate step of a
question it asks leaves an object inside the margin after its filter.

Hops. A chain is the run of steps from the start of a program, or from a ("scene",) step, to the next
("scene",) step or the end. The hops of a chain are 1 + the number of its relate and same steps: its
first filter picks the anchor (hop 1), and every relate or same step moves from one object to a new
set of objects (one hop more). The hops of a program are the most hops of any of its chains:
  1 hop   "what color is the circle ?"                        filter unique query
  2 hops  "what color is the shape left of the circle ?"      filter unique relate filter unique query
  3 hops  "how many objects are below the shape left of the red square ?"
          filter unique relate filter unique relate filter count
  1 hop   "are there more red objects than circles ?"         filter count scene filter count compare

Question families (FAMILIES): query_attribute (a word), count (a number word), exist, compare (more /
fewer / as many, on two counts) and same_attribute (do two objects share a colour, shape or size?);
the last three answer yes or no. Answers are balanced per family and hop count as far as each scene
allows: every question aims at the answer its family at its hop count (for query_attribute: and its
attribute) has given least often so far in the `balance` dict, which for "yes"/"no" is questions.py's
rule; a yes/no family (and a count of 2-3 hops, between "zero" and "one") that would fall more than
two answers out of balance leaves the place to another family instead. Families are balanced per hop
count the same way. Each question also
carries a rationale derived from its program, for "reason, then answer" training:
  "the circle is the large red circle at the right . the only shape left of it is the small blue square
   at the left . its color is blue"
Outside the `comp` split no question names a held-out colour-shape pair.
"""

from __future__ import annotations

from typing import NamedTuple

from mmlite.data.grammar import Draw, indefinite, phrase
from mmlite.data.semantics import NOUNS, RELATION_PHRASES, Obj, matches
from mmlite.data.semantics import relation as _relation
from mmlite.data.world import COLORS, NUMBERS, RELATIONS, SHAPES, SIZES, names_held_out

FAMILIES: tuple[str, ...] = ("query_attribute", "count", "exist", "compare", "same_attribute")
ATTRIBUTES: tuple[str, ...] = ("shape", "color", "size")  # index = column of the objects array / filter slot
COMPARISONS: tuple[str, ...] = ("more", "fewer", "equal")
MAX_HOPS = 3
# Words this module can emit in questions, answers and rationales beyond mmlite.data.dataset.vocabulary().
VOCABULARY: tuple[str, ...] = tuple(sorted((
    ".", "another", "answer", "as", "at", "bottom", "fewer", "it", "its", "makes", "middle", "more", "only",
    "other", "same", "so", "than", "that", "top")))

_VALUES = (SHAPES, COLORS, SIZES)
_STEP_ARITY = {"filter": 1, "unique": 0, "relate": 1, "same": 1, "count": 0, "exist": 0, "query": 1, "scene": 0,
               "compare": 1, "equal": 1}
# A reference is (names the shape, names the colour, names the size).
_ANCHOR_FORMS = ((True, False, False), (True, False, True), (True, True, False), (True, True, True),
                 (False, True, False), (False, True, True), (False, False, True))
_TARGET_FORMS = ((False, False, False), (True, False, False), (False, True, False), (False, False, True),
                 (True, True, False))  # "the shape left of ...", "the circle left of ...", ...
_PARENTS_PER_OBJECT = 2  # references of one object that deeper references may build on
_TRIES = 16  # random candidates drawn per set-based question
_YES_NO = ("yes", "no")


class ReasoningQuestion(NamedTuple):
    text: str  # "what color is the shape left of the circle ?"
    answer: str  # one word: a colour, shape, size, number word, "yes" or "no"
    family: str  # one of FAMILIES
    hops: int  # 1..MAX_HOPS, see the module docstring
    program: tuple  # plain-data steps, see the module docstring
    rationale: str  # step-by-step explanation derived from the program, ending with the answer


# ---------------------------------------------------------------- executing programs
class _Set(NamedTuple):
    sure: tuple[int, ...]  # indices of the objects clearly in the set
    maybe: tuple[int, ...]  # indices inside a relation's margin: neither clearly in nor out


def _check_step(k: int, step: object) -> None:
    if not isinstance(step, tuple) or not step or step[0] not in _STEP_ARITY:
        raise ValueError(f"program step {k} must be a tuple starting with one of {sorted(_STEP_ARITY)}, got {step!r}")
    op = step[0]
    if len(step) != 1 + _STEP_ARITY[op]:
        raise ValueError(f"program step {k} {op!r} takes {_STEP_ARITY[op]} argument(s), got {step!r}")
    arg = step[1] if len(step) > 1 else None
    if op == "filter" and not (isinstance(arg, tuple) and len(arg) == 3
                               and all(v is None or 0 <= v < len(vs) for v, vs in zip(arg, _VALUES))):
        raise ValueError(f"program step {k}: a filter is (shape, colour, size) ids or None, got {arg!r}")
    if op == "relate" and arg not in range(len(RELATIONS)):
        raise ValueError(f"program step {k}: relation must be an index into RELATIONS (0..3), got {arg!r}")
    if op in ("same", "query", "equal") and arg not in ATTRIBUTES:
        raise ValueError(f"program step {k}: attribute must be one of {ATTRIBUTES}, got {arg!r}")
    if op == "compare" and arg not in COMPARISONS:
        raise ValueError(f"program step {k}: comparison must be one of {COMPARISONS}, got {arg!r}")


def trace(program: tuple, objs: list[Obj], margin: int) -> list[object] | None:
    """The value after each step of `program` on a scene, or None if the program is ill-defined there.

    Values: _Set(sure, maybe) of object indices, an object index (int), a count ("n", k), a truth value
    (bool) or a word (str). Raises ValueError for a malformed program (unknown step, wrong value type).
    """
    value: object = _Set(tuple(range(len(objs))), ())
    kept: list[object] = []
    out: list[object] = []
    for k, step in enumerate(program):
        _check_step(k, step)
        op, arg = step[0], step[1] if len(step) > 1 else None
        wants = "set" if op in ("filter", "unique", "count", "exist") else "none" if op == "scene" else \
            "number" if op == "compare" else "object"
        got = "set" if isinstance(value, _Set) else "number" if isinstance(value, tuple) else \
            "object" if isinstance(value, int) and not isinstance(value, bool) else "answer"
        if wants != "none" and wants != got:
            an = lambda w: ("an " if w[0] in "aeiou" else "a ") + w  # noqa: E731
            raise ValueError(f"program step {k} {op!r} needs {an(wants)}, but the value so far is {an(got)}")
        if op == "filter":
            value = _Set(tuple(i for i in value.sure if matches(objs[i], arg)),
                         tuple(i for i in value.maybe if matches(objs[i], arg)))
        elif op == "unique":
            if value.maybe or len(value.sure) != 1:
                return None
            value = value.sure[0]
        elif op == "relate":
            truths = [(i, _relation(objs[i], objs[value], arg, margin)) for i in range(len(objs)) if i != value]
            value = _Set(tuple(i for i, t in truths if t is True), tuple(i for i, t in truths if t is None))
        elif op == "same":
            a = ATTRIBUTES.index(arg)
            value = _Set(tuple(i for i in range(len(objs)) if i != value and objs[i][a] == objs[value][a]), ())
        elif op == "count":
            if value.maybe:
                return None
            value = ("n", len(value.sure))
        elif op == "exist":
            if not value.sure and value.maybe:
                return None
            value = bool(value.sure)
        elif op == "query":
            a = ATTRIBUTES.index(arg)
            value = _VALUES[a][objs[value][a]]
        elif op == "scene":
            kept.append(value)
            value = _Set(tuple(range(len(objs))), ())
        elif op == "compare":
            first = kept.pop() if kept else None
            if not (isinstance(first, tuple) and first[0] == "n"):
                raise ValueError(f"program step {k} 'compare' needs a count kept by an earlier ('scene',) step")
            value = {"more": first[1] > value[1], "fewer": first[1] < value[1], "equal": first[1] == value[1]}[arg]
        else:  # equal
            first = kept.pop() if kept else None
            if not isinstance(first, int) or isinstance(first, bool):
                raise ValueError(f"program step {k} 'equal' needs an object kept by an earlier ('scene',) step")
            a = ATTRIBUTES.index(arg)
            value = objs[first][a] == objs[value][a]
        out.append(value)
    return out


def execute(program: tuple, objs: list[Obj], margin: int) -> str | None:
    """The answer word of `program` on a scene (objs from mmlite.data.semantics.scene_list), or None when the
    program is ill-defined there (a reference that is not unique, an answer decided by a relation inside
    the margin). Computed from the objects alone, independently of how questions are worded."""
    values = trace(program, objs, margin)
    if values is None:
        return None
    if not values:
        raise ValueError("an empty program has no answer")
    last = values[-1]
    if isinstance(last, bool):
        return "yes" if last else "no"
    if isinstance(last, str):
        return last
    if isinstance(last, tuple) and last[0] == "n":
        return NUMBERS[last[1]] if last[1] < len(NUMBERS) else str(last[1])
    raise ValueError(f"a program must end on an answer (count, exist, query, compare, equal), it ends on {last!r}")


def program_hops(program: tuple) -> int:
    """Hops of a program: the most, over its chains, of 1 + its relate and same steps."""
    hops, best = 1, 1
    for step in program:
        if step[0] in ("relate", "same"):
            hops += 1
        elif step[0] == "scene":
            hops = 1
        best = max(best, hops)
    return best


def program_filters(program: tuple) -> list[tuple]:
    """Every (shape, colour, size) filter a program names."""
    return [step[1] for step in program if step[0] == "filter"]


# ---------------------------------------------------------------- rationales
def _position(o: Obj) -> str:
    """Coarse place of an object: "at the top left", "at the right", "in the middle"."""
    v = "top" if o[4] < 100 / 3 else "bottom" if o[4] > 200 / 3 else ""
    h = "left" if o[3] < 100 / 3 else "right" if o[3] > 200 / 3 else ""
    where = " ".join(w for w in (v, h) if w)
    return f"at the {where}" if where else "in the middle"


def _full(o: Obj) -> str:
    """ "the small red circle at the top left" """
    return f"the {phrase((o[0], o[1], o[2]))} {_position(o)}"


def _describe_set(members: tuple[int, ...], objs: list[Obj], singular: str, plural: str) -> str:
    if not members:
        return f"there is no {singular}"
    if len(members) == 1:
        return f"the only {singular} is {_full(objs[members[0]])}"
    return f"the {plural} are " + " and ".join(_full(objs[i]) for i in members)


def rationale(program: tuple, objs: list[Obj], margin: int) -> str | None:
    """Step-by-step text of how `program` reaches its answer on a scene (None if it is ill-defined).

    Each object the program singles out is described in full with its coarse position, each set it
    counts or tests is listed, and the text ends with the answer ("its color is blue", "so the answer is
    two"), so a model can be trained to reason, then answer.
    """
    values = trace(program, objs, margin)
    if values is None:
        return None
    answer = execute(program, objs, margin)
    sentences: list[str] = []
    where = ("all",)  # how the current set was reached: ("all",), ("relate", r) or ("same", attr)
    f: tuple = (None, None, None)
    for k, step in enumerate(program):
        op = step[0]
        if op in ("relate", "same"):
            where, f = (op, step[1]), (None, None, None)
        elif op == "scene":
            where, f = ("all",), (None, None, None)
        elif op == "filter":
            f = tuple(a if a is not None else b for a, b in zip(step[1], f))
        elif op in ("unique", "count", "exist"):
            if where[0] == "all":
                singular, plural = phrase(f), phrase(f, plural=True)
            elif where[0] == "relate":
                singular, plural = (f"{phrase(f, plural=p)} {RELATIONS[where[1]]} it" for p in (False, True))
            else:
                singular, plural = (f"other {phrase(f, plural=p)} of the same {where[1]}" for p in (False, True))
            if op == "unique":
                o = objs[values[k]]
                named = where[0] == "all" and f == (o[0], o[1], o[2])  # "the small red circle is at the top"
                sentences.append(f"the {singular} is {_position(o) if named else _full(o)}")
            else:
                sentences.append(_describe_set(values[k - 1].sure, objs, singular, plural))
                if op == "count" and k < len(program) - 1:
                    sentences.append(f"that makes {NUMBERS[values[k][1]]}")
        elif op == "query":
            sentences.append(f"its {step[1]} is {values[k]}")
    if program[-1][0] != "query":
        sentences.append(f"so the answer is {answer}")
    return " . ".join(sentences)


# ---------------------------------------------------------------- references to objects, 1..MAX_HOPS hops
class _Ref(NamedTuple):
    obj: int  # index of the object referred to
    steps: tuple  # program steps that end on it: (..., ("unique",))
    target: tuple  # filter of the last set, matching obj alone there
    noun: str  # noun of the phrase when target names no shape
    words: str  # phrase of the relation from the parent ("" for an anchor)
    parent: "_Ref | None"  # the reference this one is related to (None for an anchor)
    chain: tuple[int, ...]  # objects the reference walks through, anchor first
    hops: int


def _ref_text(ref: _Ref, noun: str | None = None) -> str:
    """The noun phrase of a reference without "the": "shape left of the red circle"."""
    head = phrase(ref.target, noun or ref.noun)
    return head if ref.parent is None else f"{head} {ref.words} the {_ref_text(ref.parent)}"


def _form_filter(o: Obj, form: tuple[bool, bool, bool]) -> tuple:
    return tuple(o[a] if form[a] else None for a in range(3))


class _Scene:
    """A scene's relation sets and its references of 1..max_hops hops, built once per scene."""

    def __init__(self, objs: list[Obj], d: Draw, margin: int, max_hops: int) -> None:
        self.objs, self.margin, n = objs, margin, len(objs)
        self.rel = {}  # (j, r) -> _Set of the objects in relation r to object j
        for j in range(n):
            for r in range(len(RELATIONS)):
                truths = [(i, _relation(objs[i], objs[j], r, margin)) for i in range(n) if i != j]
                self.rel[j, r] = _Set(tuple(i for i, t in truths if t is True),
                                      tuple(i for i, t in truths if t is None))
        self.refs: dict[int, list[_Ref]] = {1: []}
        for i, o in enumerate(objs):
            for form in _ANCHOR_FORMS:
                f = _form_filter(o, form)
                if sum(matches(p, f) for p in objs) == 1:
                    self.refs[1].append(_Ref(i, (("filter", f), ("unique",)), f, d.choice(NOUNS), "", None, (i,), 1))
        for h in range(2, max_hops + 1):
            self.refs[h] = []
            for parent in self.parents(h - 1, d):
                for r in range(len(RELATIONS)):
                    s = self.rel[parent.obj, r]
                    pool = s.sure + s.maybe
                    for i in s.sure:
                        if i in parent.chain:
                            continue
                        words = d.choice(RELATION_PHRASES[r])
                        for form in _TARGET_FORMS:
                            g = _form_filter(objs[i], form)
                            if sum(matches(objs[p], g) for p in pool) == 1:
                                steps = parent.steps + (("relate", r), ("filter", g), ("unique",))
                                self.refs[h].append(_Ref(i, steps, g, d.choice(NOUNS), words, parent,
                                                         parent.chain + (i,), h))

    def parents(self, h: int, d: Draw) -> list[_Ref]:
        """Up to _PARENTS_PER_OBJECT random h-hop references per object, for deeper references to build on."""
        out = []
        for i in range(len(self.objs)):
            mine = [ref for ref in self.refs.get(h, []) if ref.obj == i]
            out += d.shuffled(mine)[:_PARENTS_PER_OBJECT]
        return out

    def filters(self) -> list[tuple]:
        """Filters a set question may use: anything, every single value, and the scene's colour-shape pairs."""
        out = [(None, None, None)]
        out += [(s, None, None) for s in range(len(SHAPES))] + [(None, c, None) for c in range(len(COLORS))]
        out += [(None, None, z) for z in range(len(SIZES))] + [(o[0], o[1], None) for o in self.objs]
        return out


class _SetQ(NamedTuple):
    """A set of objects a count / exist / compare question is about."""

    steps: tuple  # program steps that end on the set
    members: tuple[int, ...]  # indices of its objects (the generator keeps only clear sets)
    g: tuple  # its last filter
    noun: str
    how: str  # "all" (a 1-hop set), "relate" or "same"
    words: str  # relation phrase (how == "relate") or attribute name (how == "same")
    parent: _Ref | None


def _sample_set(sc: _Scene, h: int, d: Draw, allow_same: bool) -> _SetQ | None:
    """One random h-hop set, or None when the draw gives an unclear set (an object inside the margin)."""
    if d.u() < 0.5:  # half the time a filter that some object matches, so "yes" and non-zero counts stay common
        o = d.choice(sc.objs)
        g = _form_filter(o, d.choice(_TARGET_FORMS))
    else:
        g = d.choice(sc.filters())
    noun = d.choice(NOUNS)
    if h == 1:
        members = tuple(i for i, o in enumerate(sc.objs) if matches(o, g))
        return _SetQ((("filter", g),), members, g, noun, "all", "", None)
    parents = [ref for ref in sc.refs.get(h - 1, [])]
    if not parents:
        return None
    parent = d.choice(parents)
    if allow_same and d.u() < 0.25:
        attr = d.choice(ATTRIBUTES)
        a = ATTRIBUTES.index(attr)
        if g[a] is not None:
            return None
        members = tuple(i for i, o in enumerate(sc.objs)
                        if i != parent.obj and o[a] == sc.objs[parent.obj][a] and matches(o, g))
        return _SetQ(parent.steps + (("same", attr), ("filter", g)), members, g, noun, "same", attr, parent)
    r = d.below(len(RELATIONS))
    s = sc.rel[parent.obj, r]
    if any(matches(sc.objs[i], g) for i in s.maybe):
        return None
    members = tuple(i for i in s.sure if matches(sc.objs[i], g))
    return _SetQ(parent.steps + (("relate", r), ("filter", g)), members, g, noun, "relate",
                 d.choice(RELATION_PHRASES[r]), parent)


def _set_text(s: _SetQ, plural: bool) -> str:
    """ "red objects left of the circle" (plural) or "red object left of the circle"; for "same" sets only the
    noun phrase (the templates place "other" and "the same <attr> as")."""
    head = phrase(s.g, s.noun, plural=plural)
    return f"{head} {s.words} the {_ref_text(s.parent)}" if s.how == "relate" else head


# ---------------------------------------------------------------- families
def pick_balanced(cands: list[tuple[str, object]], key: str, balance: dict[str, int], d: Draw,
                  expected: tuple[str, ...] = (), slack: int = 2) -> tuple[str, object] | None:
    """One candidate (answer, payload) whose answer `key` has given least often so far (None if there is none).

    balance["<key>/<answer>"] counts the answers given; ties go to a random answer, and the count of the
    chosen one goes up. For yes/no this is questions.py's rule: aim at the answer given less often.
    expected: answers that should stay balanced (("yes", "no")): when every answer the scene allows has
    been given more than `slack` times more often than one of them, None (let another question take
    this place) rather than widen the gap.
    """
    if not cands:
        return None
    count = lambda a: balance.get(f"{key}/{a}", 0)  # noqa: E731
    answers = sorted({a for a, _ in cands})
    least = min(count(a) for a in answers)
    if expected and least > min(count(a) for a in expected) + slack:
        return None
    answer = d.choice([a for a in answers if count(a) == least])
    choice = d.choice([c for c in cands if c[0] == answer])
    balance[f"{key}/{answer}"] = least + 1
    return choice


def _query_attribute(sc: _Scene, h: int, d: Draw, balance: dict[str, int]) -> tuple | None:
    for attr in d.shuffled(ATTRIBUTES):
        a = ATTRIBUTES.index(attr)
        cands = [(_VALUES[a][sc.objs[ref.obj][a]], ref) for ref in sc.refs.get(h, []) if ref.target[a] is None]
        got = pick_balanced(cands, f"query_attribute/{h}/{attr}", balance, d)
        if got is not None:
            answer, ref = got
            noun = "object" if attr == "shape" else None  # not "what shape is the shape ..."
            return f"what {attr} is the {_ref_text(ref, noun)} ?", answer, ref.steps + (("query", attr),)
    return None


def _count(sc: _Scene, h: int, d: Draw, balance: dict[str, int]) -> tuple | None:
    cands = []
    for _ in range(_TRIES):
        s = _sample_set(sc, h, d, allow_same=True)
        if s is not None:
            cands.append((NUMBERS[len(s.members)], s))
    got = pick_balanced(cands, f"count/{h}", balance, d, ("zero", "one") if h > 1 else ())
    if got is None:
        return None
    answer, s = got
    if s.how == "all":
        text = f"how many {_set_text(s, True)} are there ?"
    elif s.how == "relate":
        text = f"how many {phrase(s.g, s.noun, plural=True)} are {s.words} the {_ref_text(s.parent)} ?"
    else:
        text = f"how many other {_set_text(s, True)} are the same {s.words} as the {_ref_text(s.parent)} ?"
    return text, answer, s.steps + (("count",),)


def _exist(sc: _Scene, h: int, d: Draw, balance: dict[str, int]) -> tuple | None:
    cands = []
    for _ in range(_TRIES):
        s = _sample_set(sc, h, d, allow_same=True)
        if s is not None:
            cands.append(("yes" if s.members else "no", s))
    got = pick_balanced(cands, f"exist/{h}", balance, d, _YES_NO)
    if got is None:
        return None
    answer, s = got
    if s.how == "same":
        text = f"is there another {_set_text(s, False)} with the same {s.words} as the {_ref_text(s.parent)} ?"
    else:
        head = indefinite(phrase(s.g, s.noun))
        text = f"is there {head} ?" if s.how == "all" else f"is there {head} {s.words} the {_ref_text(s.parent)} ?"
    return text, answer, s.steps + (("exist",),)


def _compare(sc: _Scene, h: int, d: Draw, balance: dict[str, int]) -> tuple | None:
    cands = []
    for _ in range(_TRIES):
        a, b = _sample_set(sc, h, d, allow_same=False), _sample_set(sc, 1, d, allow_same=False)
        if a is None or b is None or (a.how == "all" and a.g == b.g) or not (a.members or b.members):
            continue
        op = d.choice(COMPARISONS)
        na, nb = len(a.members), len(b.members)
        yes = {"more": na > nb, "fewer": na < nb, "equal": na == nb}[op]
        cands.append(("yes" if yes else "no", (a, b, op)))
    got = pick_balanced(cands, f"compare/{h}", balance, d, _YES_NO)
    if got is None:
        return None
    answer, (a, b, op) = got
    ta, tb = _set_text(a, True), _set_text(b, True)
    text = f"are there as many {ta} as {tb} ?" if op == "equal" else f"are there {op} {ta} than {tb} ?"
    program = a.steps + (("count",), ("scene",)) + b.steps + (("count",), ("compare", op))
    return text, answer, program


def _same_attribute(sc: _Scene, h: int, d: Draw, balance: dict[str, int]) -> tuple | None:
    firsts, seconds = sc.refs.get(h, []), sc.refs[1]
    if not firsts or not seconds:
        return None
    cands = []
    for _ in range(_TRIES):
        a, b, attr = d.choice(firsts), d.choice(seconds), d.choice(ATTRIBUTES)
        k = ATTRIBUTES.index(attr)
        if b.obj in a.chain or a.target[k] is not None or b.target[k] is not None:
            continue
        same = sc.objs[a.obj][k] == sc.objs[b.obj][k]
        cands.append(("yes" if same else "no", (a, b, attr)))
    got = pick_balanced(cands, f"same_attribute/{h}", balance, d, _YES_NO)
    if got is None:
        return None
    answer, (a, b, attr) = got
    noun = "object" if attr == "shape" else None
    text = f"is the {_ref_text(a, noun)} the same {attr} as the {_ref_text(b, noun)} ?"
    return text, answer, a.steps + (("scene",),) + b.steps + (("equal", attr),)


_MAKERS = {"query_attribute": _query_attribute, "count": _count, "exist": _exist, "compare": _compare,
           "same_attribute": _same_attribute}


def reasoning_questions(objs: list[Obj], d: Draw, margin: int, balance: dict[str, int], held_out_ok: bool = False,
                        per_hops: tuple[int, ...] = (1, 2, 3)) -> list[ReasoningQuestion]:
    """Reasoning questions about one scene: one per entry of per_hops (a hop count, 1..MAX_HOPS; repeat an
    entry for more questions of that depth), skipping a depth the scene cannot support (a 3-hop
    question needs two objects related beyond the margin). Texts are distinct.

    The family of each question is the one used least so far at its hop count (balance["family/<hops>/<name>"])
    that the scene supports; its answer is balanced per family and hop count as the module docstring says.
    `balance` is updated in place.
    held_out_ok: may a question name a held-out colour-shape pair (True in the `comp` split only)?
    Deterministic given the Draw.
    """
    for h in per_hops:
        if not isinstance(h, int) or isinstance(h, bool) or not 1 <= h <= MAX_HOPS:
            raise ValueError(f"per_hops entries must be hop counts in 1..{MAX_HOPS}, got {h!r}")
    if not objs:
        raise ValueError("a scene needs at least one object to ask about")
    sc = _Scene(objs, d, margin, max(per_hops, default=1))
    out: list[ReasoningQuestion] = []
    texts: set[str] = set()
    for h in per_hops:
        order = sorted(FAMILIES, key=lambda f: (balance.get(f"family/{h}/{f}", 0), d.u()))
        for family in order:
            trial = dict(balance)  # answer counts move only when the question is kept
            q = _MAKERS[family](sc, h, d, trial)
            if q is None:
                continue
            text, answer, program = q
            if text in texts or (not held_out_ok and any(map(names_held_out, program_filters(program)))):
                continue
            if execute(program, objs, margin) != answer:
                raise RuntimeError(f"generator and executor disagree on {text!r}: {answer!r} vs "
                                   f"{execute(program, objs, margin)!r}")
            balance.clear()
            balance.update(trial)
            balance[f"family/{h}/{family}"] = balance.get(f"family/{h}/{family}", 0) + 1
            out.append(ReasoningQuestion(text, answer, family, program_hops(program), program,
                                         rationale(program, objs, margin)))
            texts.add(text)
            break
    return out
