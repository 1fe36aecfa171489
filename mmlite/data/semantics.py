"""What captions mean: claims about a scene, their truth, and a parser from caption text (chapter 1).

A caption is a conjunction of claims; each claim is True, False or None (undecidable: a relation
inside the margin, or "the circle" when there are two). Claims, with F = (shape, colour, size) ids
and None as a wildcard:
  ("all", (F1, ..., Fn))          the scene holds exactly these objects (a one-to-one matching)
  ("count", F, k)                 exactly k objects match F
  ("rel", Fa, def_a, r, Fb, def_b) an object a matching Fa is in relation r (index into RELATIONS)
                                  to an object b matching Fb; def_* = True for "the" (must be unique)
The truth of a relation with margin m, for "a left of b": True if x_b - x_a >= m, False if
x_b - x_a <= 0, else None (likewise right of, above (y grows downwards), below).
"""

from __future__ import annotations

from itertools import permutations

import numpy as np

from mmlite.data.world import COLORS, NUMBERS, SHAPE_PLURALS, SHAPES, SIZES, VALID

Obj = tuple[int, int, int, int, int]  # (shape, colour, size, x, y) of one valid object
Filter = tuple  # (shape | None, colour | None, size | None)
Claim = tuple

# Phrases for each relation (index into RELATIONS); the first is the canonical one.
RELATION_PHRASES: tuple[tuple[str, ...], ...] = (
    ("left of", "to the left of"), ("right of", "to the right of"), ("above",), ("below", "under"))
LISTING_INTROS: tuple[str, ...] = ("", "an image of", "a picture of", "a scene with", "this image shows")
COUNT_INTROS: tuple[str, ...] = ("", "an image with", "a picture with exactly")
NOUNS: tuple[str, ...] = ("object", "shape")  # nouns for "any shape", singular
NOUN_PLURALS: tuple[str, ...] = ("objects", "shapes")


def scene_list(row: np.ndarray) -> list[Obj]:
    """The valid objects of one scene row (MAX_OBJECTS, 6) as (shape, colour, size, x, y) tuples."""
    return [tuple(o[:5]) for o in np.asarray(row).tolist() if o[VALID] == 1]


def matches(o: Obj, f: Filter) -> bool:
    """Does object `o` have every attribute that `f` fixes?"""
    return (f[0] is None or o[0] == f[0]) and (f[1] is None or o[1] == f[1]) and (f[2] is None or o[2] == f[2])


def count(objs: list[Obj], f: Filter) -> int:
    """Number of objects matching `f`."""
    return sum(1 for o in objs if matches(o, f))


def relation(a: Obj, b: Obj, rel: int, margin: int) -> bool | None:
    """Is `a` in relation `rel` (index into RELATIONS) to `b`? None inside the margin."""
    d = (b[3] - a[3], a[3] - b[3], b[4] - a[4], a[4] - b[4])[rel]
    return True if d >= margin else False if d <= 0 else None


def _and(values: list[bool | None]) -> bool | None:
    if any(v is False for v in values):
        return False
    return True if all(v is True for v in values) else None


def _candidates(objs: list[Obj], f: Filter, definite: bool) -> list[int] | bool | None:
    found = [i for i, o in enumerate(objs) if matches(o, f)]
    if definite and len(found) != 1:
        return False if not found else None  # "the X" with no X is false; with two X it is unclear
    return found


def claim_truth(claim: Claim, objs: list[Obj], margin: int) -> bool | None:
    """Truth of one claim for a scene."""
    kind = claim[0]
    if kind == "count":
        return count(objs, claim[1]) == claim[2]
    if kind == "all":
        fs = claim[1]
        if len(fs) != len(objs):
            return False
        return any(all(matches(o, f) for o, f in zip(perm, fs)) for perm in permutations(objs))
    if kind == "rel":
        _, fa, def_a, rel, fb, def_b = claim
        ca, cb = _candidates(objs, fa, def_a), _candidates(objs, fb, def_b)
        if ca is False or cb is False:
            return False
        if ca is None or cb is None:
            return None
        values = [relation(objs[a], objs[b], rel, margin) for a in ca for b in cb if a != b]
        if any(v is True for v in values):
            return True
        return False if all(v is False for v in values) else None
    raise ValueError(f"unknown claim kind {kind!r}")


def truth(claims: list[Claim], objs: list[Obj], margin: int) -> bool | None:
    """Truth of a conjunction of claims: False if any is False, True if all are True, else None."""
    return _and([claim_truth(c, objs, margin) for c in claims])


# ---------------------------------------------------------------- parsing caption text back into claims
_SIZE_IDS = {w: i for i, w in enumerate(SIZES)}
_COLOR_IDS = {w: i for i, w in enumerate(COLORS)}
_SHAPE_IDS = {w: i for i, w in enumerate(SHAPES)}
_PLURAL_IDS = {w: i for i, w in enumerate(SHAPE_PLURALS)}
_NUMBER_IDS = {w: i for i, w in enumerate(NUMBERS)}


def _noun_phrase(tokens: list[str], i: int, plural: bool | None = False) -> tuple[Filter, int] | None:
    """[size] [colour] noun at tokens[i:] -> (filter, next index); plural=None accepts either number."""
    size = color = None
    if i < len(tokens) and tokens[i] in _SIZE_IDS:
        size, i = _SIZE_IDS[tokens[i]], i + 1
    if i < len(tokens) and tokens[i] in _COLOR_IDS:
        color, i = _COLOR_IDS[tokens[i]], i + 1
    if i >= len(tokens):
        return None
    w = tokens[i]
    singular_ok, plural_ok = plural is not True, plural is not False
    if singular_ok and w in _SHAPE_IDS:
        return (_SHAPE_IDS[w], color, size), i + 1
    if plural_ok and w in _PLURAL_IDS:
        return (_PLURAL_IDS[w], color, size), i + 1
    if (singular_ok and w in NOUNS) or (plural_ok and w in NOUN_PLURALS):
        return (None, color, size), i + 1
    return None


def _article_np(tokens: list[str], i: int) -> tuple[Filter, bool, int] | None:
    """("a" | "an" | "the") noun phrase -> (filter, definite, next index)."""
    if i < len(tokens) and tokens[i] in ("a", "an", "the"):
        got = _noun_phrase(tokens, i + 1)
        if got is not None:
            return got[0], tokens[i] == "the", got[1]
    return None


def _relation(tokens: list[str], i: int) -> tuple[int, int] | None:
    """A relation phrase at tokens[i:] -> (relation index, next index); longest phrase first."""
    best = None
    for rel, phrases in enumerate(RELATION_PHRASES):
        for p in phrases:
            words = p.split()
            if tokens[i:i + len(words)] == words and (best is None or len(words) > best[1] - i):
                best = (rel, i + len(words))
    return best


def _strip_intro(tokens: list[str], intros: tuple[str, ...]) -> list[list[str]]:
    return [tokens[len(p.split()):] for p in intros if tokens[:len(p.split())] == p.split()]


def parse_caption(text: str) -> list[Claim] | None:
    """The claims a caption of this grammar makes, or None if the text is not one of its sentences."""
    tokens = text.split()
    # "the A is REL the B"
    a = _article_np(tokens, 0)
    if a is not None and a[1] and a[2] < len(tokens) and tokens[a[2]] == "is":
        r = _relation(tokens, a[2] + 1)
        b = _article_np(tokens, r[1]) if r else None
        if b is not None and b[1] and b[2] == len(tokens):
            return [("rel", a[0], True, r[0], b[0], True)]
    # "[there is] a A REL a|the B"
    for rest in _strip_intro(tokens, ("", "there is")):
        a = _article_np(rest, 0)
        if a is not None and not a[1]:
            r = _relation(rest, a[2])
            b = _article_np(rest, r[1]) if r else None
            if b is not None and b[2] == len(rest):
                return [("rel", a[0], False, r[0], b[0], b[1])]
    # listing: "INTRO a A and a B ..."
    for rest in _strip_intro(tokens, LISTING_INTROS + ("there is",)):
        fs, i = [], 0
        while True:
            a = _article_np(rest, i)
            if a is None or a[1]:
                break
            fs.append(a[0])
            i = a[2]
            if i == len(rest):
                return [("all", tuple(fs))]
            if rest[i] != "and":
                break
            i += 1
    # counts: "INTRO N A [and M B]"
    for rest in _strip_intro(tokens, COUNT_INTROS + ("there is", "there are")):
        claims, i = [], 0
        while i < len(rest) and rest[i] in _NUMBER_IDS:
            k = _NUMBER_IDS[rest[i]]
            got = _noun_phrase(rest, i + 1, plural=k != 1)
            if got is None:
                break
            claims.append(("count", got[0], k))
            i = got[1]
            if i == len(rest):
                return claims
            if rest[i] != "and":
                break
            i += 1
    return None


def caption_truth(text: str, row: np.ndarray, margin: int = 15) -> bool | None:
    """Is caption `text` true for the scene `row` (MAX_OBJECTS, 6)? None if undecidable or unparsable.

    Useful to score generated captions: a caption that parses and is True is grounded in the image.
    """
    claims = parse_caption(text)
    return None if claims is None else truth(claims, scene_list(row), margin)
