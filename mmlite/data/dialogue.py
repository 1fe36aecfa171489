"""Multi-turn dialogues about one image, every answer computed from the scene.

A dialogue is a list of 3-5 Turns. Beside its text, each turn stores a structured form from which
`answer_turn` recomputes the answer, given the object in focus (F = (shape, colour, size) ids, None
where unnamed; r indexes RELATIONS; attr is "shape", "color" or "size"):
  ("query", F, attr)   "what color is the square ?"                   the one object matching F
  ("relate", r, attr)  "and the one left of it ?" / "what size is the one above it ?"
                                                                      the one object in relation r to the focus
  ("attribute", attr)  "what size is it ?"                            the focus itself
  ("same", attr)       "how many other shapes are the same color as it ?"
  ("exist", r, F)      "is there a red shape below it ?"

Discourse state: the focus is the object the last reference resolved to. A query or relate turn moves
the focus to the object it names; a turn answered "there is none" clears it (the next turn starts
afresh); the other turns keep it. "it" and "the one ... it" always mean the focus. The ellipsis "and
the one left of it ?" asks for the attribute the turn before asked for, and is used only right after a
turn that asked for one.

NONE_ANSWER ("there is none") is the truthful answer when a query names no object ("what color is
the triangle ?" without a triangle: kind "query_none") or a relate turn finds nothing ("and the one
above it ?" with nothing clearly above: kind "relate_none"); each turn aims at one of NONE_KINDS with
probability NONE_RATE, so that hallucination can be measured. Turns are never ill-defined: no
reference names two objects, and no answer depends on a relation inside the world's margin
(`answer_turn` gives None for such a form). Outside the `comp` split no turn names a held-out
colour-shape pair. Yes/no answers of exist turns and the numbers of same turns are balanced with a
`balance` dict (mmlite.data.reasoning.pick_balanced): a turn that would widen the gap gives its place
to another kind.
"""

from __future__ import annotations

from typing import NamedTuple

from mmlite.data.grammar import Draw, indefinite, phrase, unique_refs
from mmlite.data.reasoning import ATTRIBUTES, pick_balanced
from mmlite.data.semantics import NOUN_PLURALS, NOUNS, RELATION_PHRASES, Obj, count, matches
from mmlite.data.semantics import relation as _relation
from mmlite.data.world import COLORS, NUMBERS, RELATIONS, SHAPES, SIZES, names_held_out

NONE_ANSWER = "there is none"
TURN_KINDS: tuple[str, ...] = ("query", "query_none", "relate", "relate_none", "attribute", "same", "exist")
NONE_KINDS: tuple[str, ...] = ("query_none", "relate_none")
REFERRING_KINDS: tuple[str, ...] = ("relate", "relate_none", "attribute", "same", "exist")
NONE_RATE = 0.2  # chance that a turn aims at a "there is none" answer
REFER_RATE = 0.85  # chance that a turn with an object in focus refers back to it
MIN_TURNS, MAX_TURNS = 3, 5
# Words this module can emit in questions and answers beyond mmlite.data.dataset.vocabulary().
VOCABULARY: tuple[str, ...] = tuple(sorted(("as", "it", "none", "other", "same")))

_VALUES = (SHAPES, COLORS, SIZES)
# Forms of a fresh reference (names the shape, colour, size) that leave the asked attribute unnamed.
_FREE_FORMS = {"color": ((True, False, False), (True, False, True), (False, False, True)),
               "shape": ((False, True, False), (False, True, True), (False, False, True)),
               "size": ((True, False, False), (True, True, False), (False, True, False))}
_EXIST_FILTERS = ([(None, None, None)] + [(s, None, None) for s in range(len(SHAPES))]
                  + [(None, c, None) for c in range(len(COLORS))])


class Turn(NamedTuple):
    question: str  # "and the one left of it ?"
    answer: str  # a word, a number word, "yes" / "no", or NONE_ANSWER
    kind: str  # one of TURN_KINDS
    refers_back: bool  # does the question mean the object in focus ("it")?
    form: tuple  # structured form, see the module docstring


# ---------------------------------------------------------------- the checker
def _word(o: Obj, attr: str) -> str:
    a = ATTRIBUTES.index(attr)
    return _VALUES[a][o[a]]


def _related(objs: list[Obj], focus: int, r: int, margin: int) -> tuple[list[int], list[int]]:
    """(indices clearly in relation r to the focus, indices inside the margin)."""
    truths = [(i, _relation(objs[i], objs[focus], r, margin)) for i in range(len(objs)) if i != focus]
    return [i for i, t in truths if t is True], [i for i, t in truths if t is None]


def answer_turn(form: tuple, objs: list[Obj], margin: int, focus: int | None) -> tuple[str, int | None] | None:
    """(answer, focus after the turn) of a turn's structured form, or None if it is ill-defined there
    (a reference to two objects, a relation inside the margin that would decide, "it" with no focus).

    focus: index into objs of the object in focus before the turn, or None. Raises ValueError for a
    form that is not one of the module docstring's.
    """
    kind = form[0] if isinstance(form, tuple) and form else None
    if kind == "query" and len(form) == 3:
        found = [i for i, o in enumerate(objs) if matches(o, form[1])]
        if not found:
            return NONE_ANSWER, None
        return (_word(objs[found[0]], form[2]), found[0]) if len(found) == 1 else None
    if kind not in ("relate", "attribute", "same", "exist") or len(form) != {"relate": 3, "attribute": 2,
                                                                             "same": 2, "exist": 3}[kind]:
        raise ValueError(f"a turn's form must be one of the dialogue module's forms, got {form!r}")
    if focus is None:
        return None
    if kind == "attribute":
        return _word(objs[focus], form[1]), focus
    if kind == "same":
        a = ATTRIBUTES.index(form[1])
        return NUMBERS[sum(1 for i, o in enumerate(objs) if i != focus and o[a] == objs[focus][a])], focus
    sure, maybe = _related(objs, focus, form[1], margin)
    if kind == "relate":
        if maybe or len(sure) > 1:
            return None
        return (_word(objs[sure[0]], form[2]), sure[0]) if sure else (NONE_ANSWER, None)
    if any(matches(objs[i], form[2]) for i in sure):  # exist
        return "yes", focus
    return None if any(matches(objs[i], form[2]) for i in maybe) else ("no", focus)


def replay(dialogue: list[Turn], objs: list[Obj], margin: int) -> list[str]:
    """Every answer of a dialogue recomputed from the scene and the turns' forms, carrying the focus along.

    Raises ValueError naming the first turn that is ill-defined for the scene.
    """
    focus, answers = None, []
    for k, turn in enumerate(dialogue):
        got = answer_turn(turn.form, objs, margin, focus)
        if got is None:
            raise ValueError(f"turn {k} {turn.question!r} (form {turn.form!r}) is ill-defined for this scene")
        answers.append(got[0])
        focus = got[1]
    return answers


# ---------------------------------------------------------------- generating turns
class _State(NamedTuple):
    focus: int | None  # index of the object in focus
    known: frozenset  # attributes of the focus the dialogue has named or answered
    last_attr: str | None  # attribute the previous turn asked for (for the ellipsis "and the one ... it ?")


def _query_turn(objs: list[Obj], d: Draw, none: bool, held_out_ok: bool) -> tuple[Turn, _State] | None:
    """A fresh "what <attr> is the <F> ?": about an object of the scene, or (none=True) about one it lacks."""
    for attr in d.shuffled(ATTRIBUTES):
        forms = _FREE_FORMS[attr]
        f, target = None, None
        if none:
            for _ in range(30):  # random attribute values until nothing in the scene matches
                form = d.choice(forms)
                cand = tuple(d.below(len(_VALUES[a])) if form[a] else None for a in range(3))
                if count(objs, cand) == 0 and (held_out_ok or not names_held_out(cand)):
                    f = cand
                    break
        else:
            cands = [(i, g) for i in range(len(objs)) for g in unique_refs(objs, i, forms)
                     if held_out_ok or not names_held_out(g)]
            if cands:
                target, f = d.choice(cands)
        if f is None:
            continue
        noun = "object" if attr == "shape" else d.choice(NOUNS)  # not "what shape is the red shape ?"
        text = f"what {attr} is the {phrase(f, noun)} ?"
        if none:
            return (Turn(text, NONE_ANSWER, "query_none", False, ("query", f, attr)),
                    _State(None, frozenset(), None))
        named = frozenset(a for a in ATTRIBUTES if f[ATTRIBUTES.index(a)] is not None) | {attr}
        return (Turn(text, _word(objs[target], attr), "query", False, ("query", f, attr)),
                _State(target, named, attr))
    return None


def _relate_turn(objs: list[Obj], d: Draw, margin: int, state: _State, none: bool) -> tuple[Turn, _State] | None:
    """ "and the one left of it ?": the one object clearly in a relation to the focus, or (none=True) nothing."""
    for r in d.shuffled(range(len(RELATIONS))):
        sure, maybe = _related(objs, state.focus, r, margin)
        if maybe or len(sure) != (0 if none else 1):
            continue
        elide = state.last_attr is not None and (none or d.u() < 0.6)
        attr = state.last_attr if elide else d.choice(ATTRIBUTES)
        words = d.choice(RELATION_PHRASES[r])
        text = f"and the one {words} it ?" if elide else f"what {attr} is the one {words} it ?"
        if none:
            return (Turn(text, NONE_ANSWER, "relate_none", True, ("relate", r, attr)),
                    _State(None, frozenset(), None))
        return (Turn(text, _word(objs[sure[0]], attr), "relate", True, ("relate", r, attr)),
                _State(sure[0], frozenset({attr}), attr))
    return None


def _attribute_turn(objs: list[Obj], d: Draw, state: _State) -> tuple[Turn, _State] | None:
    """ "what size is it ?" about an attribute of the focus the dialogue has not given yet."""
    unknown = [a for a in ATTRIBUTES if a not in state.known]
    if not unknown:
        return None
    attr = d.choice(unknown)
    return (Turn(f"what {attr} is it ?", _word(objs[state.focus], attr), "attribute", True, ("attribute", attr)),
            _State(state.focus, state.known | {attr}, attr))


def _same_turn(objs: list[Obj], d: Draw, state: _State, balance: dict[str, int]) -> tuple[Turn, _State] | None:
    """ "how many other shapes are the same color as it ?" """
    cands = []
    for attr in ATTRIBUTES:
        a = ATTRIBUTES.index(attr)
        k = sum(1 for i, o in enumerate(objs) if i != state.focus and o[a] == objs[state.focus][a])
        cands.append((NUMBERS[k], attr))
    got = pick_balanced(cands, "dialogue_same", balance, d, ("zero", "one", "two"), slack=3)
    if got is None:
        return None
    answer, attr = got
    noun = "objects" if attr == "shape" else d.choice(NOUN_PLURALS)
    return (Turn(f"how many other {noun} are the same {attr} as it ?", answer, "same", True, ("same", attr)),
            _State(state.focus, state.known, None))


def _exist_turn(objs: list[Obj], d: Draw, margin: int, state: _State, balance: dict[str, int]
                ) -> tuple[Turn, _State] | None:
    """ "is there a red shape below it ?", yes/no balanced; never decided by a relation inside the margin."""
    cands = []
    for _ in range(12):
        r, g = d.below(len(RELATIONS)), d.choice(_EXIST_FILTERS)
        sure, maybe = _related(objs, state.focus, r, margin)
        if any(matches(objs[i], g) for i in maybe):
            continue  # strict: no object inside the margin may match, even when another answers "yes"
        cands.append(("yes" if any(matches(objs[i], g) for i in sure) else "no", (r, g)))
    got = pick_balanced(cands, "dialogue_exist", balance, d, ("yes", "no"))
    if got is None:
        return None
    answer, (r, g) = got
    text = f"is there {indefinite(phrase(g, d.choice(NOUNS)))} {d.choice(RELATION_PHRASES[r])} it ?"
    return Turn(text, answer, "exist", True, ("exist", r, g)), _State(state.focus, state.known, None)


def _referring_turn(objs: list[Obj], d: Draw, margin: int, state: _State, balance: dict[str, int]
                    ) -> tuple[Turn, _State] | None:
    """A turn about the focus: relate, attribute, same or exist, the first in a random order the scene allows."""
    kinds = d.shuffled(("attribute", "same", "exist"))
    kinds.insert(0 if d.u() < 0.5 else d.below(4), "relate")  # often impossible: tried first half the time
    for kind in kinds:
        if kind == "relate":
            got = _relate_turn(objs, d, margin, state, none=False)
        elif kind == "attribute":
            got = _attribute_turn(objs, d, state)
        elif kind == "same":
            got = _same_turn(objs, d, state, balance)
        else:
            got = _exist_turn(objs, d, margin, state, balance)
        if got is not None:
            return got
    return None


def make_dialogue(objs: list[Obj], d: Draw, margin: int, balance: dict[str, int], held_out_ok: bool = False,
                  n_turns: int | None = None) -> list[Turn]:
    """A dialogue of n_turns (default: MIN_TURNS..MAX_TURNS at random) Turns about one scene.

    The first turn asks afresh; with an object in focus, a turn refers back to it with probability
    REFER_RATE (relate, attribute, same or exist, whichever the scene allows). A turn aims at a "there
    is none" answer with probability NONE_RATE (with an object in focus, mostly a relate turn that
    finds nothing when the scene has one; otherwise a query about something the scene lacks). Questions
    within a dialogue are distinct. `balance` is updated in place; held_out_ok: may a turn name a
    held-out colour-shape pair (True in `comp` only)?
    Deterministic given the Draw.
    """
    if not objs:
        raise ValueError("a scene needs at least one object to talk about")
    if n_turns is None:
        n_turns = MIN_TURNS + d.below(MAX_TURNS - MIN_TURNS + 1)
    if not isinstance(n_turns, int) or n_turns < 1:
        raise ValueError(f"n_turns must be a positive integer, got {n_turns!r}")
    state, turns, texts = _State(None, frozenset(), None), [], set()
    while len(turns) < n_turns:
        got = None
        for _ in range(10):  # until a question not asked yet in this dialogue
            got = None
            if d.u() < NONE_RATE:
                if state.focus is not None and d.u() < 0.6:
                    got = _relate_turn(objs, d, margin, state, none=True)
                got = got or _query_turn(objs, d, True, held_out_ok)
            if got is None and state.focus is not None and d.u() < REFER_RATE:
                trial = dict(balance)  # answer counts move only when the turn is kept
                got = _referring_turn(objs, d, margin, state, trial)
                if got is not None and got[0].question not in texts:
                    balance.update(trial)
            got = got or _query_turn(objs, d, False, held_out_ok)
            if got is not None and got[0].question not in texts:
                break
        if got is None:
            raise RuntimeError(f"no dialogue turn fits the scene {objs}")
        turn, (before, state) = got[0], (state.focus, got[1])
        if answer_turn(turn.form, objs, margin, before) != (turn.answer, state.focus):
            raise RuntimeError(f"dialogue generator and checker disagree on {turn.question!r}")
        turns.append(turn)
        texts.add(turn.question)
    return turns
