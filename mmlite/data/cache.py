"""Writing the shapes world to disk byte for byte reproducibly, and reading it back (chapter 1).

Layout of a world folder (e.g. data/cache/tiny-seed0/):
  meta.json                  format version, seed, config and the SHA-256 of every file below
  <split>/images.npy         (N, H, W, 3) uint8
  <split>/objects.npy        (N, MAX_OBJECTS, 6) int64
  <split>/text.json          {"captions": [[...]], "questions": [[[q, a, type]]], "negatives": [[[c, kind]]],
                             "negative_sources": [[source caption of each negative]]}
np.save and sorted, compact JSON hold no timestamps, so the same seed writes the same bytes. A
folder is written under a temporary name and renamed when complete, so it is never half-written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

import mmlite
from mmlite.data.config import MAX_OBJECTS, PRESETS, DataConfig
from mmlite.data.splits import SPLITS, Split, generate
from mmlite.data.world import FIELDS

FORMAT = 2  # bump when the folder layout changes
_FILES = ("images.npy", "objects.npy", "text.json")
# Modules whose code decides what a seed generates; a cache made by other code is made again.
_GENERATOR_MODULES = ("config", "world", "render", "semantics", "grammar", "questions", "splits")


def generator_fingerprint() -> str:
    """SHA-256 of the generator's source code (stored in meta.json; load() regenerates on a change)."""
    h = hashlib.sha256()
    for name in _GENERATOR_MODULES:
        h.update((Path(__file__).parent / f"{name}.py").read_bytes())
    return h.hexdigest()


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def cache_root(root: str | Path | None = None) -> Path:
    """Where worlds are cached: `root`, else $MMLITE_DATA, else <repository>/data/cache.

    The repository is the checkout mmlite is imported from (editable install); without one, the
    first parent of the current directory holding a data/ folder, else ./data/cache.
    """
    if root is not None:
        return Path(root)
    if os.environ.get("MMLITE_DATA"):
        return Path(os.environ["MMLITE_DATA"])
    repo = Path(mmlite.__file__).resolve().parents[1]
    if (repo / "pyproject.toml").is_file():
        return repo / "data" / "cache"
    for folder in (Path.cwd(), *Path.cwd().parents):
        if (folder / "data").is_dir():
            return folder / "data" / "cache"
    return Path.cwd() / "data" / "cache"


def world_name(preset: str, seed: int, image_size: int | None = None) -> str:
    """Folder name of a cached world: "<preset>-seed<seed>", plus "-size<N>" for a non-default size."""
    default = PRESETS[preset].image_size
    return f"{preset}-seed{seed}" + ("" if image_size in (None, default) else f"-size{image_size}")


def world_folder(preset: str, seed: int, image_size: int | None = None, root: str | Path | None = None) -> Path:
    """Where load() and `python -m mmlite data` keep a world: cache_root(root) / world_name(preset, seed, size)."""
    return cache_root(root) / world_name(preset, seed, image_size)


def save_world(world: dict[str, Split], config: DataConfig, seed: int, folder: str | Path,
               extra: dict[str, bytes] | None = None) -> Path:
    """Write a world (and `extra` files: name -> bytes) to `folder`, replacing an earlier world there."""
    folder = Path(folder)
    if folder.name in ("", ".", ".."):
        raise ValueError(f"the world folder must end in a folder name, got {str(folder)!r} "
                         "(a world replaces its folder, which cannot be '.' or '..')")
    if folder.exists() and not (folder / "meta.json").is_file():
        if folder.is_file() or any(folder.iterdir()):
            raise ValueError(f"{folder} exists and is not a shapes-world folder (no meta.json); "
                             f"choose another output folder")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    old: Path | None = None  # where an earlier world waits while the new one moves in
    try:
        files = {}
        for name in SPLITS:
            split = world[name]
            (tmp / name).mkdir()
            np.save(tmp / name / "images.npy", np.ascontiguousarray(split.images, dtype=np.uint8))
            np.save(tmp / name / "objects.npy", np.ascontiguousarray(split.objects, dtype=np.int64))
            text = {"captions": split.captions, "questions": [[list(q) for q in qs] for qs in split.questions],
                    "negatives": [[list(n) for n in ns] for ns in split.negatives],
                    "negative_sources": split.negative_sources}
            (tmp / name / "text.json").write_bytes(_dumps(text))
            files[name] = {f: _sha256(tmp / name / f) for f in _FILES}
        for fname, data in (extra or {}).items():
            (tmp / fname).write_bytes(data)
        meta = {"format": FORMAT, "generator": generator_fingerprint(), "seed": int(seed),
                "config": dataclasses.asdict(config),
                "splits": {name: {"n": len(world[name]), "sha256": files[name]} for name in SPLITS}}
        (tmp / "meta.json").write_bytes(_dumps(meta) + b"\n")
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        if folder.exists():  # an earlier world: move it aside, put the new one in place, then delete it
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old.", dir=folder.parent))
            os.replace(folder, old / "world")
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and (old / "world").exists() and not folder.exists():
            os.replace(old / "world", folder)  # put the earlier world back (if this fails, it stays in `old`)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return folder


_TEXT_KEYS = ("captions", "questions", "negatives", "negative_sources")


def _check_splits_meta(splits_meta: object, meta_path: Path, folder: Path) -> None:
    """Raise ValueError naming meta.json unless it lists n and a SHA-256 of every file of every split."""
    def bad(what: str) -> ValueError:
        return ValueError(f"corrupt cache file {meta_path} ({what}); delete {folder} to regenerate it")

    if not isinstance(splits_meta, dict):
        raise bad(f"'splits' is a {type(splits_meta).__name__}, not an object")
    for name in SPLITS:
        entry = splits_meta.get(name)
        if not isinstance(entry, dict):
            raise bad(f"no entry for split {name!r}")
        n, sha = entry.get("n"), entry.get("sha256")
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise bad(f"split {name!r} has no valid image count 'n' (got {n!r})")
        if not isinstance(sha, dict) or not all(isinstance(sha.get(f), str) for f in _FILES):
            raise bad(f"split {name!r} lacks the SHA-256 of one of {list(_FILES)}")


def _split_from_files(name: str, images: np.ndarray, objects: np.ndarray, text: object, path: Path,
                      folder: Path) -> Split:
    """Build a Split from its arrays and text.json, raising ValueError naming text.json when it is malformed."""
    if not isinstance(text, dict) or not all(isinstance(text.get(k), list) for k in _TEXT_KEYS):
        got = sorted(text) if isinstance(text, dict) else type(text).__name__
        raise ValueError(f"corrupt cache file {path} (needs the lists {list(_TEXT_KEYS)}, got {got}); "
                         f"delete {folder} to regenerate it")
    try:
        return Split(name, images, objects, text["captions"],
                     [[tuple(q) for q in qs] for qs in text["questions"]],
                     [[tuple(g) for g in gs] for gs in text["negatives"]], text["negative_sources"])
    except TypeError as err:
        raise ValueError(f"corrupt cache file {path} ({err}); delete {folder} to regenerate it") from None


def read_world(folder: str | Path, config: DataConfig | None = None, seed: int | None = None) -> dict[str, Split]:
    """Read a world folder, checking every file's checksum; errors name the file at fault."""
    folder = Path(folder)
    meta_path = folder / "meta.json"
    try:
        meta = json.loads(meta_path.read_bytes())
        splits_meta, saved_config = meta["splits"], DataConfig(**meta["config"])
    except FileNotFoundError:
        raise ValueError(f"incomplete cache: {meta_path} is missing; delete {folder} to regenerate it") from None
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"corrupt cache file {meta_path} ({err!r}); delete {folder} to regenerate it") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path} has format {meta.get('format')}, this mmlite writes {FORMAT}; "
                         f"delete {folder} to regenerate it")
    if config is not None and saved_config != config or seed is not None and meta.get("seed") != seed:
        raise ValueError(f"{folder} holds seed {meta.get('seed')} with {saved_config}, not the requested "
                         f"seed {seed} with {config}; delete it or choose another root")
    _check_splits_meta(splits_meta, meta_path, folder)
    world = {}
    for name in SPLITS:
        arrays, n = {}, splits_meta[name]["n"]
        for fname in _FILES:
            path = folder / name / fname
            if not path.is_file():
                raise ValueError(f"incomplete cache: {path} is missing; delete {folder} to regenerate it")
            if _sha256(path) != splits_meta[name]["sha256"][fname]:
                raise ValueError(f"corrupt cache file {path} (checksum mismatch); delete {folder} to regenerate it")
            try:
                arrays[fname] = json.loads(path.read_bytes()) if fname.endswith(".json") else \
                    np.load(path, allow_pickle=False)
            except ValueError as err:
                raise ValueError(f"corrupt cache file {path} ({err}); delete {folder} to regenerate it") from None
        images, objects, text = arrays["images.npy"], arrays["objects.npy"], arrays["text.json"]
        split = _split_from_files(name, images, objects, text, folder / name / "text.json", folder)
        size = saved_config.image_size
        if images.shape != (n, size, size, 3) or objects.shape != (n, MAX_OBJECTS, len(FIELDS)) \
                or any(len(text[k]) != n for k in _TEXT_KEYS):
            raise ValueError(f"corrupt cache in {folder / name}: sizes disagree with {meta_path}")
        world[name] = split
    return world


def load(preset: str = "tiny", seed: int = 0, root: str | Path | None = None,
         image_size: int | None = None) -> dict[str, Split]:
    """The splits of a preset: read from the cache, or generated and cached the first time (silently).

    The world lives in world_folder(preset, seed, image_size, root). A cache written by
    another version of the generator code is generated again; a damaged one raises ValueError.
    """
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    config = PRESETS[preset] if image_size is None else PRESETS[preset].replace(image_size=image_size)
    folder = world_folder(preset, seed, image_size, root)
    if folder.exists():
        try:
            current = json.loads((folder / "meta.json").read_bytes()).get("generator") == generator_fingerprint()
        except (OSError, ValueError, AttributeError):
            current = True  # let read_world explain what is wrong
        if current:
            return read_world(folder, config, seed)
    world = generate(config, seed)
    try:
        save_world(world, config, seed, folder)
    except OSError:
        if not (folder / "meta.json").is_file():  # another process may have just written the same world
            raise
    return world
