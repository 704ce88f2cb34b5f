"""Token cache: built once, read through memmaps, and giving PackedLoader the very same batches."""

import json

import numpy as np
import pytest
import torch

from chatforge.data.corpus import open_corpus
from chatforge.data.loader import PackedLoader
from chatforge.data.shards import TokenCache, build_token_cache
from chatforge.errors import DataError
from chatforge.tokenizer import Tokenizer
from tests.test_loader import make_texts, take, write_jsonl


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train(iter(make_texts(200, seed=1)), 300)


def test_cache_holds_the_tokens_and_the_loader_gives_identical_batches(tmp_path, tokenizer):
    texts = make_texts(90, seed=11, max_words=150)
    corpus = open_corpus(write_jsonl(tmp_path / "docs.jsonl", texts))
    cache = build_token_cache(corpus, tokenizer, tmp_path / "cache")
    meta = json.loads((tmp_path / "cache" / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["splits"]["val"]["documents"] == 4
    docs = list(cache.iter_token_docs("train", rank=1, world_size=2, start=10))
    train = [t for i, t in enumerate(texts) if i % 20 != 19]
    assert [i for i, _ in docs] == [i for i in range(10, len(train)) if i % 2 == 1]
    for i, toks in docs:
        assert toks.tolist() == tokenizer.encode(train[i], prepend="<|bos|>")
    kwargs = dict(batch_size=2, seq_len=32, buffer_docs=5, rank=1, world_size=2)
    from_text = PackedLoader(corpus, tokenizer, **kwargs)
    from_cache = PackedLoader(cache, tokenizer, **kwargs)
    a, b = take(from_text, 15), take(from_cache, 10)
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))
    resumed = take(PackedLoader(cache, tokenizer, state=from_cache.state_dict(), **kwargs), 5)
    assert all(torch.equal(x[0], y[0]) for x, y in zip(a[10:], resumed))
    from_text.close()
    from_cache.close()


def test_cache_from_another_tokenizer_is_refused(tmp_path, tokenizer):
    corpus = open_corpus(write_jsonl(tmp_path / "docs.jsonl", make_texts(30)))
    build_token_cache(corpus, tokenizer, tmp_path / "cache", splits=("train",))
    other = Tokenizer.train(iter(make_texts(50, seed=9)), 280)
    with pytest.raises(DataError, match="built with another tokenizer"):
        TokenCache(tmp_path / "cache", other)
    with pytest.raises(DataError, match="no 'val' split"):
        list(TokenCache(tmp_path / "cache").iter_token_docs("val"))
    assert not (tmp_path / "cache.tmp").exists()
    assert np.fromfile(tmp_path / "cache" / "train.bin", dtype=np.uint16)[0] == tokenizer.bos_id
