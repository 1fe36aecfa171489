"""The world cache: structurally wrong files with matching checksums, and writing that never loses a world."""

import hashlib
import json
import os

import numpy as np
import pytest

from mmlite.data import SPLITS, DataConfig, generate, read_world, save_world
from mmlite.data import cache

CONFIG = DataConfig(n_train=6, n_val=3, n_test=3, n_comp=3)


@pytest.fixture(scope="module")
def world():
    return generate(CONFIG, seed=0)


def _rewrite(folder, split, fname, data: bytes) -> None:
    """Replace one file and update its checksum in meta.json, so only its structure is wrong."""
    (folder / split / fname).write_bytes(data)
    meta = json.loads((folder / "meta.json").read_bytes())
    meta["splits"][split]["sha256"][fname] = hashlib.sha256(data).hexdigest()
    (folder / "meta.json").write_text(json.dumps(meta))


def test_round_trip_keeps_every_text_field(world, tmp_path):
    again = read_world(save_world(world, CONFIG, 0, tmp_path / "w"))
    for name in SPLITS:
        assert np.array_equal(again[name].images, world[name].images)
        assert again[name].captions == world[name].captions
        assert again[name].negatives == world[name].negatives
        assert again[name].negative_sources == world[name].negative_sources  # kept, aligned with negatives


@pytest.mark.parametrize("text, message", [
    ({}, r"needs the lists \['captions', 'questions', 'negatives', 'negative_sources'\], got \[\]"),
    ([], "got list"),
    ("drop negative_sources", "got \\['captions', 'negatives', 'questions'\\]"),
    ("questions not lists", "corrupt cache file"),
])
def test_structurally_wrong_text_json_is_a_value_error_naming_it(world, tmp_path, text, message):
    folder = save_world(world, CONFIG, 0, tmp_path / "w")
    good = json.loads((folder / "val" / "text.json").read_bytes())
    if text == "drop negative_sources":
        text = {k: v for k, v in good.items() if k != "negative_sources"}
    elif text == "questions not lists":
        text = dict(good, questions=[[5] for _ in good["questions"]])
    _rewrite(folder, "val", "text.json", json.dumps(text).encode())
    with pytest.raises(ValueError, match=message) as err:
        read_world(folder)
    assert str(folder / "val" / "text.json") in str(err.value)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["splits"].pop("val"), "no entry for split 'val'"),
    (lambda m: m["splits"]["test"].pop("n"), "split 'test' has no valid image count"),
    (lambda m: m["splits"]["comp"]["sha256"].pop("objects.npy"), "split 'comp' lacks the SHA-256"),
    (lambda m: m.update(splits=[1, 2]), "'splits' is a list"),
])
def test_structurally_wrong_meta_is_a_value_error_naming_it(world, tmp_path, edit, message):
    folder = save_world(world, CONFIG, 0, tmp_path / "w")
    meta = json.loads((folder / "meta.json").read_bytes())
    edit(meta)
    (folder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=message) as err:
        read_world(folder)
    assert str(folder / "meta.json") in str(err.value)


@pytest.mark.parametrize("name", ["", ".", ".."])
def test_save_world_refuses_a_folder_without_a_name(world, tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="must end in a folder name"):
        save_world(world, CONFIG, 0, name)
    assert list(tmp_path.iterdir()) == [], "nothing is left behind"


def test_a_failed_replace_keeps_the_earlier_world(world, tmp_path, monkeypatch):
    folder = save_world(world, CONFIG, 0, tmp_path / "w")
    before = (folder / "meta.json").read_bytes()
    real_replace = os.replace
    calls = []

    def failing_replace(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the earlier world was moved aside; putting the new one in place fails
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(cache.os, "replace", failing_replace)
    with pytest.raises(OSError, match="No space left"):
        save_world(world, CONFIG, 1, folder)
    assert (folder / "meta.json").read_bytes() == before, "the earlier world is back in place"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w"], "no temporary or .old folder is left"
