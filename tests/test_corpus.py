"""Corpora: downloaded shards and --data txt/jsonl/parquet/glob, the val split, ranks, and bad input."""

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from chatforge import paths
from chatforge.data import corpus as corpus_mod
from chatforge.data.corpus import open_corpus
from chatforge.errors import DataError


def write_parquet(path, texts, row_group_size=3, column="text"):
    pq.write_table(pa.table({column: texts}), path, row_group_size=row_group_size)
    return path


def test_downloaded_shards_last_is_val_and_ranks_split_documents(tmp_path):
    d = paths.data_dir("fineweb-edu")
    for s in range(3):
        write_parquet(d / f"shard_{s:05d}.parquet", [f"s{s} d{j}" for j in range(7)])
    c = open_corpus()
    assert list(c.iter_documents("val")) == [f"s2 d{j}" for j in range(7)]
    train = [f"s{s} d{j}" for s in range(2) for j in range(7)]
    assert list(c.iter_documents("train")) == train
    ranks = [list(c.iter_documents("train", r, 3)) for r in range(3)]
    assert sorted(sum(ranks, [])) == sorted(train)
    assert ranks[1] == train[1::3]
    # starting part-way skips row groups without changing which documents come
    assert list(c.iter_indexed("train", 1, 3, start=8)) == [(i, train[i]) for i in range(10, 14, 3)]


def test_txt_file_is_cut_into_documents_at_blank_lines_and_every_20th_is_val(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_mod, "TXT_DOC_CHARS", 50)
    paragraphs = [f"Speaker {k}:\nline one of {k}\nline two of {k}\n\n" for k in range(100)]
    text = "".join(paragraphs)
    (tmp_path / "play.txt").write_text(text, encoding="utf-8")
    c = open_corpus(tmp_path / "play.txt")
    indexed = list(c.iter_indexed("train")) + list(c.iter_indexed("val"))
    train, val = list(c.iter_documents("train")), list(c.iter_documents("val"))
    assert len(val) == (len(train) + len(val)) // 20 > 0
    # documents in reading order rebuild the file exactly; each ends at a paragraph break
    every = sorted(train + val, key=lambda t: text.index(t))
    assert "".join(every) == text and all(t.endswith("\n\n") for t in every)
    assert len(indexed) == len(every)


def test_folder_of_mixed_files_glob_and_tokenizer_texts(tmp_path):
    (tmp_path / "a.txt").write_text("alpha text", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jsonl").write_text(
        json.dumps({"text": "beta"}) + "\n\n" + json.dumps({"text": "   \n"}) + "\n" + json.dumps({"text": "gamma"}) + "\n")
    with gzip.open(tmp_path / "sub" / "c.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "delta"}) + "\n")
    write_parquet(tmp_path / "d.parquet", ["epsilon", "zeta"])
    (tmp_path / "notes.md").write_text("ignored")
    c = open_corpus(tmp_path)
    assert list(c.iter_documents()) == ["alpha text", "epsilon", "zeta", "beta", "gamma", "delta"]
    assert list(open_corpus(str(tmp_path / "**" / "*.jsonl*")).iter_documents()) == ["beta", "gamma", "delta"]
    assert list(c.iter_texts(max_chars=12, doc_cap=4)) == ["alph", "epsi", "zeta"]


@pytest.mark.parametrize("setup, match", [
    (lambda p: p.joinpath("x.parquet").write_bytes(b""), r"x\.parquet: not a readable parquet file"),
    (lambda p: p.joinpath("x.parquet").write_bytes(b"PAR1 garbage PAR1"), r"x\.parquet: not a readable parquet"),
    (lambda p: write_parquet(p / "x.parquet", ["a"], column="content"), r"x\.parquet: parquet file has no 'text' column"),
    (lambda p: write_parquet(p / "x.parquet", pa.array([], pa.string())), r"x\.parquet: parquet file has no rows"),
    (lambda p: p.joinpath("x.txt").write_bytes(b"fine\n\xff\xfe bad\n"), r"x\.txt: line 2 is not valid UTF-8"),
    (lambda p: p.joinpath("x.jsonl").write_text('{"text": "a"}\n{oops\n'), r"x\.jsonl: line 2 is not valid JSON"),
    (lambda p: p.joinpath("x.jsonl").write_text('{"body": "a"}\n'), r"x\.jsonl: line 1 has no string field 'text'"),
    (lambda p: p.joinpath("x.md").write_text("hi"), r"folder has no \.txt, \.jsonl"),
])
def test_bad_input_is_one_clear_error_naming_the_file(tmp_path, setup, match):
    setup(tmp_path)
    with pytest.raises(DataError, match=match):
        list(open_corpus(tmp_path).iter_documents())


def test_missing_data_and_missing_download_say_what_to_do(tmp_path):
    with pytest.raises(DataError, match="no such file or folder"):
        open_corpus(tmp_path / "nope.txt")
    with pytest.raises(DataError, match="matches no"):
        open_corpus(str(tmp_path / "*.parquet"))
    with pytest.raises(DataError, match="chatforge data download -n 8 --corpus climbmix"):
        open_corpus(corpus="climbmix")
    write_parquet(paths.data_dir("fineweb-edu") / "shard_00000.parquet", ["a"])
    with pytest.raises(DataError, match="only one shard"):
        open_corpus()


def test_shared_docs_corpus_reads_with_its_validation_shard(shared_data):
    c = open_corpus(shared_data / "pretrain" / "docs")
    assert c.split_rule == "last-file"
    assert len(list(c.iter_documents("val"))) == 128


def test_approx_bytes_reads_sizes_not_documents_and_lands_near_the_text(tmp_path):
    texts = [f"document {k}: " + "words and more words " * (k % 7 + 1) for k in range(400)]
    real = sum(len(t.encode()) for t in texts)
    folder = tmp_path / "mixed"
    folder.mkdir()
    write_parquet(folder / "a.parquet", texts[:100], row_group_size=30)
    with gzip.open(folder / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts[100:200])
    (folder / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[200:300]))
    (folder / "d.txt").write_text("\n\n".join(texts[300:]))
    c = open_corpus(folder)
    train, val = c.approx_bytes("train"), c.approx_bytes("val")
    assert 0.9 * real < train + val < 1.25 * real  # jsonl's quoting and parquet's offsets add a little
    assert train == pytest.approx(19 * val, rel=0.01)  # every 20th document is validation

    shards = paths.data_dir("fineweb-edu")
    for s in range(3):
        write_parquet(shards / f"shard_{s:05d}.parquet", texts[100 * s:100 * (s + 1)])
    downloaded = open_corpus()
    assert downloaded.approx_bytes("train") == pytest.approx(2 * downloaded.approx_bytes("val"), rel=0.1)
