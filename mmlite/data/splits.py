"""The four splits of the shapes world and how they are generated from a seed (derived in chapter 1).

Each split is cut into chunks of CHUNK scenes; chunk c of split s draws from its own
SeedSequence(seed, spawn_key=(s, c, part)), part 0 for scenes and pixels and part 1 for language.
So a split never changes when another split's size changes, and the language can change without
moving a pixel. Chunks are generated in parallel processes for large presets; the result does not
depend on the number of processes.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from mmlite.data.config import MAX_OBJECTS, DataConfig
from mmlite.data.grammar import Draw, caption_specs, negative_specs, render
from mmlite.data.questions import questions_for
from mmlite.data.render import render_scenes
from mmlite.data.semantics import scene_list
from mmlite.data.world import COLORS, FIELDS, SHAPES, SIZES, VALID, place_objects, sample_attributes

if TYPE_CHECKING:
    import torch

SPLITS: tuple[str, ...] = ("train", "val", "test", "comp")
CHUNK = 1000  # scenes per chunk (part of the data's definition: changing it changes the data)
_PARALLEL_FROM = 20_000  # use worker processes when a world holds at least this many images


@dataclass(eq=False)
class Split:
    """One split: images, scene objects, and the text that goes with each image."""

    name: str  # "train", "val", "test" or "comp"
    images: np.ndarray  # (N, H, W, 3) uint8
    objects: np.ndarray  # (N, MAX_OBJECTS, 6) int64, columns mmlite.data.world.FIELDS
    captions: list[list[str]]  # n_captions per image; the first lists every object left to right
    questions: list[list[tuple[str, str, str]]]  # (question, answer, question type) per image
    negatives: list[list[tuple[str, str]]]  # (false caption, kind) per image, one per kind available
    # per image, aligned with `negatives`: the true caption each negative was edited from (one of the image's
    # captions or a fresh true listing / relation); compare a negative with this, never with an arbitrary caption
    negative_sources: list[list[str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)

    def __repr__(self) -> str:
        n, h, w, _ = self.images.shape
        return f"Split({self.name!r}, {n} images of {h}x{w}, {len(self.captions[0]) if n else 0} captions each)"

    def image_tensor(self, index: np.ndarray | list[int] | None = None) -> "torch.Tensor":
        """Images as float32 (N, 3, H, W) in [0, 1], all or those at `index`: the layout the models take."""
        import torch

        images = self.images if index is None else self.images[np.asarray(index)]
        return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(255)  # (N, 3, H, W)

    def scene(self, i: int) -> list[dict[str, object]]:
        """Readable objects of image i: [{"shape": "circle", "color": "red", "size": "small", "x": 31, "y": 70}]."""
        return [{"shape": SHAPES[o[0]], "color": COLORS[o[1]], "size": SIZES[o[2]], "x": o[3], "y": o[4]}
                for o in self.objects[i].tolist() if o[VALID] == 1]


def make_scenes(n: int, config: DataConfig, rng: np.random.Generator, comp: bool = False
                ) -> tuple[np.ndarray, np.ndarray]:
    """Sample n scenes and render them: (objects (n, MAX_OBJECTS, 6) int64, images (n, H, W, 3) uint8).

    Scenes where an object keeps less than config.min_visible of its area are placed and
    rendered again until none is left.
    """
    objects = place_objects(sample_attributes(n, config, rng, comp=comp), rng)
    images, visible = render_scenes(objects, config.image_size, rng, color_jitter=config.color_jitter,
                                    return_visibility=True)
    for _ in range(1000):
        bad = np.flatnonzero(visible.min(axis=1) < config.min_visible)
        if len(bad) == 0:
            return objects, images
        objects[bad] = place_objects(objects[bad], rng)
        images[bad], visible[bad] = render_scenes(objects[bad], config.image_size, rng,
                                                  color_jitter=config.color_jitter, return_visibility=True)
    raise RuntimeError("could not meet DataConfig.min_visible; lower it or max_objects")


def _chunk_seeds(seed: int, split_index: int, chunk_index: int) -> tuple[np.random.Generator, np.random.Generator]:
    make = lambda part: np.random.Generator(np.random.PCG64(  # noqa: E731
        np.random.SeedSequence(seed, spawn_key=(split_index, chunk_index, part))))
    return make(0), make(1)


def _make_chunk(job: tuple[DataConfig, int, int, int, int]) -> tuple:
    """Scenes, images and text of one chunk: job = (config, seed, split index, chunk index, size)."""
    config, seed, split_index, chunk_index, n = job
    scene_rng, text_rng = _chunk_seeds(seed, split_index, chunk_index)
    comp = SPLITS[split_index] == "comp"
    objects, images = make_scenes(n, config, scene_rng, comp=comp)
    d, balance = Draw(text_rng), {}
    captions, questions, negatives, sources = [], [], [], []
    for row in objects:
        objs = scene_list(row)
        specs = caption_specs(objs, d, config.n_captions, config.relation_margin)
        captions.append([render(s) for s in specs])
        questions.append(questions_for(objs, d, config.relation_margin, balance, held_out_ok=comp))
        negs = negative_specs(objs, d, specs, config.relation_margin, held_out_ok=comp)
        negatives.append([(render(s), kind) for s, kind, _ in negs])
        sources.append([render(source) for _, _, source in negs])
    return objects, images, captions, questions, negatives, sources


def generate(config: DataConfig, seed: int, workers: int | None = None) -> dict[str, Split]:
    """Build the four splits in memory: {"train", "val", "test", "comp"} -> Split.

    workers: processes to use (default: up to 4 when the world holds >= 20k images, else 1).
    """
    if not isinstance(config, DataConfig):
        raise TypeError(f"config must be a DataConfig, got {type(config).__name__}")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    sizes = config.sizes()
    jobs = [(config, int(seed), s, c, min(CHUNK, sizes[name] - c * CHUNK))
            for s, name in enumerate(SPLITS) for c in range(-(-sizes[name] // CHUNK))]
    if workers is None:
        workers = min(4, os.cpu_count() or 1) if sum(sizes.values()) >= _PARALLEL_FROM else 1
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(_make_chunk, jobs, chunksize=1))
    else:
        results = [_make_chunk(job) for job in jobs]
    world = {}
    for s, name in enumerate(SPLITS):
        parts = [r for job, r in zip(jobs, results) if job[2] == s]
        size = config.image_size
        no_images = np.zeros((0, size, size, 3), np.uint8)
        no_objects = np.zeros((0, MAX_OBJECTS, len(FIELDS)), np.int64)
        world[name] = Split(
            name=name,
            images=np.concatenate([p[1] for p in parts]) if parts else no_images,
            objects=np.concatenate([p[0] for p in parts]) if parts else no_objects,
            captions=[c for p in parts for c in p[2]],
            questions=[q for p in parts for q in p[3]],
            negatives=[g for p in parts for g in p[4]],
            negative_sources=[g for p in parts for g in p[5]],
        )
    return world
