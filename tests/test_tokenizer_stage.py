"""`chatforge tokenizer train|eval` and `chatforge bench tokenizer` through the real CLI."""

import json
import random

import pytest
import torch

from chatforge import paths
from chatforge.cli import main
from chatforge.eval.samples import greedy_samples
from chatforge.model import checkpoint
from chatforge.runtime import init_runtime
from chatforge.tokenizer import Tokenizer, load_token_bytes, load_tokenizer
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
    summary = json.loads((chatforge_home / "tokenizer" / "corpus-400" / "train.json").read_text())
    assert tok.name == summary["name"] == "corpus-400"  # named after the data and the vocabulary
    assert summary["vocab_size"] == 400 and summary["doc_cap"] == 5000
    assert 0 < summary["characters"] <= 100_000

    main(["tokenizer", "eval"])
    out = capsys.readouterr().out
    assert "ours (400)" in out and all(kind in out for kind in SAMPLES)
    result = json.loads((chatforge_home / "tokenizer" / "corpus-400" / "eval.json").read_text())
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


def pretrain(corpus, tag):
    main(["pretrain", "--data", str(corpus), "--preset", "smoke", "--device", "cpu", "--max-seq-len", "32",
          "--device-batch-size", "2", "--total-batch-size", "64", "--num-iterations", "2", "--eval-every", "0",
          "--sample-every", "0", "--tag", tag])


def test_retraining_the_tokenizer_never_breaks_an_old_checkpoint(tmp_path, capsys):
    write_corpus(tmp_path / "corpus.txt")
    train = ["tokenizer", "train", "--data", str(tmp_path / "corpus.txt"), "--max-chars", "1e5"]
    main([*train, "--vocab-size", "400"])
    pretrain(tmp_path / "corpus.txt", "old")
    assert checkpoint.read_meta(checkpoint.resolve("base", "old")[2])["tokenizer"] == "corpus-400"

    main([*train, "--vocab-size", "300"])  # another vocabulary: a new name, now the current one
    assert load_tokenizer().name == "corpus-300"
    old = checkpoint.load("base", "old")
    assert old.tokenizer.name == "corpus-400" and old.tokenizer.vocab_size == 400
    samples = greedy_samples(old.model, old.tokenizer, init_runtime("cpu", None), prompts=("abc",), max_new_tokens=4)
    assert len(old.tokenizer.encode(samples[0]["completion"])) >= 1

    pretrain(tmp_path / "corpus.txt", "new")
    new = checkpoint.load("base", "new")
    assert new.tokenizer.name == "corpus-300" and new.model.config.vocab_size == 300
    capsys.readouterr()

    # the name a checkpoint uses is never overwritten: given, it is refused; derived, it moves aside
    with pytest.raises(SystemExit) as exc:
        main([*train, "--vocab-size", "400", "--tokenizer-name", "corpus-400"])
    assert exc.value.code == 2
    assert "was used to train base/old" in capsys.readouterr().err
    main([*train, "--vocab-size", "400"])
    assert "saved as 'corpus-400-2'" in capsys.readouterr().out
    assert checkpoint.load("base", "old").tokenizer.name == "corpus-400"


def test_a_checkpoint_of_the_old_layout_keeps_its_tokenizer(tmp_path):
    """Before names, the one tokenizer lived in tokenizer/ itself and checkpoints recorded none."""
    from tiny_chat import save_tiny_checkpoint

    old_tok, _ = save_tiny_checkpoint("base", "legacy")  # saves into tokenizer/, records no name
    write_corpus(tmp_path / "corpus.txt")
    main(["tokenizer", "train", "--data", str(tmp_path / "corpus.txt"), "--max-chars", "1e5", "--vocab-size", "300"])
    assert load_tokenizer().name == "corpus-300"
    loaded = checkpoint.load("base", "legacy")
    assert loaded.tokenizer.name is None and loaded.tokenizer.vocab_size == old_tok.vocab_size
    assert Tokenizer.load(paths.tokenizer_dir()).vocab_size == old_tok.vocab_size  # left where it was


def test_a_missing_named_tokenizer_is_one_clear_error(tmp_path, capsys):
    import shutil

    write_corpus(tmp_path / "corpus.txt")
    main(["tokenizer", "train", "--data", str(tmp_path / "corpus.txt"), "--max-chars", "1e5", "--vocab-size", "300",
          "--tokenizer-name", "mine"])
    pretrain(tmp_path / "corpus.txt", "t")
    shutil.rmtree(paths.tokenizer_dir("mine"))
    with pytest.raises(SystemExit) as exc:
        main(["eval", "base", "--source", "base", "--tag", "t"])
    assert exc.value.code == 2
    assert "trained with tokenizer 'mine'" in capsys.readouterr().err


def test_an_unknown_tokenizer_name_lists_the_ones_there(tmp_path, capsys):
    write_corpus(tmp_path / "corpus.txt")
    main(["tokenizer", "train", "--data", str(tmp_path / "corpus.txt"), "--max-chars", "1e5", "--vocab-size", "300",
          "--tokenizer-name", "mine"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["tokenizer", "eval", "--tokenizer-name", "mien"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "no tokenizer named 'mien'" in err and "(there: mine)" in err and len(err.strip().splitlines()) == 1


def test_a_derived_name_never_replaces_a_tokenizer_on_disk(tmp_path, capsys):
    """A run that has not saved a checkpoint yet uses its tokenizer too: retraining moves aside."""
    write_corpus(tmp_path / "corpus.txt")
    train = ["tokenizer", "train", "--data", str(tmp_path / "corpus.txt"), "--max-chars", "1e5", "--vocab-size", "300"]
    main(train)
    first = load_tokenizer(name="corpus-300")
    main(train)
    assert "saved as 'corpus-300-2'" in capsys.readouterr().out
    assert load_tokenizer().name == "corpus-300-2"
    assert load_tokenizer(name="corpus-300").encode("the cat") == first.encode("the cat")  # still there


def test_resume_refuses_a_tokenizer_other_than_the_runs_own(tmp_path, capsys):
    write_corpus(tmp_path / "corpus.txt")
    train = ["tokenizer", "train", "--data", str(tmp_path / "corpus.txt"), "--max-chars", "1e5", "--vocab-size", "300"]
    main([*train, "--tokenizer-name", "a"])
    pretrain(tmp_path / "corpus.txt", "t")
    main([*train, "--tokenizer-name", "b"])  # the same vocabulary size, so the model would load
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["pretrain", "--data", str(tmp_path / "corpus.txt"), "--preset", "smoke", "--device", "cpu",
              "--tag", "t", "--resume", "--tokenizer-name", "b"])
    assert exc.value.code == 2
    assert "trained with tokenizer 'a', not 'b'" in capsys.readouterr().err
