"""Caption grammar and hard negatives of the shapes world (derived in chapter 1).

A caption is first built as a spec (a named tuple), then rendered to text; its claims come from the
same spec, so the generator can check every sentence against the scene (mmlite.data.semantics):
  ListingSpec("listing", intro, (F1, ..., Fn))              "a small red circle and a large blue square"
  CountSpec("count", intro, ((k, F, noun), ...))            "there are two red objects and one blue object"
  RelDefSpec("rel_def", a, rel, words, b)                   "the red circle is left of the blue square"
  RelIndefSpec("rel_indef", intro, a, rel, words, b, definite_b)   "there is a circle above the green star"
F, a and b are (shape, colour, size) filters, None where the caption leaves an attribute out.
Hard negatives edit a spec so that it keeps its words (or changes one colour) and becomes False.
Outside the `comp` split no text names a held-out colour-shape pair: an edit that would (swapping the
colours of "a red circle and a blue triangle" gives "a blue circle and a red triangle") is not used,
or "names a held-out pair" would be a perfect cue for "false" in training.
"""

from __future__ import annotations

from typing import Iterable, NamedTuple, Sequence, TypeVar, Union

import numpy as np

from mmlite.data.semantics import (COUNT_INTROS, LISTING_INTROS, NOUN_PLURALS, NOUNS, RELATION_PHRASES, Obj,
                                   count, relation, truth)
from mmlite.data.world import COLORS, NUMBERS, SHAPE_PLURALS, SHAPES, SIZES, names_held_out

T = TypeVar("T")
NEGATIVE_KINDS: tuple[str, ...] = ("swap_attribute", "swap_relation", "change_color")


class ListingSpec(NamedTuple):
    kind: str  # "listing"
    intro: str  # "", "there is", "the image shows", ...
    features: tuple  # one (shape, colour, size) filter per object named


class CountSpec(NamedTuple):
    kind: str  # "count"
    intro: str  # "there" (there is / there are) or one of COUNT_INTROS
    items: tuple  # ((k, filter, noun), ...): k objects match the filter


class RelDefSpec(NamedTuple):
    kind: str  # "rel_def"
    a: tuple  # filter of the object the sentence is about (definite: it matches one object)
    rel: int  # relation index (0 left of, 1 right of, 2 above, 3 below)
    words: str  # the relation's phrase
    b: tuple  # filter of the reference object (definite)


class RelIndefSpec(NamedTuple):
    kind: str  # "rel_indef"
    intro: str  # "" or "there is"
    a: tuple  # filter of "a <a>"
    rel: int  # relation index
    words: str  # the relation's phrase
    b: tuple  # filter of the reference object
    definite_b: bool  # "the <b>" (True) or "a <b>" (False)


Spec = Union[ListingSpec, CountSpec, RelDefSpec, RelIndefSpec]


class NegativeSpec(NamedTuple):
    spec: Spec  # the false caption
    kind: str  # one of NEGATIVE_KINDS
    source: Spec  # the true caption it was edited from


# Relative frequency of each caption family among captions 2..n (caption 1 is always the listing).
_FAMILY_WEIGHTS = {"listing": 2, "count_total": 1, "count_attr": 2, "rel_def": 3, "rel_indef": 2}


class Draw:
    """Uniform draws from a numpy Generator, buffered so that Python loops can take them one by one."""

    def __init__(self, rng: np.random.Generator, block: int = 1 << 16) -> None:
        self.rng, self.block, self.buf, self.i = rng, block, [], 0

    def u(self) -> float:
        """One uniform number in [0, 1)."""
        if self.i == len(self.buf):
            self.buf, self.i = self.rng.random(self.block).tolist(), 0
        self.i += 1
        return self.buf[self.i - 1]

    def below(self, n: int) -> int:
        """A uniform integer in 0..n-1."""
        if self.i == len(self.buf):
            self.buf, self.i = self.rng.random(self.block).tolist(), 0
        self.i += 1
        return min(int(self.buf[self.i - 1] * n), n - 1)

    def choice(self, seq: Sequence[T]) -> T:
        """One item of a non-empty sequence."""
        return seq[self.below(len(seq))]

    def shuffled(self, seq: Iterable[T]) -> list[T]:
        """A shuffled copy (Fisher-Yates)."""
        out = list(seq)
        for i in range(len(out) - 1, 0, -1):
            j = self.below(i + 1)
            out[i], out[j] = out[j], out[i]
        return out


# ---------------------------------------------------------------- noun phrases
def phrase(f: tuple, noun: str = "object", plural: bool = False) -> str:
    """[size] [colour] shape-or-noun for filter f = (shape, colour, size), e.g. "small red circle"."""
    words = [SIZES[f[2]]] if f[2] is not None else []
    if f[1] is not None:
        words.append(COLORS[f[1]])
    if f[0] is not None:
        words.append(SHAPE_PLURALS[f[0]] if plural else SHAPES[f[0]])
    else:
        words.append(NOUN_PLURALS[NOUNS.index(noun)] if plural else noun)
    return " ".join(words)


def indefinite(text: str) -> str:
    """Prefix "a" or "an"."""
    return ("an " if text[0] in "aeiou" else "a ") + text


def unique_refs(objs: list[Obj], i: int, forms: tuple[tuple[bool, bool, bool], ...]) -> list[tuple]:
    """Filters built from object i's attributes (form = use shape, colour, size) that match it alone."""
    o = objs[i]
    out = []
    for use_shape, use_color, use_size in forms:
        f = (o[0] if use_shape else None, o[1] if use_color else None, o[2] if use_size else None)
        if count(objs, f) == 1:
            out.append(f)
    return out


_REF_FORMS = ((True, False, False), (True, False, True), (True, True, False), (True, True, True))
_COLOR_REF_FORMS = ((True, True, False), (True, True, True))  # descriptions that name the colour


def _ref(objs: list[Obj], i: int, d: Draw, forms: tuple = _REF_FORMS) -> tuple:
    return d.choice(unique_refs(objs, i, forms))


# ---------------------------------------------------------------- specs -> text and claims
def render(spec: Spec) -> str:
    """The sentence of a caption spec."""
    if spec.kind == "listing":
        body = " and ".join(indefinite(phrase(f)) for f in spec.features)
    elif spec.kind == "count":
        body = " and ".join(f"{NUMBERS[k]} {phrase(f, noun, plural=k != 1)}" for k, f, noun in spec.items)
        if spec.intro == "there":
            return ("there is " if spec.items[0][0] == 1 else "there are ") + body
    elif spec.kind == "rel_def":
        return f"the {phrase(spec.a)} is {spec.words} the {phrase(spec.b)}"
    else:  # rel_indef
        b = "the " + phrase(spec.b) if spec.definite_b else indefinite(phrase(spec.b))
        body = f"{indefinite(phrase(spec.a))} {spec.words} {b}"
    return f"{spec.intro} {body}" if spec.intro else body


def claims(spec: Spec) -> list[tuple]:
    """The claims (mmlite.data.semantics) a caption spec makes."""
    if spec.kind == "listing":
        return [("all", tuple(spec.features))]
    if spec.kind == "count":
        return [("count", f, k) for k, f, _ in spec.items]
    if spec.kind == "rel_def":
        return [("rel", spec.a, True, spec.rel, spec.b, True)]
    return [("rel", spec.a, False, spec.rel, spec.b, spec.definite_b)]


# ---------------------------------------------------------------- caption families
def _listing(objs: list[Obj], d: Draw, first: bool = False) -> ListingSpec:
    if first:  # caption 1: no intro, full attributes, objects from left to right
        order, full, intro = sorted(range(len(objs)), key=lambda i: (objs[i][3], objs[i][4])), True, ""
    else:
        order, full = d.shuffled(range(len(objs))), d.u() < 0.5
        intro = d.choice(LISTING_INTROS + (("there is",) if len(objs) == 1 else ()))
    return ListingSpec("listing", intro, tuple((objs[i][0], objs[i][1], objs[i][2] if full else None) for i in order))


def _count_total(objs: list[Obj], d: Draw) -> CountSpec:
    return CountSpec("count", d.choice(COUNT_INTROS + ("there",)), ((len(objs), (None, None, None), d.choice(NOUNS)),))


def _count_attr(objs: list[Obj], d: Draw) -> CountSpec:
    attr = d.below(3)  # 0 shape, 1 colour, 2 size
    values = d.shuffled(sorted({o[attr] for o in objs}))[:1 + (d.u() < 0.5)]
    noun = d.choice(NOUNS)
    items = []
    for v in values:
        f = tuple(v if a == attr else None for a in range(3))
        items.append((count(objs, f), f, noun))
    return CountSpec("count", d.choice(COUNT_INTROS + ("there",)), tuple(items))


def _clear_pairs(objs: list[Obj], margin: int) -> list[tuple[int, int, int]]:
    return [(i, j, r) for i in range(len(objs)) for j in range(len(objs)) if i != j
            for r in range(4) if relation(objs[i], objs[j], r, margin) is True]


def _rel_def(objs: list[Obj], d: Draw, pairs: list, forms: tuple = _REF_FORMS) -> RelDefSpec:
    i, j, r = d.choice(pairs)
    return RelDefSpec("rel_def", _ref(objs, i, d, forms), r, d.choice(RELATION_PHRASES[r]), _ref(objs, j, d, forms))


def _rel_indef(objs: list[Obj], d: Draw, pairs: list) -> RelIndefSpec:
    i, j, r = d.choice(pairs)
    fa = d.choice([(objs[i][0], None, None), (objs[i][0], objs[i][1], None), (objs[i][0], objs[i][1], objs[i][2])])
    def_b = d.u() < 0.5
    fb = _ref(objs, j, d) if def_b else (objs[j][0], objs[j][1], None if d.u() < 0.5 else objs[j][2])
    return RelIndefSpec("rel_indef", d.choice(("", "there is")), fa, r, d.choice(RELATION_PHRASES[r]), fb, def_b)


def caption_specs(objs: list[Obj], d: Draw, n_captions: int, margin: int) -> list[Spec]:
    """n_captions true caption specs, distinct as bags of words; the first lists every object left to right."""
    pairs = _clear_pairs(objs, margin)
    families = [f for f in _FAMILY_WEIGHTS if pairs or not f.startswith("rel")]
    weights = np.cumsum([_FAMILY_WEIGHTS[f] for f in families]) / sum(_FAMILY_WEIGHTS[f] for f in families)
    specs = [_listing(objs, d, first=True)]
    bags = {tuple(sorted(render(specs[0]).split()))}  # distinct even as bags of words, not only in order
    while len(specs) < n_captions:
        for _ in range(20):  # look for a sentence not used yet
            family = families[int(np.searchsorted(weights, d.u(), side="right"))]
            if family == "listing":
                spec = _listing(objs, d)
            elif family == "count_total":
                spec = _count_total(objs, d)
            elif family == "count_attr":
                spec = _count_attr(objs, d)
            elif family == "rel_def":
                spec = _rel_def(objs, d, pairs)
            else:
                spec = _rel_indef(objs, d, pairs)
            if tuple(sorted(render(spec).split())) not in bags:
                break
        specs.append(spec)
        bags.add(tuple(sorted(render(spec).split())))
    return specs


# ---------------------------------------------------------------- hard negatives
def _with_color(f: tuple, c: int) -> tuple:
    return (f[0], c, f[2])


def _swap_attribute(spec: Spec, d: Draw) -> list[Spec]:
    """Specs that swap the colour (or, if equal, the size) of two objects a caption names."""
    out: list[Spec] = []
    if spec.kind == "listing":
        fs = spec.features
        for a in range(len(fs)):
            for b in range(a + 1, len(fs)):
                new = list(fs)
                if fs[a][1] is not None and fs[a][1] != fs[b][1]:
                    new[a], new[b] = _with_color(fs[a], fs[b][1]), _with_color(fs[b], fs[a][1])
                elif fs[a][2] is not None and fs[a][2] != fs[b][2]:
                    new[a], new[b] = fs[a][:2] + (fs[b][2],), fs[b][:2] + (fs[a][2],)
                else:
                    continue
                out.append(spec._replace(features=tuple(new)))
    elif spec.kind == "rel_def":
        fa, fb = spec.a, spec.b
        if fa[1] is not None and fb[1] is not None and fa[1] != fb[1]:
            out.append(spec._replace(a=_with_color(fa, fb[1]), b=_with_color(fb, fa[1])))
    return out


def _swap_relation(spec: Spec, d: Draw) -> list[Spec]:
    """Specs that exchange the two sides of a relation ("a X left of a Y" only when both are indefinite)."""
    if spec.kind == "rel_def" or (spec.kind == "rel_indef" and not spec.definite_b):
        return [spec._replace(a=spec.b, b=spec.a)]
    return []


def _change_color(spec: Spec, d: Draw) -> list[Spec]:
    """Specs with one colour word replaced by another colour."""
    out: list[Spec] = []
    others = lambda c: [x for x in range(len(COLORS)) if x != c]  # noqa: E731
    if spec.kind == "listing":
        for a, f in enumerate(spec.features):
            if f[1] is not None:
                new = list(spec.features)
                new[a] = _with_color(f, d.choice(others(f[1])))
                out.append(spec._replace(features=tuple(new)))
    elif spec.kind == "rel_def":
        if spec.a[1] is not None:
            out.append(spec._replace(a=_with_color(spec.a, d.choice(others(spec.a[1])))))
        if spec.b[1] is not None:
            out.append(spec._replace(b=_with_color(spec.b, d.choice(others(spec.b[1])))))
    elif spec.kind == "count":
        for a, (k, f, noun) in enumerate(spec.items):
            if f[1] is not None:
                new = list(spec.items)
                new[a] = (k, _with_color(f, d.choice(others(f[1]))), noun)
                out.append(spec._replace(items=tuple(new)))
    return out


_EDITS = {"swap_attribute": _swap_attribute, "swap_relation": _swap_relation, "change_color": _change_color}


def spec_features(spec: Spec) -> list[tuple]:
    """Every (shape, colour, size) feature tuple a caption spec names."""
    if spec.kind == "listing":
        return list(spec.features)
    if spec.kind == "count":
        return [f for _, f, _ in spec.items]
    return [spec.a, spec.b]


def negative_specs(objs: list[Obj], d: Draw, captions: list[Spec], margin: int,
                   held_out_ok: bool = False) -> list[NegativeSpec]:
    """NegativeSpec(false spec, kind, the true spec it was edited from), one per negative kind the scene allows,
    in NEGATIVE_KINDS order.

    Sources are the image's own captions plus fresh listings and colour-naming relations; an edit
    is kept only if the edited caption is False for the scene (not merely unprovable) and, unless
    held_out_ok (the `comp` split), names no held-out colour-shape pair.
    """
    pairs = _clear_pairs(objs, margin)
    sources = list(captions) + [_listing(objs, d), ListingSpec("listing", "", tuple((o[0], o[1], o[2]) for o in objs))]
    if pairs:
        sources += [_rel_def(objs, d, pairs, _COLOR_REF_FORMS), _rel_def(objs, d, pairs)]
    out = []
    for kind in NEGATIVE_KINDS:
        for source in d.shuffled(sources):
            edits = [e for e in _EDITS[kind](source, d) if truth(claims(e), objs, margin) is False
                     and (held_out_ok or not any(map(names_held_out, spec_features(e))))]
            if edits:
                out.append(NegativeSpec(d.choice(edits), kind, source))
                break
    return out
