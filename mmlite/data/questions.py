"""Visual questions, their answers and question types for shapes scenes (derived in chapter 1).

Every image gets one question of each type in QUESTION_TYPES; when a scene cannot support a colour or
shape question (no object can be named without giving the answer away), an existence question takes
its place. Yes/no answers are balanced per type: each question aims at the answer its type has
given less often so far in the current chunk of scenes, and falls back to the other one if the
scene cannot support it. Outside the `comp` split, an existence question never asks about a held-out
colour-shape pair (its answer would always be "no").
"""

from __future__ import annotations

from mmlite.data.grammar import Draw, indefinite, phrase, unique_refs
from mmlite.data.semantics import NOUNS, RELATION_PHRASES, Obj, claim_truth, count, relation
from mmlite.data.world import COLORS, NUMBERS, SHAPES, SIZES, names_held_out

QUESTION_TYPES: tuple[str, ...] = ("color", "shape", "size", "count", "exist", "relation")
ANSWERS: tuple[str, ...] = ("no", "yes") + COLORS + SHAPES + SIZES + NUMBERS

# A reference is (names the shape, names the colour, names the size):
_COLOR_FREE = ((True, False, False), (True, False, True), (False, False, True))  # "the small circle": no colour
_SHAPE_FREE = ((False, True, False), (False, True, True), (False, False, True))  # "the red object", "the large shape"
_SIZE_FREE = ((True, False, False), (True, True, False), (False, True, False))  # "the circle", "the red shape"
_SHAPED = ((True, False, False), (True, False, True), (True, True, False), (True, True, True))  # names the shape
_EXIST_FORMS = ((True, True, False), (True, False, False), (False, True, False), (True, False, True),
                (True, True, True))


def _target_yes(balance: dict[str, int], qtype: str, d: Draw) -> bool:
    b = balance.get(qtype, 0)
    return b < 0 or (b == 0 and d.u() < 0.5)


def _record(balance: dict[str, int], q: tuple[str, str, str]) -> tuple[str, str, str]:
    if q[1] in ("yes", "no"):
        balance[q[2]] = balance.get(q[2], 0) + (1 if q[1] == "yes" else -1)
    return q


def _attribute_question(objs: list[Obj], d: Draw, qtype: str) -> tuple[str, str, str] | None:
    forms, answer_of = {"color": (_COLOR_FREE, lambda o: COLORS[o[1]]),
                        "shape": (_SHAPE_FREE, lambda o: SHAPES[o[0]]),
                        "size": (_SIZE_FREE, lambda o: SIZES[o[2]])}[qtype]
    cands = [(i, f) for i in range(len(objs)) for f in unique_refs(objs, i, forms)]
    if not cands:
        return None
    i, f = d.choice(cands)
    noun = "object" if qtype == "shape" else d.choice(NOUNS)  # not "what shape is the red shape ?"
    return f"what {qtype} is the {phrase(f, noun)} ?", answer_of(objs[i]), qtype


def _count_question(objs: list[Obj], d: Draw) -> tuple[str, str, str]:
    attr = d.below(4) - 1  # -1: all objects, 0 shape, 1 colour, 2 size
    f = (None, None, None)
    if attr >= 0:
        n_values = (len(SHAPES), len(COLORS), len(SIZES))[attr]
        value = d.choice(objs)[attr] if d.u() < 0.7 else d.below(n_values)
        f = tuple(value if a == attr else None for a in range(3))
    template = d.choice(("how many {} are there ?", "how many {} are in the image ?"))
    return template.format(phrase(f, d.choice(NOUNS), plural=True)), NUMBERS[count(objs, f)], "count"


def _exist_question(objs: list[Obj], d: Draw, balance: dict[str, int], held_out_ok: bool
                    ) -> tuple[str, str, str]:
    form = d.choice(_EXIST_FORMS)
    f = None
    if not _target_yes(balance, "exist", d):
        for _ in range(30):  # random attribute values until nothing in the scene matches
            cand = (d.below(len(SHAPES)) if form[0] else None, d.below(len(COLORS)) if form[1] else None,
                    d.below(len(SIZES)) if form[2] else None)
            if count(objs, cand) == 0 and (held_out_ok or not names_held_out(cand)):
                f = cand
                break
    if f is None:
        o = d.choice(objs)
        f = tuple(o[a] if form[a] else None for a in range(3))
    template = d.choice(("is there {} ?", "is there {} in the image ?"))
    answer = "yes" if count(objs, f) else "no"
    return template.format(indefinite(phrase(f, d.choice(NOUNS)))), answer, "exist"


def _relation_question(objs: list[Obj], d: Draw, margin: int, balance: dict[str, int]) -> tuple[str, str, str]:
    n = len(objs)
    if n >= 2 and d.u() < 0.2:  # "what shape is left of the red circle ?": one clear answer needed
        options = []
        for j in range(n):
            for r in range(4):
                truths = [relation(objs[i], objs[j], r, margin) for i in range(n) if i != j]
                if truths.count(True) == 1 and truths.count(False) == n - 2:
                    options.append((next(i for i in range(n) if i != j and relation(objs[i], objs[j], r, margin)),
                                    j, r))
        if options:
            i, j, r = d.choice(options)
            fb = d.choice(unique_refs(objs, j, _SHAPED))
            return (f"what shape is {d.choice(RELATION_PHRASES[r])} the {phrase(fb)} ?", SHAPES[objs[i][0]],
                    "relation")
    want = _target_yes(balance, "relation", d)
    for goal in (want, not want):
        if n >= 2 and d.u() < 0.6:  # "is the red circle left of the blue square ?"
            options = [(i, j, r) for i in range(n) for j in range(n) if i != j for r in range(4)
                       if relation(objs[i], objs[j], r, margin) is goal]
            if options:
                i, j, r = d.choice(options)
                fa, fb = d.choice(unique_refs(objs, i, _SHAPED)), d.choice(unique_refs(objs, j, _SHAPED))
                text = f"is the {phrase(fa)} {d.choice(RELATION_PHRASES[r])} the {phrase(fb)} ?"
                return text, "yes" if goal else "no", "relation"
        for _ in range(20):  # "is there a shape above the green star ?"
            j, r = d.below(n), d.below(4)
            o = d.choice(objs)
            fx = d.choice(((None, None, None), (o[0], None, None), (None, o[1], None)))
            fb = d.choice(unique_refs(objs, j, _SHAPED))
            if claim_truth(("rel", fx, False, r, fb, True), objs, margin) is goal:
                text = (f"is there {indefinite(phrase(fx, d.choice(NOUNS)))} {d.choice(RELATION_PHRASES[r])} "
                        f"the {phrase(fb)} ?")
                return text, "yes" if goal else "no", "relation"
    # Rarely reached: nothing sits clearly above the topmost object, so this answer is always "no".
    j = min(range(n), key=lambda i: objs[i][4])
    return f"is there a shape above the {phrase(d.choice(unique_refs(objs, j, _SHAPED)))} ?", "no", "relation"


def questions_for(objs: list[Obj], d: Draw, margin: int, balance: dict[str, int], held_out_ok: bool = False
                  ) -> list[tuple[str, str, str]]:
    """One (question, answer, type) per QUESTION_TYPES entry for a scene; `balance` is updated in place.

    held_out_ok: may a question name a held-out colour-shape pair the scene lacks (True in `comp` only)?
    """
    out = []
    for qtype in QUESTION_TYPES:
        if qtype in ("color", "shape", "size"):
            q = _attribute_question(objs, d, qtype) or _exist_question(objs, d, balance, held_out_ok)
        elif qtype == "count":
            q = _count_question(objs, d)
        elif qtype == "exist":
            q = _exist_question(objs, d, balance, held_out_ok)
        else:
            q = _relation_question(objs, d, margin, balance)
        out.append(_record(balance, q))
    return out
