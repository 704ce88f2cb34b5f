"""PackedLoader: bos-aligned best-fit rows, every document token used exactly once, rank sharding, exact resume."""

import itertools
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from chatforge.data.corpus import open_corpus
from chatforge.data.loader import PackedLoader, RowPacker
from chatforge.errors import DataError, UsageError
from chatforge.tokenizer import Tokenizer

WORDS = ["alpha", "beta", "gamma", "delta", "river", "stone", "light", "music", "north", "quiet", "seven",
         "tiger", "paper", "cloud", "ember", "frost", "grove", "harbor", "ivory", "jungle"]


def make_texts(n, seed=0, max_words=120):
    rng = random.Random(seed)
    texts = []
    for k in range(n):
        length = rng.choice([3, 8, 20, 40, max_words]) + rng.randrange(5)
        texts.append(f"doc{k} " + " ".join(rng.choice(WORDS) for _ in range(length)) + f" end{k}.")
    return texts


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train(iter(make_texts(200, seed=1)), 300)


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def split_at_bos(row, bos):
    starts = [i for i, t in enumerate(row) if t == bos]
    assert starts and starts[0] == 0, "every row starts with <|bos|>"
    return [row[a:b] for a, b in zip(starts, starts[1:] + [len(row)])]


def reconstruct(rows, bos, expected):
    """Documents from rows: a row's first segment continues the previous row's last one when that one
    is not yet a whole document (no test document is a token-prefix of another)."""
    done, current = [], None
    for row in rows:
        for k, seg in enumerate(split_at_bos(list(row), bos)):
            if k == 0 and current is not None and tuple(current) not in expected:
                current = current + seg[1:]
                continue
            if current is not None:
                done.append(tuple(current))
            current = seg
    return done, current


def rows_of(batches):
    return [torch.cat([x, y[:, -1:]], dim=1) for x, y in batches]


def test_row_packer_uses_every_token_exactly_once():
    rng = random.Random(3)
    bos = 0
    # a distinct second token per document: no document is a prefix of another
    docs = [[bos, 1000 + i] + [rng.randrange(1, 1000) for _ in range(rng.choice([0, 5, 17, 30, 95, 250]))]
            for i in range(300)]
    packer = RowPacker(row_len=33, bos_id=bos)
    rows = []
    pending = list(enumerate(docs))
    while pending or not packer.empty():
        while pending and len(packer) < 16:
            i, d = pending.pop(0)
            packer.add((0, i), np.array(d))
        row, filled = packer.next_row()
        rows.append(row[:filled])
        assert filled == 33 or (not pending and packer.empty())
    done, last = reconstruct(rows, bos, {tuple(d) for d in docs})
    assert sorted(done + [tuple(last)]) == sorted(tuple(d) for d in docs)
    assert sum(map(len, rows)) == sum(map(len, docs)) + packer.splits


def test_rows_are_bos_aligned_packed_and_reconstruct_the_documents(tmp_path, tokenizer):
    texts = make_texts(120, seed=2)
    corpus = open_corpus(write_jsonl(tmp_path / "docs.jsonl", texts))
    expected = [tuple(tokenizer.encode(t, prepend="<|bos|>")) for i, t in enumerate(texts) if i % 20 != 19]
    assert len(set(expected)) == len(expected)
    loader = PackedLoader(corpus, tokenizer, batch_size=2, seq_len=48, loop=False, buffer_docs=8,
                          tokenize_batch=7)
    batches = list(loader)
    for x, y in batches:
        assert x.shape == y.shape == (2, 48) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])
    rows = [r for b in rows_of(batches) for r in b.tolist()]
    assert all(r[0] == tokenizer.bos_id for r in rows)
    done, last = reconstruct(rows, tokenizer.bos_id, set(expected))
    assert len(done) == len(set(done)) and set(done) <= set(expected)  # nothing duplicated or invented
    stats = loader.stats()
    # tokens of the documents + one bos per split = tokens in rows + tokens of the unfinished last rows
    assert stats["tokens_used"] == sum(map(len, rows)) == len(rows) * 49
    assert stats["tokens_used"] + stats["tokens_dropped"] == sum(map(len, expected)) + stats["splits"]
    assert stats["documents"] == len(expected)
    assert stats["splits"] > 0 and stats["tokens_dropped"] < 2 * 49  # only the unfinished last batch


def test_long_documents_are_split_into_row_pieces_not_cropped(tmp_path, tokenizer):
    texts = make_texts(40, seed=4, max_words=400)
    corpus = open_corpus(write_jsonl(tmp_path / "docs.jsonl", texts))
    expected = {tuple(tokenizer.encode(t, prepend="<|bos|>")) for i, t in enumerate(texts) if i % 20 != 19}
    assert max(map(len, expected)) > 3 * 33
    loader = PackedLoader(corpus, tokenizer, batch_size=1, seq_len=32, loop=False, buffer_docs=4)
    rows = [r for b in rows_of(list(loader)) for r in b.tolist()]
    done, _ = reconstruct(rows, tokenizer.bos_id, expected)
    assert max(map(len, done)) > 3 * 33 and set(done) <= expected
    assert loader.stats()["tokens_dropped"] < 33


def test_two_ranks_cover_every_document_exactly_once(tmp_path, tokenizer):
    texts = make_texts(81, seed=5)
    corpus = open_corpus(write_jsonl(tmp_path / "docs.jsonl", texts))
    seen = []
    for rank in range(2):
        docs = list(corpus.iter_documents("train", rank, 2))
        seen += docs
        loader = PackedLoader(corpus, tokenizer, batch_size=1, seq_len=16, rank=rank, world_size=2, loop=False)
        list(loader)
        assert loader.stats()["documents"] == len(docs)
    train = [t for i, t in enumerate(texts) if i % 20 != 19]
    assert sorted(seen) == sorted(train)
    val = list(corpus.iter_documents("val"))
    assert val == [texts[19], texts[39], texts[59], texts[79]]


def take(loader, n):
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            break
    return out


@pytest.mark.parametrize("k", [1, 5, 13])
def test_resume_from_state_gives_the_same_next_batches(tmp_path, tokenizer, k):
    texts = make_texts(60, seed=6, max_words=200)
    corpus = open_corpus(write_jsonl(tmp_path / "docs.jsonl", texts))
    kwargs = dict(batch_size=3, seq_len=40, buffer_docs=6, tokenize_batch=5)
    reference = take(PackedLoader(corpus, tokenizer, **kwargs), k + 12)  # > one epoch: resume across it
    first = PackedLoader(corpus, tokenizer, **kwargs)
    take(first, k)
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint's meta.json stores it
    first.close()
    resumed = take(PackedLoader(corpus, tokenizer, state=state, **kwargs), 12)
    for (x0, y0), (x1, y1) in zip(reference[k:], resumed):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)
    assert len(resumed) == 12 and len(reference) == k + 12
    assert state["buffer"], "the saved state holds a non-empty packing buffer"


def test_val_pass_ends_and_can_be_repeated(tmp_path, tokenizer):
    corpus = open_corpus(write_jsonl(tmp_path / "docs.jsonl", make_texts(200, seed=7)))
    loader = PackedLoader(corpus, tokenizer, batch_size=2, seq_len=16, split="val", loop=False)
    first = list(loader)
    second = list(loader)
    assert len(first) == len(second) > 0
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, second))


def test_bad_state_and_empty_split_are_clear_errors(tmp_path, tokenizer):
    corpus = open_corpus(write_jsonl(tmp_path / "docs.jsonl", make_texts(30, seed=8)))
    loader = PackedLoader(corpus, tokenizer, batch_size=1, seq_len=16)
    take(loader, 2)
    state = loader.state_dict()
    loader.close()
    with pytest.raises(UsageError, match="world_size=1 but this run has 2"):
        PackedLoader(corpus, tokenizer, batch_size=1, seq_len=16, rank=0, world_size=2, state=state)
    few = open_corpus(write_jsonl(tmp_path / "few.jsonl", make_texts(3)))
    with pytest.raises(DataError, match="val split has no documents for rank 0 of 1"):
        list(PackedLoader(few, tokenizer, batch_size=1, seq_len=16, split="val"))


def test_pad_last_measures_a_val_split_smaller_than_one_batch(tmp_path, tokenizer):
    corpus = open_corpus(write_jsonl(tmp_path / "docs.jsonl", make_texts(100, seed=9)))
    docs = [tokenizer.encode(t, prepend="<|bos|>") for t in corpus.iter_documents("val")]
    kwargs = dict(batch_size=16, seq_len=32, split="val", loop=False)
    assert sum(map(len, docs)) < 16 * 33  # fewer tokens than one batch holds
    # the bug: a finite pass yields only full batches, so this split gave none (and a NaN val loss)
    assert list(PackedLoader(corpus, tokenizer, **kwargs)) == []
    loader = PackedLoader(corpus, tokenizer, pad_last=True, **kwargs)
    [(x, y)] = list(loader)
    assert x.shape == y.shape == (16, 32)
    stats = loader.stats()
    assert stats["tokens_used"] == sum(map(len, docs)) + stats["splits"] and stats["tokens_dropped"] == 0
    # every row's real tokens, then bos inputs with ignored targets; each real token after a row's
    # first is a target exactly once
    assert int((y != -1).sum()) == stats["tokens_used"] - stats["rows"]
    rows = []
    for r in range(stats["rows"]):
        n = int((y[r] != -1).sum())
        assert n > 0 and torch.equal(x[r, 1:n], y[r, :n - 1])
        assert (x[r, n + 1:] == tokenizer.bos_id).all() and (y[r, n:] == -1).all()
        rows.append([int(x[r, 0])] + y[r, :n].tolist())
    assert (y[stats["rows"]:] == -1).all()
    done, last = reconstruct(rows, tokenizer.bos_id, {tuple(d) for d in docs})
    assert sorted(done + [tuple(last)]) == sorted(tuple(d) for d in docs)


def test_pad_last_keeps_full_batches_and_pads_only_the_rest(tmp_path, tokenizer):
    corpus = open_corpus(write_jsonl(tmp_path / "docs.jsonl", make_texts(200, seed=10)))
    kwargs = dict(batch_size=3, seq_len=16, split="val", loop=False)
    plain_loader = PackedLoader(corpus, tokenizer, **kwargs)
    plain = list(plain_loader)
    assert plain_loader.stats()["tokens_dropped"] > 0  # rows left over: the unfinished last batch
    loader = PackedLoader(corpus, tokenizer, pad_last=True, **kwargs)
    padded = list(loader)
    assert len(padded) == len(plain) + 1 and loader.stats()["tokens_dropped"] == 0
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(plain, padded))
    docs = [tokenizer.encode(t, prepend="<|bos|>") for t in corpus.iter_documents("val")]
    assert loader.stats()["tokens_used"] == sum(map(len, docs)) + loader.stats()["splits"]
    with pytest.raises(ValueError, match="finite pass"):
        PackedLoader(corpus, tokenizer, batch_size=2, seq_len=16, pad_last=True)


class BusyCorpus:
    """Endless documents whose reading keeps the thread inside torch's C++ code (GIL released),
    where a daemon thread killed by interpreter exit aborts the process."""

    description = "busy corpus"

    def iter_indexed(self, split, rank=0, world_size=1, start=0):
        a = torch.ones(256, 256)
        for i in itertools.count(start):
            for _ in range(0 if i < 8 else 20):  # the first batch comes quickly, then the thread is busy
                a = (a @ a).clamp_(max=1.0)
            yield i, f"doc {i} alpha beta gamma delta river stone"


def test_close_stops_and_joins_the_background_threads(tokenizer):
    loader = PackedLoader(BusyCorpus(), tokenizer, batch_size=2, seq_len=16, buffer_docs=4, tokenize_batch=4)
    with loader:
        batches = iter(loader)  # held: a dropped iterator stops its threads itself, racing the check below
        next(batches)
        threads = [w.thread for w in loader._workers]
        assert {t.name for t in threads} == {"pack", "tokenize"} and all(t.is_alive() for t in threads)
    assert not any(t.is_alive() for t in threads)
    assert loader._workers == []


EXIT_SCRIPT = """
import sys
sys.path[:0] = [{repo!r}, {tests!r}]
from chatforge.data.loader import PackedLoader
from chatforge.tokenizer import Tokenizer
from test_loader import BusyCorpus

tok = Tokenizer.train(iter(["doc alpha beta gamma delta river stone 1 2 3"] * 20), 270)
loader = PackedLoader(BusyCorpus(), tok, batch_size=2, seq_len=16, buffer_docs=4, tokenize_batch=4)
next(iter(loader))
if sys.argv[1] == "close":
    loader.close()
print("done", flush=True)
"""


@pytest.mark.slow
def test_processes_exit_cleanly_while_the_loader_is_busy(tmp_path):
    # Before the fix, most of these aborted at exit with "terminate called without an
    # active exception" (exit 134). Several at once on two cores make the threads lag, as on a busy machine.
    from pathlib import Path

    tests = Path(__file__).resolve().parent
    script = tmp_path / "exit.py"
    script.write_text(EXIT_SCRIPT.format(repo=str(tests.parent), tests=str(tests)))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, str(script), mode], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for mode in ["close", "leave-open"] * 2]
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0 and out.strip() == "done", out
