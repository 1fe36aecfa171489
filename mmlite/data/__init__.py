"""The shapes world: procedurally rendered scenes with captions, questions and hard negatives (chapter 1).

    world = load("tiny", seed=0)     # {"train", "val", "test", "comp"} -> Split, cached under data/cache/
    loader = make_loader(world["train"], build_tokenizer(), batch_size=64, shuffle=True)
"""

from mmlite.data.cache import cache_root, load, read_world, save_world, world_folder, world_name
from mmlite.data.config import MAX_OBJECTS, PRESETS, DataConfig
from mmlite.data.dataset import EpochSampler, ShapesDataset, build_tokenizer, collate, make_loader, vocabulary
from mmlite.data.grammar import NEGATIVE_KINDS
from mmlite.data.questions import ANSWERS, QUESTION_TYPES
from mmlite.data.render import render_scenes
from mmlite.data.semantics import caption_truth, parse_caption
from mmlite.data.splits import SPLITS, Split, generate
from mmlite.data.stats import describe
from mmlite.data.world import (COLOR_RGB, COLORS, FIELDS, HELD_OUT_PAIRS, NUMBERS, RELATIONS, SHAPES, SIZES,
                               is_held_out, names_held_out)

__all__ = [
    "SHAPES", "COLORS", "COLOR_RGB", "SIZES", "RELATIONS", "NUMBERS", "ANSWERS", "QUESTION_TYPES",
    "NEGATIVE_KINDS", "FIELDS", "MAX_OBJECTS", "HELD_OUT_PAIRS", "SPLITS", "DataConfig", "PRESETS", "Split",
    "generate", "load", "save_world", "read_world", "cache_root", "world_name", "world_folder", "vocabulary",
    "build_tokenizer",
    "ShapesDataset", "EpochSampler", "collate", "make_loader", "render_scenes", "describe", "parse_caption",
    "caption_truth", "is_held_out", "names_held_out",
]
