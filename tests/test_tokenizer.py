"""Tokenizer: round trips on arbitrary text, specials never from text, save/load, token_bytes, errors."""

import random

import pytest
import rustbpe
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from chatforge.errors import ChatforgeError, DataError, UsageError
from chatforge.tokenizer import (
    MIN_VOCAB_SIZE, SPECIAL_TOKENS, SPLIT_PATTERN, TOKEN_BYTES_FILE, TOKENIZER_FILE, Tokenizer,
    load_token_bytes, load_tokenizer, utf8_safe,
)

WORDS = ("the of and a to in is was for on that with as by at from his her it an were are which "
         "this be or has had one first new two after who they have their she been also its but "
         "def return import class self None print numpy tensor 0.5 1024 3.14159 x**2 == != <= >= "
         "naïve café über déjà año 東京 北京 Привет мир 😀 🚀 ").split()


def make_corpus(n_docs: int = 300, seed: int = 0) -> list[str]:
    """A few hundred KB of word salad with digits, code and non-Latin scripts, seeded."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        words = [rng.choice(WORDS) if rng.random() < 0.9 else str(rng.randrange(10**6)) for _ in range(200)]
        docs.append(" ".join(words) + ".\n\n    indent\tend\n")
    return docs


@pytest.fixture(scope="module")
def corpus():
    return make_corpus()


@pytest.fixture(scope="module")
def tok(corpus):
    return Tokenizer.train(iter(corpus), 512)


def test_vocab_layout(tok):
    assert tok.vocab_size == 512
    assert [tok.special_id(name) for name in SPECIAL_TOKENS] == list(range(503, 512))
    assert tok.bos_id == 503
    assert tok.is_special(503) and not tok.is_special(502)
    with pytest.raises(ValueError, match="unknown special token"):
        tok.special_id("<|eos|>")


def test_matches_rustbpe_encoding(tok, corpus):
    # Reference computed another way: rustbpe's own encoder, trained on the same texts.
    reference = rustbpe.Tokenizer()
    reference.train_from_iterator(iter(corpus), 512 - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN)
    for doc in corpus[:20] + ["Numbers 1234567 and 12.5", "  spaces\n\n\nand tabs\t\t"]:
        assert tok.encode(doc) == reference.encode(doc)


def test_numbers_split_in_groups_of_two(tok):
    pieces = [tok.decode([i]) for i in tok.encode("1234567")]
    assert all(len(p) <= 2 for p in pieces)
    assert "".join(pieces) == "1234567"


def test_merges_compress(tok, corpus):
    text = corpus[0]
    assert len(tok.encode(text)) < len(text.encode("utf-8")) / 2


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=()), max_size=80))
def test_round_trip_arbitrary_text(tok, text):
    # Any str, including emoji and lone surrogates: decode(encode(s)) is s with lone surrogates -> U+FFFD.
    ids = tok.encode(text)
    assert tok.decode(ids) == utf8_safe(text)
    assert not any(tok.is_special(i) for i in ids)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=511), max_size=30))
def test_decode_any_ids(tok, ids):
    # Any id sequence decodes (a cut UTF-8 character becomes U+FFFD), also from a tensor.
    text = tok.decode(ids)
    assert isinstance(text, str)
    assert tok.decode(torch.tensor(ids, dtype=torch.long)) == text


def test_lone_surrogates_become_replacement_char(tok):
    assert utf8_safe("a\ud800b") == "a\ufffdb"
    assert tok.decode(tok.encode("a\udcffb")) == "a\ufffdb"
    assert utf8_safe("\ud83d\ude00") == "😀"  # a surrogate pair written as two code points


def test_specials_never_from_text(tok):
    text = "".join(SPECIAL_TOKENS) + " <|bos|>hello<|assistant_end|>"
    ids = tok.encode(text)
    assert not any(tok.is_special(i) for i in ids)
    assert tok.decode(ids) == text
    for row in tok.encode_batch([text, "<|user_start|>"]):
        assert not any(tok.is_special(i) for i in row)


def test_prepend_append(tok):
    plain = tok.encode("hi there")
    assert tok.encode("hi there", prepend="<|bos|>") == [tok.bos_id] + plain
    assert tok.encode("hi there", prepend=tok.bos_id, append="<|assistant_end|>") == (
        [tok.bos_id] + plain + [tok.special_id("<|assistant_end|>")])
    assert tok.decode([tok.bos_id] + plain) == "<|bos|>hi there"
    with pytest.raises(ValueError):
        tok.encode("x", prepend=10**6)


def test_encode_batch_equals_encode(tok, corpus):
    texts = corpus[:40] + ["", "😀", "a\ud800"]
    for threads in (1, 2):
        assert tok.encode_batch(texts, num_threads=threads) == [tok.encode(t) for t in texts]
    assert tok.encode_batch(texts[:3], prepend="<|bos|>") == [tok.encode(t, prepend="<|bos|>") for t in texts[:3]]
    with pytest.raises(TypeError):
        tok.encode_batch("not a list")


def test_token_bytes_consistent_with_decode(tok, corpus):
    table = tok.token_bytes()
    assert table.dtype == torch.int32 and table.shape == (tok.vocab_size,)
    for i in range(tok.vocab_size):
        expected = 0 if tok.is_special(i) else len(tok.id_to_bytes(i))
        assert table[i].item() == expected
    for text in corpus[:5] + ["naïve 東京 😀"]:
        ids = tok.encode(text, prepend="<|bos|>")
        assert table[torch.tensor(ids)].sum().item() == len(text.encode("utf-8"))


def test_save_load_round_trip(tok, corpus, tmp_path):
    tok.save(tmp_path)
    again = Tokenizer.load(tmp_path)
    assert again.vocab_size == tok.vocab_size
    assert again.mergeable_ranks == tok.mergeable_ranks
    assert again.encode_batch(corpus[:20]) == tok.encode_batch(corpus[:20])
    assert torch.equal(load_token_bytes(tmp_path), tok.token_bytes())
    assert not list(tmp_path.glob("*.tmp"))


def test_load_tokenizer_default_dir(tok, chatforge_home):
    tok.save(chatforge_home / "tokenizer")
    assert load_tokenizer().encode("hello") == tok.encode("hello")
    assert load_token_bytes().shape == (tok.vocab_size,)


def test_missing_tokenizer_says_how_to_fix(chatforge_home):
    with pytest.raises(DataError, match=r"tokenizer.*chatforge tokenizer train"):
        load_tokenizer()
    with pytest.raises(DataError, match="chatforge tokenizer train"):
        load_token_bytes()


def test_truncated_or_corrupt_file_is_named(tok, tmp_path):
    tok.save(tmp_path)
    path = tmp_path / TOKENIZER_FILE
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=f"{path}.*corrupt or truncated"):
        Tokenizer.load(tmp_path)
    path.write_text('{"format": "something-else"}')
    with pytest.raises(DataError, match=str(path)):
        Tokenizer.load(tmp_path)
    table = tmp_path / TOKEN_BYTES_FILE
    table.write_bytes(table.read_bytes()[:20])
    with pytest.raises(DataError, match=str(table)):
        load_token_bytes(tmp_path)


@pytest.mark.parametrize("size", [0, 256, MIN_VOCAB_SIZE - 1, 2**17 + 1])
def test_vocab_size_out_of_range(size):
    with pytest.raises(UsageError, match="--vocab-size"):
        Tokenizer.train(iter(["some text"]), size)


def test_smallest_vocab_is_bytes_plus_specials():
    tok = Tokenizer.train(iter(["abc abc abc"]), MIN_VOCAB_SIZE)
    assert tok.vocab_size == MIN_VOCAB_SIZE
    assert tok.decode(tok.encode("abc 😀")) == "abc 😀"


def test_empty_corpus_is_an_error():
    with pytest.raises(ChatforgeError, match="empty"):
        Tokenizer.train(iter(["", ""]), 300)


def test_small_corpus_gives_smaller_vocab(capsys):
    tok = Tokenizer.train(iter(["ab ab ab"]), 1000)
    assert MIN_VOCAB_SIZE < tok.vocab_size < 1000
    assert tok.bos_id == tok.vocab_size - len(SPECIAL_TOKENS)
    assert "fewer than" in capsys.readouterr().out


def test_training_tolerates_lone_surrogates():
    tok = Tokenizer.train(iter(["bad \udc80 bytes here " * 20]), 300)
    assert tok.decode(tok.encode("bytes \udc80")) == "bytes \ufffd"
