"""Image-caption pairs read from a CSV file and image files, in open_clip's convention (chapter 1).

A pairs CSV has a header and one row per caption: a column of image paths ("filepath") and a column of
captions ("title"), tab-separated like open_clip's --csv-separator default, or comma-separated. Relative
paths are resolved against the CSV's folder. Rows that share an image path are one image with several
captions, so a COCO-style file with five rows per photo gives five captions per image:

    filepath            title
    images/0001.jpg     a dog runs on the beach
    images/0001.jpg     a brown dog near the sea

    train = load_pairs("train.csv", image_size=64)           # ImageCaptionSet, images (N, 64, 64, 3) uint8
    tok = tokenizer_from_captions(c for cs in train.captions for c in cs)
    loader = make_pairs_loader(train, tok, batch_size=64, shuffle=True)

export_split writes a shapes-world split in this layout, so the same code path can be checked on it.
"""

from __future__ import annotations

import csv
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset

from mmlite.data.dataset import EpochSampler, collate
from mmlite.data.splits import Split
from mmlite.text import Tokenizer


def _check_separator(separator: object, argument: str = "separator") -> None:
    if not isinstance(separator, str) or len(separator) != 1 or separator in '"\r\n':
        raise ValueError(f"{argument} must be one character other than a quote or a line break "
                         f"(e.g. '\\t' or ','), got {separator!r}")


def _read_rows(path: str | Path, image_column: str, caption_column: str, separator: str | None
               ) -> list[tuple[str, Path, str]]:
    """(where, image path, caption) per data row; `where` is "<csv>, row r (line l)" for error messages."""
    if not isinstance(path, (str, Path)):
        raise TypeError(f"path must be a str or pathlib.Path, got {type(path).__name__}")
    for argument, column in (("image_column", image_column), ("caption_column", caption_column)):
        if not isinstance(column, str) or not column:
            raise ValueError(f"{argument} must be a non-empty column name, got {column!r}")
    if image_column == caption_column:
        raise ValueError(f"image_column and caption_column are both {image_column!r}; they must differ")
    if separator is not None:
        _check_separator(separator)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pairs CSV {path} {'is not a file' if path.exists() else 'does not exist'}")
    try:  # utf-8-sig: a byte-order mark (spreadsheet exports) is not part of the first column's name
        with open(path, newline="", encoding="utf-8-sig") as f:
            text = f.read()
    except UnicodeDecodeError as err:
        raise ValueError(f"pairs CSV {path} is not UTF-8 text: {err}") from None
    header_line = text.split("\n", 1)[0]
    if not header_line.strip():
        raise ValueError(f"pairs CSV {path} has no header on line 1; expected columns "
                         f"{image_column!r} and {caption_column!r}")
    if separator is None:  # sniff: a tab anywhere in the header means tab-separated, else a comma
        separator = "\t" if "\t" in header_line else "," if "," in header_line else None
        if separator is None:
            raise ValueError(f"pairs CSV {path}: header {header_line.strip()!r} holds neither a tab nor a "
                             f"comma, so it has one column; give separator= or fix the header")
    reader = csv.reader(io.StringIO(text), delimiter=separator, strict=True)
    start = 1  # the line the record being read starts on (a quoted field may span lines)
    try:
        header = next(reader)
        columns = {}
        for k, name in enumerate(header):
            if name in (image_column, caption_column) and name in columns:
                raise ValueError(f"pairs CSV {path}: column {name!r} appears twice in the header {header}")
            columns.setdefault(name, k)
        for argument, column in (("image_column", image_column), ("caption_column", caption_column)):
            if column not in columns:
                raise ValueError(f"pairs CSV {path} has no column {column!r} ({argument}); its columns are "
                                 f"{header} (separator {separator!r})")
        i_img, i_cap = columns[image_column], columns[caption_column]
        rows, folder = [], path.parent
        while True:
            start = reader.line_num + 1
            row = next(reader, None)
            if row is None:
                break
            if not row:  # a blank line holds no pair
                continue
            where = f"pairs CSV {path}, row {len(rows) + 1} (line {start})"
            if len(row) != len(header):
                raise ValueError(f"{where} has {len(row)} fields but the header has {len(header)}; a caption "
                                 f"holding the separator {separator!r} must be quoted")
            image, caption = row[i_img], row[i_cap]
            if not image.strip():
                raise ValueError(f"{where}: empty image path in column {image_column!r}")
            if not caption.strip():
                raise ValueError(f"{where}: empty caption in column {caption_column!r} (image {image!r})")
            rows.append((where, Path(os.path.normpath(folder / image)), caption))
    except csv.Error as err:
        raise ValueError(f"pairs CSV {path}, record starting on line {start}: {err}") from None
    if not rows:
        raise ValueError(f"pairs CSV {path} has a header but no rows")
    return rows


def read_pairs_csv(path: str | Path, image_column: str = "filepath", caption_column: str = "title",
                   separator: str | None = None) -> list[tuple[Path, str]]:
    """(image path, caption) per row of a pairs CSV, in file order; relative paths join the CSV's folder.

    separator None reads the header line: a tab in it means tab-separated, else comma-separated.
    Blank lines are skipped; fields may be quoted ("a red, round ball"), as the csv module writes them.
    """
    return [(image, caption) for _, image, caption in _read_rows(path, image_column, caption_column, separator)]


@dataclass(eq=False)
class ImageCaptionSet:
    """Images read from disk with their captions: the fields of a mmlite.data.Split a model needs."""

    name: str  # e.g. "train" or "val"
    images: np.ndarray  # (N, S, S, 3) uint8
    captions: list[list[str]]  # per image, one or more captions, in file order
    paths: list[Path]  # per image, the file it was read from

    def __post_init__(self) -> None:
        if not isinstance(self.images, np.ndarray) or self.images.dtype != np.uint8 or self.images.ndim != 4 \
                or self.images.shape[3] != 3 or self.images.shape[1] != self.images.shape[2]:
            raise ValueError(f"images must be a (N, S, S, 3) uint8 array, got "
                             f"{getattr(self.images, 'shape', type(self.images).__name__)} "
                             f"{getattr(self.images, 'dtype', '')}")
        n = len(self.images)
        if len(self.captions) != n or len(self.paths) != n:
            raise ValueError(f"{n} images need {n} caption lists and {n} paths, got {len(self.captions)} "
                             f"and {len(self.paths)}")
        for i, cs in enumerate(self.captions):
            if not isinstance(cs, list) or not cs or not all(isinstance(c, str) for c in cs):
                raise ValueError(f"captions[{i}] must be a non-empty list of str, got {cs!r:.80}")

    def __len__(self) -> int:
        return len(self.images)

    def __repr__(self) -> str:
        n, s = len(self.images), self.images.shape[1]
        return f"ImageCaptionSet({self.name!r}, {n} images of {s}x{s}, {sum(map(len, self.captions))} captions)"

    def image_tensor(self, index: np.ndarray | list[int] | None = None) -> torch.Tensor:
        """Images as float32 (N, 3, S, S) in [0, 1], all or those at `index`: the layout the models take."""
        images = self.images if index is None else self.images[np.asarray(index)]
        return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(255)  # (N, 3, S, S)


def load_image(path: Path, image_size: int, where: str = "") -> np.ndarray:
    """One image file as (S, S, 3) uint8, S = image_size.

    The rule: turn upright by the file's EXIF orientation (as photo viewers show it), convert to RGB (an
    alpha channel is dropped, as open_clip's .convert("RGB") does), crop the centred square of side
    min(width, height), then resize it to S x S with Pillow's BICUBIC filter (skipped when it is already
    S x S, so a square image of the right size keeps its exact bytes). Cropping rather than squashing keeps
    a circle round and proportions true, as CLIP's Resize(shorter side) + CenterCrop does; the cost is that
    the edges of a wide or tall photo are cut off, with anything there a caption names. Pillow's resize
    widens its filter when shrinking, so downscaling averages pixels instead of skipping them.
    """
    prefix = f"{where}: " if where else ""
    if not path.is_file():
        raise FileNotFoundError(f"{prefix}image {path} {'is not a file' if path.exists() else 'does not exist'}")
    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im).convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise ValueError(f"{prefix}image {path} cannot be read: {err}") from None
    w, h = im.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    im = im.crop((left, top, left + side, top + side))
    if side != image_size:
        im = im.resize((image_size, image_size), Image.Resampling.BICUBIC)
    return np.asarray(im, dtype=np.uint8)  # (S, S, 3)


def load_pairs(csv_path: str | Path, image_size: int, name: str | None = None, *, image_column: str = "filepath",
               caption_column: str = "title", separator: str | None = None) -> ImageCaptionSet:
    """Read a pairs CSV and its images into memory; rows sharing an image path become one image.

    Images keep the order in which their path first appears, and each image's captions keep file order
    (repeated captions are kept). name defaults to the CSV's file name without suffix ("train.csv" -> "train").
    Every image is resized by load_image's rule to image_size x image_size.
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive integer (pixels), got {image_size!r}")
    if name is not None and not isinstance(name, str):
        raise TypeError(f"name must be a str or None, got {type(name).__name__}")
    rows = _read_rows(csv_path, image_column, caption_column, separator)
    index: dict[Path, int] = {}
    paths, captions, images = [], [], []
    for where, image, caption in rows:
        if image not in index:
            index[image] = len(paths)
            paths.append(image)
            captions.append([])
            images.append(load_image(image, image_size, where))
        captions[index[image]].append(caption)
    return ImageCaptionSet(name=Path(csv_path).stem if name is None else name, images=np.stack(images),
                           captions=captions, paths=paths)


def tokenizer_from_captions(captions: Iterable[str], min_count: int = 1) -> Tokenizer:
    """A word-level tokenizer over training captions: Tokenizer.from_texts (descending count, then
    alphabetical; words seen fewer than min_count times are left out and encode to [UNK])."""
    if isinstance(captions, (str, bytes)):
        raise TypeError(f"captions must be an iterable of strings, got a single {type(captions).__name__}")
    if isinstance(captions, ImageCaptionSet):
        raise TypeError("captions must be strings; for an ImageCaptionSet pass "
                        "(c for cs in pairs.captions for c in cs)")
    captions = list(captions)
    for k, c in enumerate(captions):
        if isinstance(c, (list, tuple)):
            raise TypeError(f"captions must be strings, got a {type(c).__name__} at position {k}; for per-image "
                            f"lists pass (c for cs in pairs.captions for c in cs)")
    return Tokenizer.from_texts(captions, min_count=min_count)


class CaptionPairsDataset(Dataset):
    """Items of an ImageCaptionSet as tensors, with the keys and dtypes of mmlite.data.ShapesDataset.

    dataset[i] draws with epoch 0; dataset[(i, epoch)] draws that epoch's caption, with the same
    draw as ShapesDataset (numpy.random.default_rng((seed, epoch, i)), first uniform), so an exported
    shapes split gives the same captions through either dataset. An item holds:
      image (3, S, S) float32 in [0, 1]; image_index and caption_index () long;
      caption_ids (T,) long, [BOS] ... [EOS], words outside the tokenizer -> [UNK].
    """

    def __init__(self, pairs: ImageCaptionSet, tokenizer: Tokenizer, caption: str | int = "random",
                 seed: int = 0) -> None:
        if not isinstance(pairs, ImageCaptionSet):
            raise TypeError(f"pairs must be a mmlite.data.disk.ImageCaptionSet, got {type(pairs).__name__}")
        if not isinstance(tokenizer, Tokenizer):
            raise TypeError(f"tokenizer must be a mmlite.text.Tokenizer, got {type(tokenizer).__name__}")
        fewest = min(range(len(pairs)), key=lambda i: len(pairs.captions[i]), default=None)
        n_min = len(pairs.captions[fewest]) if fewest is not None else 0
        if caption not in ("random", "first") and not (isinstance(caption, int) and not isinstance(caption, bool)
                                                       and 0 <= caption < n_min):
            raise ValueError(f"caption must be 'random', 'first' or an index in 0..{n_min - 1} (image {fewest}, "
                             f"{pairs.paths[fewest] if fewest is not None else ''}, has {n_min}), got {caption!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.pairs, self.tokenizer, self.caption, self.seed = pairs, tokenizer, caption, seed

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        index = int(index)
        if not 0 <= index < len(self.pairs):
            raise IndexError(f"index {index} out of range for a set of {len(self.pairs)} images")
        captions = self.pairs.captions[index]
        if self.caption == "random":
            c = int(np.random.default_rng((self.seed, int(epoch), index)).random() * len(captions))
        else:
            c = 0 if self.caption == "first" else self.caption
        long = lambda v: torch.tensor(v, dtype=torch.long)  # noqa: E731
        image = torch.from_numpy(self.pairs.images[index]).permute(2, 0, 1)  # (3, S, S) uint8
        return {
            "image": image.float().contiguous() / 255,  # (3, S, S)
            "image_index": long(index),
            "caption_index": long(c),
            "caption_ids": long(self.tokenizer.encode(captions[c], add_bos_eos=True)),
        }


def make_pairs_loader(pairs: ImageCaptionSet, tokenizer: Tokenizer, batch_size: int, shuffle: bool,
                      seed: int = 0, caption: str | int = "random", **kw: object) -> DataLoader:
    """A DataLoader of collated batches (mmlite.data.collate) whose order and draws depend only on `seed`
    and the epoch, as mmlite.data.make_loader; extra keywords go to torch.utils.data.DataLoader."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    dataset = CaptionPairsDataset(pairs, tokenizer, caption=caption, seed=seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=EpochSampler(len(pairs), shuffle, seed),
                      collate_fn=collate, **kw)


def export_split(split: Split, folder: str | Path, name: str = "train", separator: str = "\t") -> Path:
    """Write a split as a pairs CSV: images to folder/images/<name>/NNNNN.png, one CSV row per caption.

    Returns folder/<name>.csv, whose columns are filepath (relative to the CSV, "/"-separated) and title.
    PNG is lossless, so load_pairs at the split's image size gives back its images byte for byte.
    Existing files of the same names are overwritten. Each split gets its own image folder, so train and
    val exported into one folder do not overwrite each other's images.
    """
    if not isinstance(split, Split):
        raise TypeError(f"split must be a mmlite.data.Split, got {type(split).__name__}")
    if len(split) == 0:
        raise ValueError(f"split {split.name!r} has no images; a pairs CSV needs at least one row")
    if not isinstance(folder, (str, Path)):
        raise TypeError(f"folder must be a str or pathlib.Path, got {type(folder).__name__}")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name):
        raise ValueError(f"name must be a file name of letters, digits, '_', '.' or '-' (e.g. 'train'), "
                         f"got {name!r}")
    _check_separator(separator)
    folder = Path(folder)
    image_folder = folder / "images" / name
    image_folder.mkdir(parents=True, exist_ok=True)
    csv_path = folder / f"{name}.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter=separator, lineterminator="\n")
        writer.writerow(["filepath", "title"])
        for i, (image, captions) in enumerate(zip(split.images, split.captions)):
            relative = f"images/{name}/{i:05d}.png"
            Image.fromarray(np.ascontiguousarray(image)).save(folder / relative, format="PNG")
            writer.writerows([relative, c] for c in captions)
    return csv_path
