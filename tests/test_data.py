"""The shapes world: determinism, held-out pairs, captions/answers/negatives re-derived from the
objects, rendering, the cache, and the torch dataset and loaders."""

import json
import re
from collections import Counter

import numpy as np
import pytest
import torch

from mmlite.data import (ANSWERS, COLOR_RGB, COLORS, HELD_OUT_PAIRS, MAX_OBJECTS, NEGATIVE_KINDS, NUMBERS, PRESETS,
                         QUESTION_TYPES, RELATIONS, SHAPES, SIZES, DataConfig, ShapesDataset, Split, build_tokenizer,
                         caption_truth, collate, describe, generate, load, make_loader, parse_caption, read_world,
                         render_scenes, save_world, vocabulary)
from mmlite.data.cache import generator_fingerprint
from mmlite.data.splits import SPLITS
from mmlite.data.world import FIELDS

MARGIN = PRESETS["tiny"].relation_margin
SMALL = DataConfig(n_train=400, n_val=100, n_test=100, n_comp=100)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def world(root):
    """The tiny preset, seed 0, generated into (and cached in) a temporary root."""
    return load("tiny", seed=0, root=root)


def scenes(split: Split) -> list[list[dict]]:
    return [split.scene(i) for i in range(len(split))]


# ------------------------------------------------------------------ an independent reading of the grammar
PLURALS = {"circles": "circle", "squares": "square", "triangles": "triangle", "diamonds": "diamond",
           "crosses": "cross", "stars": "star"}
REL_WORDS = {"left of": 0, "to the left of": 0, "right of": 1, "to the right of": 1, "above": 2, "below": 3,
             "under": 3}
REL_RE = "|".join(sorted(REL_WORDS, key=len, reverse=True))


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


def the(objs: list[dict], words: str) -> dict:
    found = [o for o in objs if describes(o, words)]
    assert len(found) == 1, f"'the {words}' names {len(found)} objects in {objs}"
    return found[0]


def rel(a: dict, b: dict, r: int) -> bool | None:
    """a is left of / right of / above / below b: True beyond the margin, False on the wrong side."""
    d = (b["x"] - a["x"], a["x"] - b["x"], b["y"] - a["y"], a["y"] - b["y"])[r]
    return True if d >= MARGIN else False if d <= 0 else None


def answer(objs: list[dict], question: str) -> str:
    """Answer a question of the grammar from the objects alone."""
    m = re.fullmatch(rf"is the (.+?) ({REL_RE}) the (.+) \?", question)
    if m:
        value = rel(the(objs, m[1]), the(objs, m[3]), REL_WORDS[m[2]])
        assert value is not None, f"ambiguous relation asked: {question}"
        return "yes" if value else "no"
    m = re.fullmatch(rf"is there an? (.+?) ({REL_RE}) the (.+) \?", question)
    if m:
        b = the(objs, m[3])
        values = [rel(o, b, REL_WORDS[m[2]]) for o in objs if o is not b and describes(o, m[1])]
        assert None not in values or True in values, f"ambiguous relation asked: {question}"
        return "yes" if True in values else "no"
    m = re.fullmatch(rf"what shape is ({REL_RE}) the (.+) \?", question)
    if m:
        b = the(objs, m[2])
        values = [(rel(o, b, REL_WORDS[m[1]]), o["shape"]) for o in objs if o is not b]
        assert [v for v, _ in values].count(True) == 1 and None not in [v for v, _ in values], question
        return next(s for v, s in values if v)
    m = re.fullmatch(r"what (color|shape|size) is the (.+) \?", question)
    if m:
        return the(objs, m[2])[m[1]]
    m = re.fullmatch(r"how many (.+) are (?:there|in the image) \?", question)
    if m:
        return NUMBERS[sum(describes(o, m[1]) for o in objs)]
    m = re.fullmatch(r"is there an? (.+?)(?: in the image)? \?", question)
    if m:
        return "yes" if any(describes(o, m[1]) for o in objs) else "no"
    raise AssertionError(f"question outside the grammar: {question!r}")


# ------------------------------------------------------------------ configuration
@pytest.mark.parametrize("changes, message", [
    ({"image_size": 8}, "image_size must be >= 16"),
    ({"min_objects": 0}, "min_objects must be in 1..4"),
    ({"max_objects": 5}, "max_objects must be in"),
    ({"min_objects": 3, "max_objects": 2}, "max_objects must be in min_objects"),
    ({"n_train": -1}, "n_train must be a non-negative integer"),
    ({"n_captions": 0}, "n_captions must be >= 1"),
    ({"min_visible": 0.2}, "min_visible"),
    ({"relation_margin": 0}, "relation_margin"),
])
def test_config_validation(changes, message):
    with pytest.raises(ValueError, match=message):
        DataConfig(**changes)
    with pytest.raises(TypeError, match="image_size must be an int"):
        DataConfig(image_size=32.0)


def test_presets():
    assert set(PRESETS) == {"tiny", "small", "base"}
    assert [PRESETS[p].n_train for p in ("tiny", "small", "base")] == [2000, 20_000, 200_000]
    with pytest.raises(ValueError, match="preset must be one of"):
        load("huge")
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        generate(SMALL, seed=-1)


# ------------------------------------------------------------------ determinism
def test_same_seed_same_bytes_and_other_seed_other_data(tmp_path):
    a, b, c = generate(SMALL, seed=5), generate(SMALL, seed=5), generate(SMALL, seed=6)
    save_world(a, SMALL, 5, tmp_path / "a")
    save_world(b, SMALL, 5, tmp_path / "b")
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 1 + 3 * len(SPLITS)
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    for name in SPLITS:
        assert not np.array_equal(a[name].images, c[name].images)
        assert a[name].captions != c[name].captions


def test_a_split_does_not_depend_on_other_split_sizes_or_on_workers():
    base = generate(SMALL.replace(n_train=1100, n_comp=0), seed=2, workers=1)
    other = generate(SMALL.replace(n_train=1300, n_comp=30), seed=2, workers=2)
    for name in ("val", "test"):
        assert np.array_equal(base[name].images, other[name].images)
        assert base[name].captions == other[name].captions
    # the first full chunk of train is the same whatever the split size and the process count
    assert np.array_equal(base["train"].images[:1000], other["train"].images[:1000])
    assert base["train"].questions[:1000] == other["train"].questions[:1000]
    assert len(other["comp"]) == 30 and len(base["comp"]) == 0


# ------------------------------------------------------------------ scenes and the compositional split
def test_held_out_pairs_never_leak_and_comp_has_them(world):
    held_out = set(HELD_OUT_PAIRS)
    assert len(held_out) == 6
    assert {c for c, _ in held_out} == set(COLORS) and {s for _, s in held_out} == set(SHAPES)
    for name in ("train", "val", "test"):
        pairs = Counter((o["color"], o["shape"]) for objs in scenes(world[name]) for o in objs)
        assert not held_out & set(pairs), f"held-out pair in {name}"
    train_pairs = Counter((o["color"], o["shape"]) for objs in scenes(world["train"]) for o in objs)
    assert len(train_pairs) == 36 - 6  # every allowed pair, and so every colour and shape, occurs
    assert {c for c, _ in train_pairs} == set(COLORS) and {s for _, s in train_pairs} == set(SHAPES)
    for objs in scenes(world["comp"]):
        assert any((o["color"], o["shape"]) in held_out for o in objs)
    assert describe(world["comp"])["held_out_objects"] >= len(world["comp"])


def test_no_text_outside_comp_names_a_held_out_pair(world):
    """Otherwise "names a red triangle" is a perfect cue for "false" in training (swapping the colours of
    "a red circle and a blue triangle" gives "a blue circle and a red triangle")."""
    named = re.compile("|".join(rf"\b{c} {s}(e?s)?\b" for c, s in HELD_OUT_PAIRS))
    for name in SPLITS:
        split = world[name]
        texts = {"captions": [c for caps in split.captions for c in caps],
                 "negatives": [c for negs in split.negatives for c, _ in negs],
                 "questions": [q for qs in split.questions for q, _, _ in qs]}
        hits = {kind: sum(bool(named.search(t)) for t in ts) for kind, ts in texts.items()}
        if name == "comp":  # there they are the point: the true captions name them, and so do some edits
            assert min(hits.values()) > 0, hits
        else:
            assert hits == {"captions": 0, "negatives": 0, "questions": 0}, (name, hits)
    kinds = Counter(kind for negs in world["train"].negatives for _, kind in negs)
    assert kinds["swap_attribute"] > 0.5 * len(world["train"]), kinds  # the filter leaves most swaps


def test_scene_arrays_are_well_formed(world):
    cfg = PRESETS["tiny"]
    for split in world.values():
        o = split.objects
        assert o.shape == (len(split), MAX_OBJECTS, len(FIELDS)) and o.dtype == np.int64
        valid = o[..., 5] == 1
        n = valid.sum(axis=1)
        assert n.min() == cfg.min_objects and n.max() == cfg.max_objects
        assert (valid[:, :-1] >= valid[:, 1:]).all()  # valid slots first
        assert (o[~valid] == np.array([-1] * 5 + [0])).all()
        for objs in scenes(split):  # a colour-shape pair at most once per scene
            assert len({(x["color"], x["shape"]) for x in objs}) == len(objs)
        assert split.images.dtype == np.uint8 and split.images.shape[1:] == (32, 32, 3)


def test_occlusion_is_capped(world):
    objects = world["train"].objects
    _, visible = render_scenes(objects, 32, np.random.default_rng(0), return_visibility=True)
    assert visible.min() >= PRESETS["tiny"].min_visible
    assert (visible < 0.999).any()  # occlusion does happen
    # a stricter cap is met by placing again the scenes that miss it
    strict = generate(SMALL.replace(n_train=200, n_val=0, n_test=0, n_comp=0, min_visible=0.97), seed=1)
    _, visible = render_scenes(strict["train"].objects, 32, np.random.default_rng(0), return_visibility=True)
    assert visible.min() >= 0.97


# ------------------------------------------------------------------ rendering
def scene(*objects):
    """A hand-made scene row: objects given as (shape, colour, size, x, y) names/numbers."""
    row = np.full((MAX_OBJECTS, 6), -1, dtype=np.int64)
    row[:, 5] = 0
    for k, (s, c, z, x, y) in enumerate(objects):
        row[k] = (SHAPES.index(s), COLORS.index(c), SIZES.index(z), x, y, 1)
    return row


def test_render_a_hand_made_scene():
    objects = np.stack([scene(("circle", "red", "large", 25, 50), ("square", "blue", "small", 75, 50))])
    img = render_scenes(objects, 32, np.random.default_rng(0), color_jitter=0)
    assert img.shape == (1, 32, 32, 3) and img.dtype == np.uint8
    # pixel noise is N(0, 3) per pixel, so 5 sigma = 15 grey levels bounds a centre pixel's deviation
    assert np.abs(img[0, 16, 8].astype(int) - COLOR_RGB[COLORS.index("red")]).max() <= 15
    assert np.abs(img[0, 16, 24].astype(int) - COLOR_RGB[COLORS.index("blue")]).max() <= 15
    corner = img[0, :3, :3].reshape(-1, 3).astype(int)
    assert corner.max() < 100 and np.abs(corner[:, 0] - corner[:, 2]).max() < 40  # dark, greyish background
    assert caption_truth("the red circle is left of the blue square", objects[0]) is True
    assert caption_truth("the blue square is left of the red circle", objects[0]) is False
    assert caption_truth("a large red circle and a small blue square", objects[0]) is True
    assert caption_truth("there are two circles", objects[0]) is False
    assert parse_caption("a red circle beside a blue square") is None


def test_shapes_are_distinct_and_sizes_ordered():
    rows = np.stack([scene((s, "red", z, 50, 50)) for s in SHAPES for z in SIZES])
    img = render_scenes(rows, 64, np.random.default_rng(0), color_jitter=0)
    red = img[..., 0].astype(int) - img[..., 1].astype(int) > 100  # (12, 64, 64) object masks
    areas = red.sum(axis=(1, 2)).reshape(len(SHAPES), len(SIZES))
    assert (areas[:, 1] > 1.8 * areas[:, 0]).all()  # large is about (19/13)^2 = 2.1 times small
    masks = red.reshape(len(SHAPES), len(SIZES), -1)[:, 1]
    for i in range(len(SHAPES)):
        for j in range(i + 1, len(SHAPES)):
            assert (masks[i] != masks[j]).sum() > 40, (SHAPES[i], SHAPES[j])  # silhouettes differ


def test_render_validates_its_input():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match=r"shape \(N, K, 6\)"):
        render_scenes(np.zeros((2, 4, 5), dtype=np.int64), 32, rng)
    bad = scene(("circle", "red", "large", 25, 50))[None].copy()
    bad[0, 0, 1] = 9
    with pytest.raises(ValueError, match="'color' must lie in 0..5"):
        render_scenes(bad, 32, rng)
    with pytest.raises(TypeError, match="integer array"):
        render_scenes(bad.astype(float), 32, rng)
    with pytest.raises(TypeError, match="numpy.random.Generator"):
        render_scenes(bad, 32, 0)


# ------------------------------------------------------------------ language, re-derived from the objects
def test_every_caption_is_true_for_its_scene(world):
    checked = Counter()
    for split in world.values():
        for i, objs in enumerate(scenes(split)):
            caps = split.captions[i]
            assert len(caps) == 5 and len({tuple(sorted(c.split())) for c in caps}) == 5  # distinct bags of words
            first = sorted(objs, key=lambda o: (o["x"], o["y"]))  # caption 1: every object, left to right
            expected = " and ".join(("an " if o["size"][0] in "aeiou" else "a ") + f"{o['size']} {o['color']} "
                                    f"{o['shape']}" for o in first)
            assert caps[0] == expected
            for c in caps:
                assert caption_truth(c, split.objects[i], MARGIN) is True, (c, objs)
                m = re.fullmatch(rf"the (.+) is ({REL_RE}) the (.+)", c)
                if m:  # relations: re-derived from the centres, beyond the margin
                    assert rel(the(objs, m[1]), the(objs, m[3]), REL_WORDS[m[2]]) is True, (c, objs)
                    checked["relation"] += 1
                m = re.fullmatch(r"(?:there (?:is|are) |an image with |a picture with exactly )?"
                                 r"(\w+) ([a-z ]+?)(?: and (\w+) ([a-z ]+))?", c)
                if m and m[1] in NUMBERS:  # counts: re-counted from the objects
                    assert NUMBERS[sum(describes(o, m[2]) for o in objs)] == m[1], (c, objs)
                    if m[3]:
                        assert NUMBERS[sum(describes(o, m[4]) for o in objs)] == m[3], (c, objs)
                    checked["count"] += 1
    assert checked["relation"] > 1000 and checked["count"] > 1000


def test_every_negative_is_false_for_its_scene(world):
    kinds = Counter()
    for split in world.values():
        for i, objs in enumerate(scenes(split)):
            negs = split.negatives[i]
            assert 1 <= len(negs) <= 3 and len({k for _, k in negs}) == len(negs)
            for text, kind in negs:
                assert kind in NEGATIVE_KINDS
                assert caption_truth(text, split.objects[i], MARGIN) is False, (text, kind, objs)
                kinds[kind] += 1
                m = re.fullmatch(rf"the (.+) is ({REL_RE}) the (.+)", text)
                if kind == "swap_relation" and m:  # the reversed relation is clearly false
                    assert rel(the(objs, m[1]), the(objs, m[3]), REL_WORDS[m[2]]) is False
                if kind == "change_color":
                    assert any(w in COLORS for w in text.split())
            swappable = [(a, b) for a in objs for b in objs if a["color"] != b["color"]  # a swap that is false
                         and (a["shape"], a["size"]) != (b["shape"], b["size"])  # and, neither colour
                         and (split.name == "comp" or not {(a["color"], b["shape"]), (b["color"], a["shape"])}
                              & set(HELD_OUT_PAIRS))]  # with the other shape a held-out pair outside comp
            if swappable:
                assert "swap_attribute" in {k for _, k in negs}, objs
    assert min(kinds.values()) > 1000


def test_each_negative_names_the_true_caption_it_was_edited_from(world):
    n = Counter()
    for split in world.values():
        assert len(split.negative_sources) == len(split)
        for i, (negs, sources) in enumerate(zip(split.negatives, split.negative_sources)):
            assert len(sources) == len(negs)
            for (text, kind), source in zip(negs, sources):
                assert caption_truth(source, split.objects[i], MARGIN) is True, (source, text)
                diff = Counter(text.split()) - Counter(source.split())
                if kind == "change_color":  # one colour word replaced (and "a" / "an" before it, if need be)
                    diff -= Counter({"a": 1, "an": 1})
                    assert sum(diff.values()) == 1 and next(iter(diff)) in COLORS, (source, text)
                else:  # swaps keep the words, only their arrangement changes
                    assert not diff and text != source, (source, text)
                n[source in split.captions[i]] += 1
    assert n[True] > 1000 and n[False] > 1000  # sources are both the image's captions and fresh true sentences


def test_swapped_sentences_keep_their_words_and_turn_false():
    objs = scene(("circle", "red", "large", 20, 30), ("square", "blue", "small", 80, 70))
    for true, false in [("a large red circle and a small blue square", "a large blue circle and a small red square"),
                        ("the red circle is left of the blue square", "the blue square is left of the red circle"),
                        ("the red circle is above the blue square", "the blue circle is above the red square")]:
        assert sorted(true.split()) == sorted(false.split())
        assert caption_truth(true, objs) is True and caption_truth(false, objs) is False, false


def test_every_answer_is_right(world):
    types = Counter()
    for split in world.values():
        for i, objs in enumerate(scenes(split)):
            qs = split.questions[i]
            assert len(qs) == len(QUESTION_TYPES)
            assert [t for _, _, t in qs][3:] == ["count", "exist", "relation"]
            for q, a, t in qs:
                assert q.endswith(" ?") and a in ANSWERS and t in QUESTION_TYPES
                assert answer(objs, q) == a, (q, a, objs)
                types[t] += 1
    assert min(types.values()) > 2000


def test_yes_no_answers_are_balanced(world):
    for split in world.values():
        stats = describe(split)
        assert 0.45 <= stats["yes_fraction"] <= 0.55
        for t in ("exist", "relation"):
            yes, no = stats["answers"][t]["yes"], stats["answers"][t]["no"]
            assert 0.45 <= yes / (yes + no) <= 0.55, (split.name, t)


def test_vocabulary_is_exactly_the_words_used(world):
    vocab = vocabulary()
    assert vocab == sorted(set(vocab)) and set(ANSWERS) <= set(vocab) and "?" in vocab
    used = set()
    for split in world.values():
        used.update(w for cs in split.captions for c in cs for w in c.split())
        used.update(w for ns in split.negatives for n, _ in ns for w in n.split())
        used.update(w for qs in split.questions for q, a, _ in qs for w in q.split() + [a])
    assert used == set(vocab)
    assert {w for r in RELATIONS for w in r.split()} <= used


def test_describe_is_json_and_adds_up(world):
    stats = describe(world["train"])
    assert json.loads(json.dumps(stats)) == stats
    n_objects = int((world["train"].objects[..., 5] == 1).sum())
    assert sum(stats["shape"].values()) == sum(stats["color"].values()) == sum(stats["size"].values()) == n_objects
    assert sum(stats["objects_per_image"].values()) == stats["images"] == 2000
    assert sum(sum(v.values()) for v in stats["answers"].values()) == 2000 * len(QUESTION_TYPES)
    assert sum(stats["negatives"].values()) == sum(len(n) for n in world["train"].negatives)


# ------------------------------------------------------------------ cache
def test_cache_is_read_back_identically(world, root):
    assert (root / "tiny-seed0" / "meta.json").is_file()
    again = load("tiny", seed=0, root=root)  # the fixture wrote this folder; now it is read
    for name in SPLITS:
        assert np.array_equal(again[name].images, world[name].images)
        assert np.array_equal(again[name].objects, world[name].objects)
        assert again[name].captions == world[name].captions and again[name].questions == world[name].questions
        assert again[name].negatives == world[name].negatives
        assert again[name].negative_sources == world[name].negative_sources


def test_cache_from_other_generator_code_is_made_again(world, root):
    meta_path = root / "tiny-seed0" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["generator"] = "0" * 64  # as if written by another version of the generator
    meta_path.write_text(json.dumps(meta))
    again = load("tiny", seed=0, root=root)
    assert json.loads(meta_path.read_text())["generator"] == generator_fingerprint()
    assert np.array_equal(again["comp"].images, world["comp"].images)


def test_corrupt_or_partial_cache_names_the_file(tmp_path):
    world = generate(SMALL.replace(n_train=50, n_val=10, n_test=10, n_comp=10), seed=0)
    folder = save_world(world, SMALL, 0, tmp_path / "w")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    images = folder / "train" / "images.npy"
    data = images.read_bytes()
    images.write_bytes(data[:-100])
    with pytest.raises(ValueError, match=r"corrupt cache file .*train/images\.npy"):
        read_world(folder)
    images.write_bytes(data)
    (folder / "val" / "text.json").unlink()
    with pytest.raises(ValueError, match=r"val/text\.json is missing"):
        read_world(folder)
    (folder / "meta.json").write_text("{oops")
    with pytest.raises(ValueError, match=r"corrupt cache file .*meta\.json"):
        read_world(folder)
    (folder / "meta.json").unlink()
    with pytest.raises(ValueError, match=r"meta\.json is missing"):
        read_world(folder)
    (tmp_path / "tiny-seed7").mkdir()
    (tmp_path / "tiny-seed7" / "junk.txt").write_text("x")
    with pytest.raises(ValueError, match=r"tiny-seed7/meta\.json is missing"):
        load("tiny", seed=7, root=tmp_path)


def test_cache_of_another_config_is_refused(tmp_path):
    world = generate(SMALL.replace(n_train=20, n_val=5, n_test=5, n_comp=5), seed=0)
    save_world(world, SMALL, 0, tmp_path / "tiny-seed0")
    with pytest.raises(ValueError, match="not the requested"):
        load("tiny", seed=0, root=tmp_path)


# ------------------------------------------------------------------ torch dataset and loader
def test_batches_hold_the_documented_keys_shapes_and_masks(world):
    tok, split = build_tokenizer(), world["train"]
    batch = next(iter(make_loader(split, tok, batch_size=8, shuffle=False)))
    B = 8
    assert batch["image"].shape == (B, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert 0 <= batch["image"].min() and batch["image"].max() <= 1
    assert torch.equal(batch["image_index"], torch.arange(B))
    assert torch.allclose(batch["image"][3].permute(1, 2, 0) * 255, torch.from_numpy(split.images[3]).float(),
                          atol=1e-4)  # float32 rounding of k / 255 * 255
    assert batch["objects"].shape == (B, MAX_OBJECTS, 6)
    for key in ("caption", "negative", "question"):
        ids, mask = batch[f"{key}_ids"], batch[f"{key}_mask"]
        assert ids.dtype == torch.long and mask.dtype == torch.bool and ids.shape == mask.shape
        assert ids.shape[1] == mask.sum(1).max()  # padded to the batch's longest
        assert (ids[:, 0] == tok.bos_id).all() and (ids[~mask] == tok.pad_id).all()
        assert (ids.gather(1, mask.sum(1, keepdim=True) - 1) == tok.eos_id).all()
    for b in range(B):
        i = int(batch["image_index"][b])
        assert tok.decode(batch["caption_ids"][b]) == split.captions[i][int(batch["caption_index"][b])]
        negative = tok.decode(batch["negative_ids"][b])
        assert (negative, NEGATIVE_KINDS[batch["negative_kind"][b]]) in split.negatives[i]
        question = tok.decode(batch["question_ids"][b])
        assert (question, ANSWERS[batch["answer"][b]], QUESTION_TYPES[batch["question_type"][b]]) \
            in split.questions[i]
    for key in ("image_index", "caption_index", "negative_kind", "answer", "question_type"):
        assert batch[key].shape == (B,) and batch[key].dtype == torch.long


def test_loader_order_and_draws_follow_the_seed_and_epoch(world):
    tok, split = build_tokenizer(), world["val"]

    def epoch_of(loader):
        batches = list(loader)
        return torch.cat([b["image_index"] for b in batches]), torch.cat([b["caption_index"] for b in batches])

    a, b, c = (make_loader(split, tok, 64, shuffle=True, seed=s) for s in (0, 0, 1))
    first_a, first_b, first_c = epoch_of(a), epoch_of(b), epoch_of(c)
    assert torch.equal(first_a[0], first_b[0]) and torch.equal(first_a[1], first_b[1])
    assert not torch.equal(first_a[0], first_c[0])
    assert sorted(first_a[0].tolist()) == list(range(len(split)))
    second = epoch_of(a)  # the next epoch: another order and other captions
    assert not torch.equal(first_a[0], second[0])
    by_image = lambda e: e[1][e[0].argsort()]  # noqa: E731
    assert (by_image(first_a) != by_image(second)).float().mean() > 0.5
    fixed = make_loader(split, tok, 100, shuffle=False, caption="first")
    assert (next(iter(fixed))["caption_index"] == 0).all()


def test_sampler_state_resumes_the_exact_batches(world):
    from mmlite.train import cycle

    tok, split = build_tokenizer(), world["val"]  # 500 images: 2 batches of 200 a pass (drop_last)
    run = lambda loader, k: [b["image_index"].tolist() + b["caption_index"].tolist()  # noqa: E731
                             for _, b in zip(range(k), cycle(loader))]
    whole = run(make_loader(split, tok, 200, shuffle=True, seed=4, drop_last=True), 6)
    first = make_loader(split, tok, 200, shuffle=True, seed=4, drop_last=True)
    head = run(first, 3)  # one pass and one batch of the next
    state = first.sampler.state_dict()
    assert state == {"epoch": 1, "offset": 200}
    resumed = make_loader(split, tok, 200, shuffle=True, seed=4, drop_last=True)
    resumed.sampler.load_state_dict(dict(state))
    assert head + run(resumed, 3) == whole  # not the start of an epoch again: the batches that were next
    for bad in ({"epoch": 0}, {"epoch": -1, "offset": 0}, {"epoch": 0, "offset": len(split) + 1},
                {"epoch": 0.5, "offset": 0}):
        with pytest.raises(ValueError, match="sampler state"):
            resumed.sampler.load_state_dict(bad)


def test_dataset_and_collate_validate(world):
    tok, split = build_tokenizer(), world["test"]
    with pytest.raises(ValueError, match="caption must be"):
        ShapesDataset(split, tok, caption=7)
    with pytest.raises(TypeError, match="tokenizer"):
        ShapesDataset(split, "tok")
    with pytest.raises(IndexError, match="out of range"):
        ShapesDataset(split, tok)[len(split)]
    ds = ShapesDataset(split, tok, caption=2, seed=4)
    assert tok.decode(ds[5]["caption_ids"]) == split.captions[5][2]
    assert ds[(5, 0)]["question_ids"].tolist() == ds[5]["question_ids"].tolist()
    with pytest.raises(ValueError, match="empty"):
        collate([])


def test_other_image_sizes():
    world = generate(DataConfig(n_train=20, n_val=0, n_test=0, n_comp=20, image_size=64), seed=0)
    assert world["train"].images.shape == (20, 64, 64, 3) and len(world["val"]) == 0
    for split in (world["train"], world["comp"]):
        for i in range(len(split)):
            assert all(caption_truth(c, split.objects[i]) for c in split.captions[i])
