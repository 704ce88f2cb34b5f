"""`chatforge eval base` and `chatforge eval chat` end to end on a tiny checkpoint."""

import json

import pytest
import torch

from chatforge import paths
from chatforge.cli import main
from chatforge.model.checkpoint import save_checkpoint
from chatforge.model.gpt import GPT, GPTConfig
from chatforge.tokenizer import Tokenizer


def tiny_checkpoint(stage: str) -> None:
    tok = Tokenizer({bytes([i]): i for i in range(256)})
    tok.save(paths.tokenizer_dir())
    torch.manual_seed(0)
    config = GPTConfig(sequence_len=64, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_kv_head=2, n_embd=32)
    model = GPT(config)
    model.init_weights()
    save_checkpoint(stage, "d1", 5, model, None, model_config=config.to_dict(), vocab_size=tok.vocab_size)


@pytest.mark.slow
def test_eval_base_end_to_end(shared_data, tmp_path, capsys):
    tiny_checkpoint("base")
    corpus = tmp_path / "corpus.jsonl"  # every 20th document is validation
    corpus.write_text("".join(json.dumps({"text": f"document {i} is a short text about cats and dogs."}) + "\n"
                              for i in range(60)))
    main(["eval", "base", "--device", "cpu", "--max-problems", "2", "--tasks", "copa,winograd,lambada_openai",
          "--data-dir", str(shared_data / "eval" / "core"), "--data", str(corpus),
          "--eval-tokens", "256", "--device-batch-size", "2"])
    out = capsys.readouterr().out
    assert "CORE" in out and "lambada_openai" in out
    folder = paths.eval_dir("base", "d1")
    core = json.loads((folder / "core.json").read_text())
    assert core["num_tasks"] == 3 and core["step"] == 5 and core["note"]
    assert set(core["tasks"]) == {"copa", "winograd", "lambada_openai"}
    bpb = json.loads((folder / "bpb.json").read_text())
    assert bpb["train_bpb"] > 0 and bpb["val_bpb"] > 0
    samples = json.loads((folder / "samples.json").read_text())["samples"]
    assert samples and all(isinstance(s["completion"], str) for s in samples)


@pytest.mark.slow
def test_eval_chat_end_to_end(shared_data, capsys):
    tiny_checkpoint("sft")
    main(["eval", "chat", "--device", "cpu", "-a", "ARC-Easy,SpellingBee", "--max-problems", "3",
          "--data-dir", str(shared_data), "--max-new-tokens", "4"])
    out = capsys.readouterr().out
    assert "ChatCORE" in out and "over 2 task(s)" in out
    result = json.loads((paths.eval_dir("sft", "d1") / "chat.json").read_text())
    assert set(result["tasks"]) == {"ARC-Easy", "SpellingBee"}
    assert result["tasks"]["ARC-Easy"]["num_problems"] == 3


def test_bad_usage_is_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["eval", "chat", "-a", "ARC-Easy,Nope"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Nope" in err and "known tasks" in err
    with pytest.raises(SystemExit) as exc:
        main(["eval", "base", "--skip", "everything"])
    assert exc.value.code == 2 and "--skip" in capsys.readouterr().err


def test_eval_base_without_a_corpus_runs_core_and_says_bpb_was_skipped(tmp_path, capsys):
    from test_core import make_records, write_bundle

    tiny_checkpoint("base")
    mc, _, lm = make_records(n=6)
    write_bundle(tmp_path / "bundle", {"mc": ("multiple_choice", 1, " ", mc), "lm": ("language_modeling", 0, None, lm)},
                 {"mc": 33.3, "lm": 0})
    # no --data and no downloaded shards in the (fresh) base directory
    main(["eval", "base", "--device", "cpu", "--max-problems", "2", "--data-dir", str(tmp_path / "bundle")])
    out = capsys.readouterr().out
    assert "bits per byte: skipped (no pretraining corpus: no shards in" in out
    closing = out.strip().splitlines()[-1]
    assert closing.startswith("eval base: CORE ") and "over 2 task(s); bits per byte not measured (no pretraining" in closing
    assert "None" not in out
    folder = paths.eval_dir("base", "d1")
    assert json.loads((folder / "core.json").read_text())["num_tasks"] == 2
    bpb = json.loads((folder / "bpb.json").read_text())
    assert bpb["val_bpb"] is None and "no shards in" in bpb["not_measured"]["val_bpb"]
    assert json.loads((folder / "samples.json").read_text())["samples"]
    # a --data that names no corpus is the user's to fix: one line, before any CORE work
    with pytest.raises(SystemExit) as exc:
        main(["eval", "base", "--device", "cpu", "--data-dir", str(tmp_path / "bundle"),
              "--data", str(tmp_path / "nothing-here")])
    assert exc.value.code == 2
    captured = capsys.readouterr()
    assert "nothing-here" in captured.err and "CORE" not in captured.out


def test_eval_base_val_bpb_equals_what_pretraining_reported(tmp_path, capsys):
    from test_pretrain import run, tiny_flags, write_corpus

    data = write_corpus(tmp_path)
    texts = [json.loads(line)["text"] for line in data.read_text().splitlines()]
    Tokenizer.train(iter(texts), 384).save(paths.tokenizer_dir())
    summary = run(*tiny_flags(data, "--num-iterations", "3", "--eval-every", "3", "--tag", "bpb"))
    main(["eval", "base", "--device", "cpu", "--source", "base", "--tag", "bpb", "--skip", "core,samples",
          "--data", str(data), "--eval-tokens", "256"])  # the batch comes from the checkpoint
    bpb = json.loads((paths.eval_dir("base", "bpb") / "bpb.json").read_text())
    assert bpb["val_bpb"] == summary["final_val_bpb"] and bpb["device_batch_size"] == 2
    assert "val bits per byte: 4/4 (100%)" in capsys.readouterr().err  # progress while it measures


def test_eval_chat_records_greedy_replies_and_the_report_shows_them_under_the_checkpoint(capsys):
    from chatforge.eval.samples import CHAT_SAMPLE_PROMPTS
    from tiny_chat import save_tiny_checkpoint

    save_tiny_checkpoint("sft", "d2")
    main(["eval", "chat", "--device", "cpu", "-a", "SpellingBee", "--max-problems", "1", "--max-new-tokens", "8"])
    samples = json.loads((paths.eval_dir("sft", "d2") / "chat.json").read_text())["samples"]
    assert [s["prompt"] for s in samples] == list(CHAT_SAMPLE_PROMPTS)
    assert all(isinstance(s["reply"], str) for s in samples) and any(s["reply"] for s in samples)
    assert f"{samples[0]['prompt']!r} -> {samples[0]['reply']!r}" in capsys.readouterr().out

    main(["report", "--tag", "d2"])
    md = (paths.report_dir() / "report.md").read_text()
    shown = md.split("Samples of sft/d2:", 1)[1].split("\n\n", 2)[1].splitlines()
    assert shown == [f"- {s['prompt']!r} -> {s['reply']!r}" for s in samples]
    assert "none recorded" not in md
