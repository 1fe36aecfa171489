"""The word-level tokenizer: fixed specials, round trips on real captions, padding, unknown words, files."""

import json

import pytest
import torch

from mmlite.data import DataConfig, build_tokenizer, generate, vocabulary
from mmlite.text import SPECIALS, Tokenizer


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return build_tokenizer()


@pytest.fixture(scope="module")
def world():
    return generate(DataConfig(n_train=300, n_val=50, n_test=50, n_comp=50), seed=3)


def test_special_ids_are_fixed(tok):
    assert tok.specials == ("[PAD]", "[CLS]", "[SEP]", "[MASK]", "[UNK]", "[BOS]", "[EOS]")
    assert (tok.pad_id, tok.cls_id, tok.sep_id, tok.mask_id, tok.unk_id, tok.bos_id, tok.eos_id) == tuple(range(7))
    assert [tok.token_to_id[s] for s in SPECIALS] == list(range(7))
    assert tok.vocab[7:] == vocabulary() and len(tok) == 7 + len(vocabulary())
    assert all(tok.id_to_token(tok.token_to_id[w]) == w for w in tok.vocab)


def test_tokenize_splits_punctuation_and_lowercases(tok):
    assert tok.tokenize("Is there a Red circle?") == ["is", "there", "a", "red", "circle", "?"]
    assert tok.tokenize("  a red circle,a blue square ?\n") == ["a", "red", "circle", ",", "a", "blue", "square", "?"]
    assert tok.tokenize("") == []


def test_round_trip_on_every_text_of_a_split(tok, world):
    for split in world.values():
        texts = [c for cs in split.captions for c in cs] + [n for ns in split.negatives for n, _ in ns]
        texts += [q for qs in split.questions for q, _, _ in qs]
        for text in texts:
            ids = tok.encode(text, add_bos_eos=True, strict=True)
            assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and tok.unk_id not in ids
            assert tok.decode(ids) == text
            assert tok.decode(torch.tensor(ids)) == text


def test_encode_options(tok):
    plain = tok.encode("a red circle")
    assert plain == [tok.token_to_id[w] for w in ("a", "red", "circle")]
    assert tok.encode("a red circle", add_bos_eos=True) == [tok.bos_id] + plain + [tok.eos_id]
    assert tok.encode("a red circle", add_cls=True) == [tok.cls_id] + plain
    assert tok.encode("a red circle", add_bos_eos=True, add_cls=True) == [tok.cls_id, tok.bos_id] + plain + [tok.eos_id]


def test_unknown_words_map_to_unk_and_strict_names_them(tok):
    ids = tok.encode("a magenta circle near a square")
    assert ids[1] == tok.unk_id and ids[3] == tok.unk_id and ids.count(tok.unk_id) == 2
    with pytest.raises(ValueError, match=r"'magenta' at position 1.*'near' at position 3"):
        tok.encode("a magenta circle near a square", strict=True)


def test_encode_batch_pads_right_with_a_mask(tok):
    texts = ["a red circle", "is there a large blue square ?", "two stars"]
    ids, mask = tok.encode_batch(texts, add_bos_eos=True)
    lengths = [len(tok.encode(t, add_bos_eos=True)) for t in texts]
    assert ids.shape == mask.shape == (3, max(lengths)) and ids.dtype == torch.long and mask.dtype == torch.bool
    assert mask.sum(dim=1).tolist() == lengths
    assert (ids[~mask] == tok.pad_id).all() and (ids[mask] != tok.pad_id).all()
    for b, t in enumerate(texts):
        assert ids[b, : lengths[b]].tolist() == tok.encode(t, add_bos_eos=True)
    short, short_mask = tok.encode_batch(texts, max_len=4, add_bos_eos=True)  # cut silently, [EOS] kept last
    assert short.shape == (3, 4) and short_mask.all() and torch.equal(short[:, :3], ids[:, :3])
    assert (short[:, 3] == tok.eos_id).all()
    plain, _ = tok.encode_batch(texts, max_len=4)  # without [BOS]/[EOS] the cut is a plain prefix
    torch.testing.assert_close(plain, tok.encode_batch(texts)[0][:, :4], rtol=0, atol=0)
    wide, wide_mask = tok.encode_batch(texts, max_len=20)
    assert wide.shape == (3, 20) and wide_mask.sum().item() == sum(len(tok.encode(t)) for t in texts)
    with pytest.raises(TypeError, match="single str"):
        tok.encode_batch("a red circle")
    with pytest.raises(ValueError, match="max_len"):
        tok.encode_batch(texts, max_len=0)


def test_decode_skips_specials_and_stops_at_eos(tok):
    ids = [tok.cls_id, tok.bos_id] + tok.encode("a red circle") + [tok.eos_id] + tok.encode("blue") + [tok.pad_id]
    assert tok.decode(ids) == "a red circle"
    assert tok.decode(ids, skip_special=False) == "[CLS] [BOS] a red circle [EOS] blue [PAD]"
    with pytest.raises(ValueError, match="1-D"):
        tok.decode(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([len(tok)])


def test_save_and_load(tok, tmp_path):
    tok.save(tmp_path / "tok.json")
    again = Tokenizer.load(tmp_path / "tok.json")
    assert again.vocab == tok.vocab and again.token_to_id == tok.token_to_id
    (tmp_path / "bad.json").write_text(json.dumps({"specials": ["[PAD]"], "words": ["a"]}))
    with pytest.raises(ValueError, match="specials"):
        Tokenizer.load(tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="broken.json"):
        Tokenizer.load(tmp_path / "broken.json")


def test_bad_vocabularies_are_refused():
    with pytest.raises(ValueError, match="duplicate word 'red'"):
        Tokenizer(["red", "blue", "red"])
    with pytest.raises(ValueError, match=r"\[MASK\].*clashes"):
        Tokenizer(["red", "[MASK]"])
    with pytest.raises(ValueError, match="single lower-case token"):
        Tokenizer(["left of"])
    with pytest.raises(TypeError, match="strings"):
        Tokenizer(["red", 3])


def test_truncation_keeps_eos_last(tok):
    long = "two blue squares left of a large red circle"
    full = tok.encode(long, add_bos_eos=True)
    for max_len in (2, 3, 6, len(full) - 1):
        ids, mask = tok.encode_batch([long, "a star"], max_len=max_len, add_bos_eos=True)
        assert ids.shape == (2, max_len) and mask[0].all()
        assert ids[0].tolist() == full[:max_len - 1] + [tok.eos_id], max_len  # the words that fit, then [EOS]
    ids, _ = tok.encode_batch([long], max_len=len(full), add_bos_eos=True)  # fits: unchanged
    assert ids[0].tolist() == full
    ids, _ = tok.encode_batch([long], max_len=4, add_bos_eos=True, add_cls=True)
    assert ids[0].tolist() == [tok.cls_id, tok.bos_id, full[1], tok.eos_id]
    with pytest.raises(ValueError, match=r"max_len=1 cannot hold \[BOS\] and \[EOS\]"):
        tok.encode_batch([long], max_len=1, add_bos_eos=True)
    with pytest.raises(ValueError, match=r"max_len=2 cannot hold \[CLS\], \[BOS\] and \[EOS\]"):
        tok.encode_batch([long], max_len=2, add_bos_eos=True, add_cls=True)


def test_empty_text_gives_an_empty_sequence(tok):
    ids, mask = tok.encode_batch([""])
    assert ids.shape == mask.shape == (1, 0)
    ids, mask = tok.encode_batch(["", "a star"], add_bos_eos=True)
    assert ids[0].tolist() == [tok.bos_id, tok.eos_id, tok.pad_id, tok.pad_id]


def test_decode_refuses_non_integer_ids(tok):
    with pytest.raises(TypeError, match="integer tensor, got dtype torch.float32"):
        tok.decode(torch.tensor([8.0, 9.7]))
    with pytest.raises(TypeError, match="token id must be an integer, got float 8.9"):
        tok.decode([8.9, 9])
    with pytest.raises(TypeError, match="got a str"):
        tok.decode("8 9")
    with pytest.raises(TypeError, match="token id must be an integer"):
        tok.id_to_token(7.0)
    assert tok.decode(torch.tensor([8, 9], dtype=torch.int32)) == tok.decode([8, 9])  # any integer dtype
    assert tok.id_to_token(torch.tensor(8)) == tok.vocab[8]


def test_vocabulary_must_be_a_list_of_words(tmp_path):
    with pytest.raises(TypeError, match="got a single str 'abc'"):
        Tokenizer("abc")  # not three one-letter words
    with pytest.raises(TypeError, match="iterable of str, got int"):
        Tokenizer(5)
    for name, words in (("five.json", 5), ("letters.json", "abc"), ("mixed.json", ["a", 3])):
        (tmp_path / name).write_text(json.dumps({"specials": list(SPECIALS), "words": words}))
        with pytest.raises(ValueError, match=rf"{name}: 'words' must be a list of strings"):
            Tokenizer.load(tmp_path / name)
    (tmp_path / "dup.json").write_text(json.dumps({"specials": list(SPECIALS), "words": ["a", "a"]}))
    with pytest.raises(ValueError, match="dup.json: duplicate word 'a'"):
        Tokenizer.load(tmp_path / "dup.json")
    (tmp_path / "specials.json").write_text(json.dumps({"specials": 5, "words": []}))
    with pytest.raises(ValueError, match="specials.json has specials 5"):
        Tokenizer.load(tmp_path / "specials.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="list.json is not a saved Tokenizer"):
        Tokenizer.load(tmp_path / "list.json")
