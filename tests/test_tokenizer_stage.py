"""`chatforge tokenizer train|eval` and `chatforge bench tokenizer` through the real CLI."""

import json
import random

import pytest
import torch

from chatforge.cli import main
from chatforge.tokenizer import load_token_bytes, load_tokenizer
from chatforge.tokenizer_stage import SAMPLES, load_reference


def write_corpus(path, n_docs=200, seed=0):
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyzé東京"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(1, 7))) for _ in range(500)] + ["12", "345"]
    docs = [" ".join(rng.choice(words) for _ in range(150)) for _ in range(n_docs)]
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return docs


def test_train_then_eval(tmp_path, chatforge_home, capsys):
    docs = write_corpus(tmp_path / "corpus.txt")
    main(["tokenizer", "train", "--data", str(tmp_path / "corpus.txt"), "--vocab-size", "400",
          "--max-chars", "1e5", "--doc-cap", "5000"])
    out = capsys.readouterr().out
    assert "trained a 400-token BPE" in out
    tok = load_tokenizer()
    assert tok.vocab_size == 400
    assert torch.equal(load_token_bytes(), tok.token_bytes())
    assert tok.decode(tok.encode(docs[3])) == docs[3]
    summary = json.loads((chatforge_home / "tokenizer" / "train.json").read_text())
    assert summary["vocab_size"] == 400 and summary["doc_cap"] == 5000
    assert 0 < summary["characters"] <= 100_000

    main(["tokenizer", "eval"])
    out = capsys.readouterr().out
    assert "ours (400)" in out and all(kind in out for kind in SAMPLES)
    result = json.loads((chatforge_home / "tokenizer" / "eval.json").read_text())
    for kind, text in SAMPLES.items():
        row = result["samples"][kind]
        assert row["bytes"] == len(text.encode("utf-8"))
        assert row["ours"]["tokens"] == len(tok.encode(text))


def test_references_never_downloaded(tmp_path, monkeypatch):
    # An empty tiktoken cache means "not available", answered without any network call.
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-cache"))
    assert load_reference("gpt2") is None
    assert load_reference("cl100k_base", reference_dir=tmp_path) is None


def test_reference_from_local_tiktoken_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-cache"))
    # A toy file in tiktoken's format: base64 token bytes and rank per line.
    import base64
    lines = [f"{base64.b64encode(bytes([b])).decode()} {b}" for b in range(256)]
    (tmp_path / "cl100k_base.tiktoken").write_text("\n".join(lines) + "\n")
    enc = load_reference("cl100k_base", reference_dir=tmp_path)
    assert enc.encode_ordinary("abc") == [97, 98, 99]


def test_eval_without_tokenizer_says_train_first(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["tokenizer", "eval"])
    assert exc.value.code == 2
    assert "chatforge tokenizer train" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--vocab-size", "264"], "--vocab-size 264"),
    (["--vocab-size", str(2**17 + 1)], "--vocab-size"),
    (["--max-chars", "0"], "--max-chars"),
    (["--doc-cap", "0"], "--doc-cap"),
])
def test_bad_flags(tmp_path, capsys, flags, message):
    write_corpus(tmp_path / "corpus.txt", n_docs=2)
    with pytest.raises(SystemExit) as exc:
        main(["tokenizer", "train", "--data", str(tmp_path / "corpus.txt")] + flags)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_empty_corpus(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(SystemExit) as exc:
        main(["tokenizer", "train", "--data", str(tmp_path / "empty.txt"), "--vocab-size", "300"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "empty.txt" in err and "no text" in err


def test_bench_runs_small(tmp_path, capsys):
    write_corpus(tmp_path / "corpus.txt")
    main(["bench", "tokenizer", "--data", str(tmp_path / "corpus.txt"), "--mb", "0.05",
          "--vocab-size", "300", "--threads", "2"])
    out = capsys.readouterr().out
    assert "train" in out and "MB/s" in out
