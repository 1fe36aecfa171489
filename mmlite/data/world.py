"""The shapes world's vocabularies and scene sampling (introduced in chapter 1).

A scene is one row of an int64 array of shape (MAX_OBJECTS, 6) with the columns of FIELDS:
shape id, colour id, size id, centre x and centre y (in % of the image side, 0 = left/top edge,
100 = right/bottom edge, so a scene renders at any resolution) and valid (1 = object, 0 = empty slot,
whose other columns are -1). Valid objects come first; slot order is drawing order (later on top).
"""

from __future__ import annotations

import numpy as np

from mmlite.data.config import MAX_OBJECTS, DataConfig

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross", "star")
SHAPE_PLURALS: tuple[str, ...] = ("circles", "squares", "triangles", "diamonds", "crosses", "stars")
COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")
# Named RGB value of each colour (an object's own value is jittered around it).
COLOR_RGB: tuple[tuple[int, int, int], ...] = (
    (220, 45, 45), (50, 175, 70), (55, 95, 235), (240, 220, 55), (155, 75, 210), (250, 140, 35))
SIZES: tuple[str, ...] = ("small", "large")
SIZE_RADIUS: tuple[float, ...] = (13.0, 19.0)  # radius of the shape's circumscribing circle, % of the side
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
NUMBERS: tuple[str, ...] = ("zero", "one", "two", "three", "four")

# Colour-shape pairs that never occur in train/val/test scenes and that every `comp` scene contains.
# A Latin square: each colour and each shape is held out exactly once, so every colour and every shape
# still occurs in train with five partners.
HELD_OUT_PAIRS: tuple[tuple[str, str], ...] = (
    ("red", "triangle"), ("green", "star"), ("blue", "circle"),
    ("yellow", "cross"), ("purple", "square"), ("orange", "diamond"))

FIELDS: tuple[str, ...] = ("shape", "color", "size", "x", "y", "valid")
SHAPE, COLOR, SIZE, X, Y, VALID = range(6)  # column indices of the objects array

_EDGE_PAD = 2.0  # a shape stays this far (% of the side) inside the image
_HELD_OUT_IDS = {(SHAPES.index(s), COLORS.index(c)) for c, s in HELD_OUT_PAIRS}
_ALL_PAIRS = np.array([(s, c) for s in range(len(SHAPES)) for c in range(len(COLORS))])  # (36, 2)
_IN_DIST_PAIRS = np.array([p for p in _ALL_PAIRS.tolist() if tuple(p) not in _HELD_OUT_IDS])  # (30, 2)
_OUT_PAIRS = np.array(sorted(_HELD_OUT_IDS))  # (6, 2)


def is_held_out(shape: np.ndarray, color: np.ndarray) -> np.ndarray:
    """Elementwise: is (shape id, colour id) one of HELD_OUT_PAIRS?"""
    code = np.asarray(shape) * len(COLORS) + np.asarray(color)
    return np.isin(code, [s * len(COLORS) + c for s, c in _HELD_OUT_IDS])


def names_held_out(f: tuple) -> bool:
    """Does the phrase of feature tuple f = (shape, colour, size), None where unnamed, name a held-out pair?"""
    return f[0] is not None and f[1] is not None and (f[0], f[1]) in _HELD_OUT_IDS


def sample_attributes(n: int, config: DataConfig, rng: np.random.Generator, comp: bool = False) -> np.ndarray:
    """Objects of n scenes without positions: counts, shapes, colours and sizes; x, y left at -1.

    In-distribution scenes draw colour-shape pairs from the 30 allowed ones; a `comp` scene has one
    held-out pair and draws the others from all 36. A pair occurs at most once per scene, so
    "the red circle" always names one object.
    """
    counts = rng.integers(config.min_objects, config.max_objects + 1, size=n)
    valid = np.arange(MAX_OBJECTS)[None, :] < counts[:, None]  # (n, MAX_OBJECTS)
    pool = _ALL_PAIRS if comp else _IN_DIST_PAIRS
    pair = pool[rng.integers(0, len(pool), size=(n, MAX_OBJECTS))]  # (n, MAX_OBJECTS, 2)
    if comp:
        pair[:, 0] = _OUT_PAIRS[rng.integers(0, len(_OUT_PAIRS), size=n)]
    for _ in range(1000):  # redraw later slots that repeat an earlier slot's pair
        code = pair[..., 0] * len(COLORS) + pair[..., 1]  # (n, MAX_OBJECTS)
        dup = np.zeros((n, MAX_OBJECTS), dtype=bool)
        for j in range(1, MAX_OBJECTS):
            dup[:, j] = (code[:, :j] == code[:, j:j + 1]).any(axis=1) & valid[:, j]
        if not dup.any():
            break
        pair[dup] = pool[rng.integers(0, len(pool), size=int(dup.sum()))]
    size = rng.integers(0, len(SIZES), size=(n, MAX_OBJECTS))
    # Shuffle the valid slots so that a held-out object is not always drawn first (underneath).
    keys = np.where(valid, rng.random((n, MAX_OBJECTS)), 2.0)
    order = np.argsort(keys, axis=1, kind="stable")  # (n, MAX_OBJECTS): valid slots stay first
    pair = np.take_along_axis(pair, order[..., None], axis=1)
    size = np.take_along_axis(size, order, axis=1)
    objects = np.full((n, MAX_OBJECTS, len(FIELDS)), -1, dtype=np.int64)
    objects[..., SHAPE] = pair[..., 0]
    objects[..., COLOR] = pair[..., 1]
    objects[..., SIZE] = size
    objects[~valid] = -1
    objects[..., VALID] = valid
    return objects


def place_objects(objects: np.ndarray, rng: np.random.Generator, candidates: int = 16) -> np.ndarray:
    """Fill x, y of every valid object so that shapes stay inside the image and overlap little.

    Objects are placed one slot at a time; each takes the first of `candidates` random positions
    whose centre lies at least max(r_i, r_j) + min(r_i, r_j) / 2 from every earlier centre
    (r = circumscribed radius). Scenes where no candidate fits are placed again from scratch.
    The pixel-exact occlusion cap is enforced afterwards, by `splits.make_scenes`.
    """
    objects = objects.copy()
    todo = np.arange(len(objects))
    for _ in range(1000):
        if len(todo) == 0:
            return objects
        sub = objects[todo]
        valid = sub[..., VALID] == 1
        radius = np.where(valid, np.asarray(SIZE_RADIUS)[np.clip(sub[..., SIZE], 0, None)], 0.0)
        ok = np.ones(len(sub), dtype=bool)
        for k in range(MAX_OBJECTS):
            lo = np.ceil(radius[:, k] + _EDGE_PAD).astype(np.int64)  # (m,)
            cx = rng.integers(lo[:, None], 101 - lo[:, None], size=(len(sub), candidates))  # (m, candidates)
            cy = rng.integers(lo[:, None], 101 - lo[:, None], size=(len(sub), candidates))
            good = np.ones_like(cx, dtype=bool)
            for j in range(k):
                big = np.maximum(radius[:, k], radius[:, j])
                small = np.minimum(radius[:, k], radius[:, j])
                dist = np.hypot(cx - sub[:, j, X:X + 1], cy - sub[:, j, Y:Y + 1])  # (m, candidates)
                good &= (dist >= (big + small / 2)[:, None]) | ~valid[:, j:j + 1]
            first = good.argmax(axis=1)
            rows = np.arange(len(sub))
            sub[:, k, X] = np.where(valid[:, k], cx[rows, first], -1)
            sub[:, k, Y] = np.where(valid[:, k], cy[rows, first], -1)
            ok &= good.any(axis=1) | ~valid[:, k]
        objects[todo[ok]] = sub[ok]
        todo = todo[~ok]
    raise RuntimeError(f"could not place the objects of {len(todo)} scenes without overlap")
