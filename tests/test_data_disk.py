"""Image-caption pairs on disk: a shapes split exported and read back byte for byte, the loader against
ShapesDataset's, the resize rule against torch's antialiased bicubic, CSV dialects, the tokenizer, errors."""

import csv
import re

import numpy as np
import pytest
import torch
from PIL import Image

from mmlite.data import DataConfig, ShapesDataset, build_tokenizer, collate, generate, make_loader
from mmlite.data.disk import (CaptionPairsDataset, ImageCaptionSet, export_split, load_image, load_pairs,
                              make_pairs_loader, read_pairs_csv, tokenizer_from_captions)
from mmlite.text import SPECIALS, Tokenizer

SHARED_KEYS = {"image", "image_index", "caption_index", "caption_ids", "caption_mask"}


@pytest.fixture(scope="module")
def world():
    return generate(DataConfig(n_train=24, n_val=8, n_test=0, n_comp=0), seed=1)


@pytest.fixture(scope="module")
def exported(world, tmp_path_factory):
    """train and val of the small world written into one folder: {"train": csv path, "val": csv path}."""
    folder = tmp_path_factory.mktemp("pairs")
    return {name: export_split(world[name], folder, name=name) for name in ("train", "val")}


def write_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)
    return path


def write_text(path, text):
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def two_images(tmp_path):
    """Two 8x8 PNGs under tmp_path/img/, a.png red and b.png blue."""
    write_png(tmp_path / "img" / "a.png", np.full((8, 8, 3), (255, 0, 0)))
    write_png(tmp_path / "img" / "b.png", np.full((8, 8, 3), (0, 0, 255)))
    return tmp_path


# ------------------------------------------------------------------ the round trip through files
def test_export_writes_one_row_per_caption_with_relative_paths(world, exported):
    csv_path = exported["train"]
    assert csv_path == csv_path.parent / "train.csv"
    lines = csv_path.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "filepath\ttitle"
    assert len(lines) == 1 + sum(len(cs) for cs in world["train"].captions)
    assert lines[1] == f"images/train/00000.png\t{world['train'].captions[0][0]}"
    pngs = sorted((csv_path.parent / "images" / "train").glob("*.png"))
    assert [p.name for p in pngs] == [f"{i:05d}.png" for i in range(len(world["train"]))]
    # val went to its own image folder, so train's images were not overwritten
    assert len(list((csv_path.parent / "images" / "val").glob("*.png"))) == len(world["val"])


@pytest.mark.parametrize("name", ["train", "val"])
def test_load_back_gives_the_same_bytes_and_grouped_captions(world, exported, name):
    split, pairs = world[name], load_pairs(exported[name], image_size=32)
    assert isinstance(pairs, ImageCaptionSet) and pairs.name == name and len(pairs) == len(split)
    assert pairs.images.dtype == np.uint8 and pairs.images.shape == split.images.shape
    assert np.array_equal(pairs.images, split.images)  # PNG is lossless and the size is unchanged
    assert pairs.captions == split.captions  # rows grouped back per image, in file order
    folder = exported[name].parent
    assert pairs.paths == [folder / "images" / name / f"{i:05d}.png" for i in range(len(split))]
    assert repr(pairs) == f"ImageCaptionSet({name!r}, {len(split)} images of 32x32, {5 * len(split)} captions)"
    torch.testing.assert_close(pairs.image_tensor([2, 0]), split.image_tensor([2, 0]), rtol=0, atol=0)
    assert pairs.image_tensor().shape == (len(split), 3, 32, 32)


def test_read_pairs_csv_lists_rows_in_file_order(world, exported):
    rows = read_pairs_csv(exported["val"])
    folder = exported["val"].parent
    expected = [(folder / "images" / "val" / f"{i:05d}.png", c)
                for i, cs in enumerate(world["val"].captions) for c in cs]
    assert rows == expected


def test_pairs_loader_matches_the_shapes_loader_on_shared_keys(world, exported):
    """Same seed, same caption draw, same tokenizer: the batches agree exactly, over two epochs."""
    pairs, tok = load_pairs(exported["train"], image_size=32), build_tokenizer()
    ours = make_pairs_loader(pairs, tok, batch_size=10, shuffle=True, seed=4)
    theirs = make_loader(world["train"], tok, batch_size=10, shuffle=True, seed=4)
    n_batches = 0
    for _ in range(2):
        for a, b in zip(ours, theirs, strict=True):
            assert set(a) == SHARED_KEYS and SHARED_KEYS <= set(b)
            for key in SHARED_KEYS:
                assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
                assert torch.equal(a[key], b[key]), key
            n_batches += 1
    assert n_batches == 2 * 3
    assert a["image"].shape == (4, 3, 32, 32) and a["image"].dtype == torch.float32
    assert 0 <= a["image"].min() and a["image"].max() <= 1


def test_dataset_items_caption_choice_and_epochs(exported):
    pairs = load_pairs(exported["train"], image_size=32)
    tok = tokenizer_from_captions(c for cs in pairs.captions for c in cs)
    ds = CaptionPairsDataset(pairs, tok, seed=0)
    item = ds[3]
    assert set(item) == {"image", "image_index", "caption_index", "caption_ids"}
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert item["image_index"].shape == () and item["image_index"].dtype == torch.long and int(item["image_index"]) == 3
    ids = item["caption_ids"]
    assert ids.dtype == torch.long and ids[0] == tok.bos_id and ids[-1] == tok.eos_id and tok.unk_id not in ids
    caption = pairs.captions[3][int(item["caption_index"])]
    assert tok.decode(ids) == " ".join(tok.tokenize(caption))
    assert torch.equal(ds[(3, 0)]["caption_ids"], ids)
    drawn = {int(ds[(3, e)]["caption_index"]) for e in range(30)}
    assert len(drawn) > 1 and drawn <= set(range(5))  # epochs draw other captions
    assert all(int(CaptionPairsDataset(pairs, tok, caption="first")[(3, e)]["caption_index"]) == 0 for e in range(5))
    fixed = CaptionPairsDataset(pairs, tok, caption=4)
    assert int(fixed[(3, 7)]["caption_index"]) == 4
    assert tok.decode(fixed[3]["caption_ids"]) == " ".join(tok.tokenize(pairs.captions[3][4]))
    batch = collate([ds[(i, 1)] for i in range(5)])
    assert batch["caption_ids"].shape == batch["caption_mask"].shape and batch["image"].shape == (5, 3, 32, 32)
    with pytest.raises(IndexError, match="index 24 out of range for a set of 24 images"):
        ds[24]


# ------------------------------------------------------------------ the resize rule
def test_resize_48_to_32_matches_antialiased_bicubic(tmp_path):
    """Oracle: torch's bicubic with antialias=True, which follows Pillow's filter; tolerance one 8-bit level,
    since Pillow rounds to 8 bits between its horizontal and vertical passes."""
    y, x = np.mgrid[0:48, 0:48]
    smooth = np.stack([x * 5, y * 5, (x + y) * 2], -1)
    image = load_image(write_png(tmp_path / "s.png", smooth), 32)
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    reference = torch.nn.functional.interpolate(torch.from_numpy(smooth).permute(2, 0, 1)[None].double(),
                                                size=(32, 32), mode="bicubic", antialias=True, align_corners=False)
    reference = reference[0].permute(1, 2, 0).round().clamp(0, 255).numpy()  # (32, 32, 3)
    assert np.abs(image.astype(float) - reference).max() <= 1


def test_non_square_images_are_centre_cropped_not_squashed(tmp_path):
    wide = np.zeros((40, 60, 3), np.uint8)  # (H, W, 3): red | green | blue bands, green is the centred square
    wide[:, :10], wide[:, 10:50], wide[:, 50:] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    out = load_image(write_png(tmp_path / "wide.png", wide), 20)
    assert out.shape == (20, 20, 3) and np.array_equal(out, np.broadcast_to(np.uint8([0, 255, 0]), (20, 20, 3)))
    tall = np.zeros((9, 4, 3), np.uint8)  # odd margin: rows 2..5 are kept ((9 - 4) // 2 = 2 from the top)
    tall[:, :, 0] = np.arange(9)[:, None] * 20
    out = load_image(write_png(tmp_path / "tall.png", tall), 4)
    assert np.array_equal(out[:, 0, 0], [40, 60, 80, 100])


def test_modes_are_converted_to_rgb_and_exif_orientation_is_applied(tmp_path):
    gray = Image.fromarray(np.full((10, 10), 77, np.uint8))  # mode "L"
    gray.save(tmp_path / "gray.png")
    assert np.array_equal(load_image(tmp_path / "gray.png", 10), np.full((10, 10, 3), 77, np.uint8))
    rgba = np.zeros((10, 10, 4), np.uint8)
    rgba[..., 1], rgba[..., 3] = 200, 0  # fully transparent green: alpha is dropped, the colour stays
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    assert np.array_equal(load_image(tmp_path / "rgba.png", 10)[0, 0], [0, 200, 0])
    # 40 wide, 20 high, left half red, right half blue; EXIF orientation 6 = shown rotated 90 degrees clockwise,
    # so the shown image is 20 wide and 40 high, red on top: its centred square is red above blue
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :20], stored[:, 20:] = (255, 0, 0), (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "rotated.png", exif=exif)
    out = load_image(tmp_path / "rotated.png", 20)
    assert np.array_equal(out[:10, :, 0], np.full((10, 20), 255)) and np.array_equal(out[10:, :, 2],
                                                                                      np.full((10, 20), 255))


# ------------------------------------------------------------------ CSV dialects
def test_comma_separated_with_quotes_custom_columns_and_absolute_paths(two_images):
    absolute = two_images / "img" / "b.png"
    with open(two_images / "pairs.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)  # comma-separated; the caption with a comma gets quoted
        writer.writerows([["id", "image", "text"], ["1", "img/a.png", "a red, square patch"],
                          ["2", str(absolute), "blue"], [], ["3", "img/./a.png", "all red"]])
    rows = read_pairs_csv(two_images / "pairs.csv", image_column="image", caption_column="text")
    assert rows == [(two_images / "img" / "a.png", "a red, square patch"), (absolute, "blue"),
                    (two_images / "img" / "a.png", "all red")]
    pairs = load_pairs(two_images / "pairs.csv", 8, name="mine", image_column="image", caption_column="text")
    assert pairs.name == "mine" and pairs.captions == [["a red, square patch", "all red"], ["blue"]]
    assert pairs.images[:, 0, 0].tolist() == [[255, 0, 0], [0, 0, 255]]


def test_tab_separated_is_sniffed_and_separator_can_be_given(two_images, world, tmp_path):
    write_text(two_images / "tab.csv", "\ufefffilepath\ttitle\nimg/a.png\ta red, square patch\nimg/b.png\tblue\n")
    assert [c for _, c in read_pairs_csv(two_images / "tab.csv")] == ["a red, square patch", "blue"]  # BOM ok
    assert read_pairs_csv(two_images / "tab.csv", separator="\t") == read_pairs_csv(two_images / "tab.csv")
    with pytest.raises(ValueError, match=r"has no column 'filepath' \(image_column\); its columns are "
                                         r"\['filepath\\ttitle'\] \(separator ','\)"):
        read_pairs_csv(two_images / "tab.csv", separator=",")
    comma = export_split(world["val"], tmp_path / "comma", name="val", separator=",")
    assert comma.read_text(encoding="utf-8").startswith("filepath,title\n")
    assert load_pairs(comma, 32).captions == world["val"].captions


# ------------------------------------------------------------------ the tokenizer
def test_tokenizer_order_is_by_count_then_alphabetical_and_deterministic():
    captions = ["a red circle", "A blue circle", "a red square?", "zebra"]
    tok = tokenizer_from_captions(captions)
    assert tok.vocab[:7] == list(SPECIALS)
    assert tok.vocab[7:] == ["a", "circle", "red", "?", "blue", "square", "zebra"]
    assert tokenizer_from_captions(reversed(captions)).vocab == tok.vocab
    assert tokenizer_from_captions(captions, min_count=2).vocab[7:] == ["a", "circle", "red"]
    assert Tokenizer.from_texts(captions, min_count=3).vocab[7:] == ["a"]


def test_unseen_words_encode_to_unk_and_special_lookalikes_are_plain_words(two_images):
    tok = tokenizer_from_captions(["a red square", "[UNK] marks a gap"])
    assert "[unk]" in tok.vocab and tok.token_to_id["[unk]"] != tok.unk_id
    write_text(two_images / "val.csv", "filepath\ttitle\nimg/a.png\ta red zebra\n")
    val = load_pairs(two_images / "val.csv", 8)
    ids = CaptionPairsDataset(val, tok)[0]["caption_ids"].tolist()
    a, red = tok.token_to_id["a"], tok.token_to_id["red"]
    assert ids == [tok.bos_id, a, red, tok.unk_id, tok.eos_id]


@pytest.mark.parametrize("captions, kw, error, message", [
    ("a red square", {}, TypeError, "got a single str"),
    ([["a red square"]], {}, TypeError, "got a list at position 0; for per-image lists pass"),
    (["a red", 3], {}, TypeError, "got int at position 1"),
    ([], {}, ValueError, "texts is empty"),
    (["  "], {}, ValueError, r"no word is seen min_count=1 times in 1 texts"),
    (["a b"], {"min_count": 2}, ValueError, r"no word is seen min_count=2 times .*seen 1 times"),
    (["a b"], {"min_count": 0}, ValueError, "min_count must be a positive integer, got 0"),
])
def test_tokenizer_errors(captions, kw, error, message):
    with pytest.raises(error, match=message):
        tokenizer_from_captions(captions, **kw)


def test_tokenizer_refuses_a_word_the_constructor_refuses(monkeypatch):
    monkeypatch.setattr(Tokenizer, "tokenize", staticmethod(lambda text: text.split()))
    with pytest.raises(ValueError, match=r"word '\[PAD\]' of text 1 cannot be a vocabulary word"):
        Tokenizer.from_texts(["a b", "[PAD] b"])


# ------------------------------------------------------------------ errors name the file, row and column
CSV_ERRORS = [
    ("filepath,caption\nimg/a.png,red\n", {}, r"pairs\.csv has no column 'title' \(caption_column\); "
                                              r"its columns are \['filepath', 'caption'\]"),
    ("path\ttitle\nimg/a.png\tred\n", {}, r"has no column 'filepath' \(image_column\); its columns are "
                                          r"\['path', 'title'\]"),
    ("filepath\ttitle\nimg/a.png\tred\nimg/b.png\t \n", {}, r"pairs\.csv, row 2 \(line 3\): empty caption in "
                                                           r"column 'title' \(image 'img/b.png'\)"),
    ("filepath\ttitle\n\nimg/a.png\tred\n\tblue\n", {}, r"row 2 \(line 4\): empty image path in column 'filepath'"),
    ("filepath\ttitle\n", {}, r"pairs\.csv has a header but no rows"),
    ("filepath\ttitle\n\n\n", {}, r"has a header but no rows"),
    ("", {}, r"pairs\.csv has no header on line 1"),
    ("filepath title\nimg/a.png red\n", {}, r"holds neither a tab nor a comma"),
    ("filepath,title\nimg/a.png,a red, round patch\n", {}, r"row 1 \(line 2\) has 3 fields but the header has 2; "
                                                           r"a caption holding the separator ',' must be quoted"),
    ("filepath,title,title\nimg/a.png,red,blue\n", {}, r"column 'title' appears twice"),
    ('filepath,title\nimg/a.png,red\nimg/b.png,"blue\n\n', {}, r"pairs\.csv, record starting on line 3: "
                                                             r"unexpected end of data"),
    ('filepath,title\nimg/a.png,"a ""red"" patch"\nimg/b.png,"blue" x\n', {}, r"record starting on line 3: "
                                                                          r"',' expected after '\"'"),
    ("filepath\ttitle\nimg/a.png\tred\n", {"separator": ";;"}, r"separator must be one character"),
    ("filepath\ttitle\nimg/a.png\tred\n", {"caption_column": "filepath"}, r"both 'filepath'; they must differ"),
]


@pytest.mark.parametrize("text, kw, message", CSV_ERRORS)
def test_csv_errors_name_the_file_row_and_column(two_images, text, kw, message):
    path = write_text(two_images / "pairs.csv", text)
    with pytest.raises(ValueError, match=message):
        read_pairs_csv(path, **kw)
    with pytest.raises(ValueError, match=message):
        load_pairs(path, 8, **kw)


def test_missing_csv_and_undecodable_csv(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"pairs CSV .*nope\.csv does not exist"):
        read_pairs_csv(tmp_path / "nope.csv")
    with pytest.raises(FileNotFoundError, match="is not a file"):
        load_pairs(tmp_path, 8)
    (tmp_path / "latin.csv").write_bytes("filepath\ttitle\na.png\tcaf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin\.csv is not UTF-8 text"):
        read_pairs_csv(tmp_path / "latin.csv")


def test_missing_or_unreadable_image_names_the_row_and_path(two_images):
    (two_images / "img" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    write_text(two_images / "pairs.csv", "filepath\ttitle\nimg/a.png\tred\nimg/a.png\tall red\nimg/c.png\tgone\n")
    with pytest.raises(FileNotFoundError, match=r"pairs\.csv, row 3 \(line 4\): image .*img/c\.png does not exist"):
        load_pairs(two_images / "pairs.csv", 8)
    write_text(two_images / "pairs.csv", "filepath\ttitle\nimg/b.png\tblue\nimg/broken.png\tbad\n")
    with pytest.raises(ValueError, match=r"row 2 \(line 3\): image .*img/broken\.png cannot be read"):
        load_pairs(two_images / "pairs.csv", 8)
    write_text(two_images / "pairs.csv", "filepath\ttitle\nimg\tthe folder\n")
    with pytest.raises(FileNotFoundError, match=r"row 1 \(line 2\): image .*img is not a file"):
        load_pairs(two_images / "pairs.csv", 8)


def test_argument_errors(world, exported, tmp_path):
    pairs, tok = load_pairs(exported["val"], 32), build_tokenizer()
    for size in (0, 32.0, True):
        with pytest.raises(ValueError, match="image_size must be a positive integer"):
            load_pairs(exported["val"], size)
    short = ImageCaptionSet("x", pairs.images[:2], [["one"], ["one", "two"]], pairs.paths[:2])
    with pytest.raises(ValueError, match=r"an index in 0\.\.0 \(image 0, .*00000\.png, has 1\), got 1"):
        CaptionPairsDataset(short, tok, caption=1)
    assert int(CaptionPairsDataset(short, tok, caption=0)[1]["caption_index"]) == 0
    with pytest.raises(TypeError, match="pairs must be a mmlite.data.disk.ImageCaptionSet, got Split"):
        CaptionPairsDataset(world["val"], tok)
    with pytest.raises(TypeError, match="tokenizer must be a mmlite.text.Tokenizer"):
        CaptionPairsDataset(pairs, {"a": 7})
    with pytest.raises(ValueError, match="caption must be 'random', 'first' or an index"):
        ShapesDataset(world["val"], tok, caption="last")  # the same rule as ShapesDataset's
    with pytest.raises(ValueError, match="caption must be 'random', 'first' or an index"):
        CaptionPairsDataset(pairs, tok, caption="last")
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        make_pairs_loader(pairs, tok, batch_size=0, shuffle=False)
    with pytest.raises(ValueError, match=r"captions\[1\] must be a non-empty list of str"):
        ImageCaptionSet("x", pairs.images[:2], [["one"], []], pairs.paths[:2])
    with pytest.raises(ValueError, match=r"images must be a \(N, S, S, 3\) uint8 array, got \(2, 32, 32, 3\) float"):
        ImageCaptionSet("x", pairs.images[:2].astype(np.float32), [["a"], ["b"]], pairs.paths[:2])
    with pytest.raises(TypeError, match="split must be a mmlite.data.Split, got ImageCaptionSet"):
        export_split(pairs, tmp_path)
    with pytest.raises(ValueError, match=re.escape("name must be a file name of letters, digits, '_', '.' or '-'")):
        export_split(world["val"], tmp_path, name="../up")
    with pytest.raises(ValueError, match="split 'test' has no images"):
        export_split(world["test"], tmp_path, name="test")
    with pytest.raises(ValueError, match="separator must be one character"):
        export_split(world["val"], tmp_path, separator="\n")
