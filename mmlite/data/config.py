"""Size presets and generation settings of the shapes world (introduced in chapter 1)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

MAX_OBJECTS = 4  # slots per scene in the objects array


@dataclass(frozen=True)
class DataConfig:
    """How many scenes each split holds and how they are drawn."""

    n_train: int = 2000  # images in the training split
    n_val: int = 500  # images in the validation split (same distribution as train)
    n_test: int = 500  # images in the test split (same distribution as train)
    n_comp: int = 500  # images in the compositional split (each holds a held-out colour-shape pair)
    image_size: int = 32  # side of the square RGB images, in pixels (>= 16)
    min_objects: int = 1  # fewest objects in a scene (>= 1)
    max_objects: int = 4  # most objects in a scene (<= MAX_OBJECTS = 4)
    n_captions: int = 5  # captions per image, like COCO's five
    min_visible: float = 0.75  # every object keeps at least this fraction of its area visible (occlusion cap)
    relation_margin: int = 15  # "a left of b" needs x_b - x_a >= this, in % of the image side
    color_jitter: int = 12  # each RGB channel of an object moves by up to +- this from its named colour

    def __post_init__(self) -> None:
        for name in ("n_train", "n_val", "n_test", "n_comp"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"DataConfig.{name} must be a non-negative integer, got {value!r}")
        for name in ("image_size", "min_objects", "max_objects", "n_captions", "relation_margin", "color_jitter"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"DataConfig.{name} must be an int, got {type(value).__name__}")
        if self.image_size < 16:
            raise ValueError(f"DataConfig.image_size must be >= 16 pixels, got {self.image_size}")
        if not 1 <= self.min_objects <= MAX_OBJECTS:
            raise ValueError(f"DataConfig.min_objects must be in 1..{MAX_OBJECTS}, got {self.min_objects}")
        if not self.min_objects <= self.max_objects <= MAX_OBJECTS:
            raise ValueError(f"DataConfig.max_objects must be in min_objects..{MAX_OBJECTS} "
                             f"({self.min_objects}..{MAX_OBJECTS}), got {self.max_objects}")
        if self.n_captions < 1:
            raise ValueError(f"DataConfig.n_captions must be >= 1, got {self.n_captions}")
        if not 0.5 <= self.min_visible <= 1.0:
            raise ValueError(f"DataConfig.min_visible must be in [0.5, 1.0], got {self.min_visible}")
        if not 5 <= self.relation_margin <= 40:
            raise ValueError(f"DataConfig.relation_margin must be in 5..40 (% of the side), got {self.relation_margin}")
        if not 0 <= self.color_jitter <= 30:
            raise ValueError(f"DataConfig.color_jitter must be in 0..30, got {self.color_jitter}")

    def sizes(self) -> dict[str, int]:
        """Images per split, in the fixed split order."""
        return {"train": self.n_train, "val": self.n_val, "test": self.n_test, "comp": self.n_comp}

    def replace(self, **changes: object) -> "DataConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, DataConfig] = {
    # CPU chapters and tests: ~3.5k images, about a second to generate.
    "tiny": DataConfig(n_train=2000, n_val=500, n_test=500, n_comp=500),
    # longer CPU runs: 20k training images.
    "small": DataConfig(n_train=20_000, n_val=2000, n_test=2000, n_comp=2000),
    # a GPU run: 200k training images.
    "base": DataConfig(n_train=200_000, n_val=10_000, n_test=10_000, n_comp=10_000),
}
