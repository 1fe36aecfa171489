"""Instruction data for a generative vision-language model, per split: reasoning questions and a dialogue
per image, all computed from the scene graph (mmlite.data.reasoning, mmlite.data.dialogue).

Like the splits themselves (mmlite.data.splits), a split's images are cut into chunks of CHUNK, and
chunk c of split s draws from its own SeedSequence(seed, spawn_key=(s, c, INSTRUCT_PART)); parts 0
and 1 are the scenes and the captions/questions, so this text never moves a pixel or a caption, and an
image's instructions depend only on its chunk. Answer balance is kept per chunk.
"""

from __future__ import annotations

import numpy as np

from mmlite.data import dialogue, reasoning
from mmlite.data.config import MAX_OBJECTS
from mmlite.data.grammar import Draw
from mmlite.data.semantics import scene_list
from mmlite.data.splits import CHUNK, SPLITS
from mmlite.data.world import FIELDS

INSTRUCT_PART = 2  # the third part of a chunk's spawn key (0: scenes and pixels, 1: captions and questions)
# Words the instruction data can emit beyond mmlite.data.dataset.vocabulary().
VOCABULARY: tuple[str, ...] = tuple(sorted(set(reasoning.VOCABULARY) | set(dialogue.VOCABULARY)))


def _chunk_draw(seed: int, split_index: int, chunk_index: int) -> Draw:
    ss = np.random.SeedSequence(seed, spawn_key=(split_index, chunk_index, INSTRUCT_PART))
    return Draw(np.random.Generator(np.random.PCG64(ss)))


def make_instructions(objects: np.ndarray, seed: int, split_name: str, margin: int = 15,
                      per_hops: tuple[int, ...] = (1, 2, 3)) -> list[dict]:
    """Per image of a split: {"reasoning": [ReasoningQuestion, ...], "dialogue": [Turn, ...]}.

    objects: (N, MAX_OBJECTS, 6) int array of the split (Split.objects); seed: the world's seed;
    split_name: one of SPLITS (only "comp" may name held-out colour-shape pairs); margin: the
    world's relation margin (DataConfig.relation_margin); per_hops: hop counts of the reasoning
    questions per image (mmlite.data.reasoning.reasoning_questions). Deterministic from the seed.
    """
    objects = np.asarray(objects)
    if objects.ndim != 3 or objects.shape[1:] != (MAX_OBJECTS, len(FIELDS)) or objects.dtype.kind not in "iu":
        raise ValueError(f"objects must be an integer array of shape (N, {MAX_OBJECTS}, {len(FIELDS)}), "
                         f"got {objects.dtype} {objects.shape}")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if split_name not in SPLITS:
        raise ValueError(f"split_name must be one of {SPLITS}, got {split_name!r}")
    split_index, held_out_ok = SPLITS.index(split_name), split_name == "comp"
    out: list[dict] = []
    for c in range(-(-len(objects) // CHUNK)):
        d, balance = _chunk_draw(int(seed), split_index, c), {}
        for row in objects[c * CHUNK:(c + 1) * CHUNK]:
            objs = scene_list(row)
            out.append({
                "reasoning": reasoning.reasoning_questions(objs, d, margin, balance, held_out_ok, per_hops),
                "dialogue": dialogue.make_dialogue(objs, d, margin, balance, held_out_ok),
            })
    return out
