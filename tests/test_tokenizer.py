"""tokenizer.py: both kinds round-trip, kind detection by content, LLaMA-3 special ids,
special-token strings stay plain text, and a missing tiktoken encoding fails offline."""

import base64
import os
import socket

import pytest
import sentencepiece as spm

import tokenizer as tokenizer_module
from tests.helpers import SAMPLES, TEXTS
from tokenizer import LLAMA3_SPECIAL_TOKENS, Tokenizer, tiktoken_cache_path, train_sentencepiece

MERGES = [b"ab", b"cd", b"abcd", b"  ", b"in", b"ing"]  # each made of two earlier tokens


def write_tiktoken_file(path, merges=MERGES):
    """A tiktoken BPE file: the 256 byte tokens (ranks 0..255), then merges."""
    tokens = [bytes([i]) for i in range(256)] + merges
    with open(path, "wb") as f:
        for rank, token in enumerate(tokens):
            f.write(base64.b64encode(token) + b" " + str(rank).encode() + b"\n")
    return str(path)


@pytest.fixture(scope="module")
def sp_path(tmp_path_factory):
    return train_sentencepiece(TEXTS, str(tmp_path_factory.mktemp("sp") / "sp"), vocab_size=400)


def test_sentencepiece_round_trip(sp_path):
    tok = Tokenizer(sp_path)
    assert tok.kind == "sentencepiece"
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3)
    assert 256 + 4 < tok.n_words <= 400  # byte fallback pieces + specials + learned pieces
    for text in SAMPLES:
        ids = tok.encode(text, bos=True, eos=True)
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
        assert all(0 <= i < tok.n_words for i in ids)
        assert tok.decode(ids) == text
        assert tok.decode(ids + [tok.pad_id] * 3) == text  # padding is dropped too
    assert tok.encode("", bos=False, eos=False) == []
    # special strings in text are plain text, never the control ids
    ids = tok.encode("<s></s><pad>", bos=False, eos=False)
    assert not {tok.bos_id, tok.eos_id, tok.pad_id} & set(ids)
    # split_digits: every digit is its own piece
    assert len(tok.encode("1234567890", bos=False, eos=False)) == 10


def test_train_sentencepiece_deterministic(sp_path, tmp_path):
    again = train_sentencepiece(TEXTS, str(tmp_path / "again"), vocab_size=400)
    assert open(again, "rb").read() == open(sp_path, "rb").read()
    # a text file (one sentence per line) gives a model too
    (tmp_path / "corpus.txt").write_text("\n".join(t.replace("\n", " ") for t in TEXTS) + "\n")
    model = train_sentencepiece(str(tmp_path / "corpus.txt"), str(tmp_path / "file"), vocab_size=400)
    with pytest.raises(ValueError, match="smaller than required"):
        train_sentencepiece(TEXTS, str(tmp_path / "small"), vocab_size=100)
    assert Tokenizer(model).decode(Tokenizer(model).encode("brown fox 42")) == "brown fox 42"


def test_sentencepiece_without_pad_pads_with_eos(tmp_path):
    # Meta's tokenizer.model has no pad piece (pad_id -1)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXTS), model_prefix=str(tmp_path / "meta"),
                                   vocab_size=80, pad_id=-1, hard_vocab_limit=False, minloglevel=2)
    tok = Tokenizer(str(tmp_path / "meta.model"))
    assert tok.pad_id == tok.eos_id == 2 and tok.bos_id == 1


def test_tiktoken_file_round_trip_and_specials(tmp_path):
    path = write_tiktoken_file(tmp_path / "tokenizer.model")  # LLaMA-3's file name: detected by content
    tok = Tokenizer(path)
    n_base = 256 + len(MERGES)
    assert tok.kind == "tiktoken"
    assert len(LLAMA3_SPECIAL_TOKENS) == 256
    assert tok.n_words == n_base + 256
    # ids as in Meta's llama3 tokenizer.py (128000, 128001, 128004, 128006, 128009 for LLaMA-3)
    assert tok.bos_id == n_base + 0 and tok.eos_id == n_base + 1 and tok.pad_id == n_base + 4
    assert tok.special_tokens["<|start_header_id|>"] == n_base + 6
    assert tok.special_tokens["<|eot_id|>"] == n_base + 9
    assert tok.special_tokens["<|reserved_special_token_5|>"] == n_base + 10
    assert tok.special_tokens["<|reserved_special_token_250|>"] == n_base + 255
    assert tok.encode("abcd", bos=False, eos=False) == [256 + 2]  # merges applied: "abcd" is one token
    assert tok.encode("ing", bos=False, eos=False) == [256 + 5]
    for text in SAMPLES:
        ids = tok.encode(text, bos=True, eos=True)
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
        assert tok.decode(ids + [tok.pad_id]) == text
    # special-token strings inside ordinary text are encoded as plain text
    text = "<|begin_of_text|>x<|end_of_text|><|eot_id|>"
    ids = tok.encode(text, bos=False, eos=False)
    assert all(i < n_base for i in ids)
    assert tok.decode(ids) == text
    # other specials are decoded as their strings; bos/eos/pad are dropped
    assert tok.decode([tok.bos_id, tok.special_tokens["<|eot_id|>"], tok.eos_id]) == "<|eot_id|>"
    # long runs without whitespace (tiktoken's regex limit) still encode
    assert tok.decode(tok.encode("a" * 100_000)) == "a" * 100_000


def test_kind_by_content_not_name(sp_path, tmp_path):
    sp_named_tiktoken = tmp_path / "cl100k.tiktoken"
    sp_named_tiktoken.write_bytes(open(sp_path, "rb").read())
    assert Tokenizer(str(sp_named_tiktoken)).kind == "sentencepiece"
    assert Tokenizer(write_tiktoken_file(tmp_path / "x.model")).kind == "tiktoken"


def test_bad_tokenizer_files(tmp_path):
    path = tmp_path / "empty.model"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        Tokenizer(str(path))
    path = tmp_path / "garbage.model"
    path.write_bytes(b"this is not a tokenizer\n" * 10)
    with pytest.raises(ValueError, match="neither a sentencepiece model nor a tiktoken"):
        Tokenizer(str(path))
    # a tiktoken file broken after its first lines: the error names file and line
    good = write_tiktoken_file(tmp_path / "broken.model")
    with open(good, "ab") as f:
        f.write(b"not-base64!! x\n")
    with pytest.raises(ValueError, match=r"broken.model:263: not a tiktoken BPE line"):
        Tokenizer(good)
    with pytest.raises(FileNotFoundError, match="no such file"):
        Tokenizer(str(tmp_path / "missing.model"))


def test_missing_encoding_name_fails_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))

    def no_network(*args, **kwargs):
        raise AssertionError("network access attempted")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    import tiktoken.load
    monkeypatch.setattr(tiktoken.load, "read_file", no_network)
    url = tokenizer_module.TIKTOKEN_BLOBS["cl100k_base"][0][0]
    with pytest.raises(FileNotFoundError) as e:
        Tokenizer("cl100k_base")
    message = str(e.value)
    assert "\n" not in message and "not available offline" in message
    assert tiktoken_cache_path(url) in message and url in message
    assert tiktoken_cache_path(url).startswith(str(tmp_path))
    # a cached file with the wrong content is refused (tiktoken would delete it and download)
    with open(tiktoken_cache_path(url), "wb") as f:
        f.write(b"stale")
    with pytest.raises(ValueError, match="does not match the sha256"):
        Tokenizer("cl100k_base")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    with pytest.raises(FileNotFoundError, match="caching is disabled"):
        Tokenizer("cl100k_base")
    assert not os.path.exists("cl100k_base")
