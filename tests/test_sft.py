"""SFT: padded batches train only on assistant tokens; the tiny base -> mid -> sft pipeline chats."""

import argparse
import json
import re
from collections import Counter

import pytest
import torch

from chatforge import paths
from chatforge.conversation import render_conversation, render_for_completion
from chatforge.data.conversations import SFTBatches
from chatforge.errors import CheckpointError, UsageError
from chatforge.eval.samples import CHAT_SAMPLE_PROMPTS
from chatforge.model import checkpoint
from chatforge.model.checkpoint import save_checkpoint
from chatforge.model.gpt import GPT, GPTConfig
from chatforge.tokenizer import Tokenizer
from chatforge.train import midtrain, sft, stage

FACTS = [
    ("What is your name?", "My name is Forge."),
    ("Who made you?", "A person with chatforge made me."),
    ("Can you browse the web?", "No, I cannot browse the web."),
    ("What is two plus two?", "Two plus two is four."),
]


def write_extra(path, rows=FACTS):
    with open(path, "w", encoding="utf-8") as f:
        for q, a in rows:
            f.write(json.dumps({"messages": [{"role": "user", "content": q},
                                             {"role": "assistant", "content": a}]}) + "\n")
    return path


def tiny_base(seq_len=64, n_embd=64):
    """A tokenizer trained on the facts and a freshly initialised tiny GPT saved as a base checkpoint."""
    texts = [f"{q} {a}" for q, a in FACTS] * 40
    tok = Tokenizer.train(iter(texts), 300)
    tok.save(paths.tokenizer_dir())
    torch.manual_seed(0)
    config = GPTConfig(sequence_len=seq_len, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_kv_head=2,
                       n_embd=n_embd)
    model = GPT(config)
    model.init_weights()
    save_checkpoint("base", "t", 1, model, None, model_config=config.to_dict(), vocab_size=tok.vocab_size)
    return tok


def run_stage(module, argv):
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return module.main(parser.parse_args(argv))


def test_sft_targets_are_assistant_tokens_only():
    tok = tiny_base()
    convs = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in FACTS]
    convs.append({"messages": [{"role": "user", "content": "x"},
                               {"role": "assistant", "content": [
                                   {"type": "text", "text": "calc "}, {"type": "python", "text": "2+2"},
                                   {"type": "python_output", "text": "4"}, {"type": "text", "text": "four"}]}]})
    inputs, targets = next(SFTBatches(convs, tok, len(convs), 64))
    user_ids = set(tok.encode(" ".join(q for q, _ in FACTS))) - set(tok.encode(" ".join(a for _, a in FACTS)))
    for row, conv in zip(range(len(convs)), convs):
        y = targets[row][targets[row] != -1].tolist()
        # what is trained is exactly the assistant reply and its end token
        reply = conv["messages"][1]["content"]
        if isinstance(reply, str):
            assert tok.decode(y) == reply + "<|assistant_end|>"
        else:
            assert tok.decode(y) == "calc <|python_start|>2+2<|python_end|>four<|assistant_end|>"
        assert not set(y) & user_ids
        assert tok.special_id("<|output_start|>") not in y and tok.bos_id not in y
    # padding: rows are padded to the longest (rendered length - 1), with bos inputs and -1 targets
    lengths = [len(render_conversation(tok, c)[0]) - 1 for c in convs]
    assert inputs.shape == targets.shape == (len(convs), max(lengths))
    for row, n in enumerate(lengths):
        assert (inputs[row, n:] == tok.bos_id).all() and (targets[row, n:] == -1).all()


def test_sft_state_resumes_exactly():
    tok = tiny_base()
    convs = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in FACTS]
    a = SFTBatches(convs, tok, 3, 64)
    for _ in range(2):
        next(a)
    b = SFTBatches(convs, tok, 3, 64, state=a.state_dict())
    for _ in range(3):
        xa, ya = next(a)
        xb, yb = next(b)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    with pytest.raises(UsageError, match="world_size"):
        SFTBatches(convs, tok, 3, 64, rank=0, world_size=2, state=a.state_dict())


@pytest.mark.slow
def test_tiny_pipeline_base_mid_sft_answers_from_training_set(tmp_path):
    from chatforge.infer.engine import Engine

    tiny_base()
    extra = str(write_extra(tmp_path / "facts.jsonl"))
    common = ["--extra", extra, "--mixture", "extra", "--device", "cpu", "--tag", "t"]
    mid = run_stage(midtrain, common + ["--num-iterations", "30", "--device-batch-size", "4",
                                        "--eval-every", "0", "--eval-steps", "2"])
    # four lines are too few to hold any out, and a validation loss is never measured on training lines
    assert mid["num_iterations"] == 30 and mid["final_val_loss"] is None
    assert (paths.eval_dir("mid", "t") / "midtrain.json").is_file()
    out = run_stage(sft, common + ["--num-iterations", "150", "--device-batch-size", "4", "--examples-per-step", "4",
                                   "--init-lr-frac", "1.0", "--eval-every", "0", "--max-problems", "0"])
    assert out["final_train_loss"] < 0.1, out["final_train_loss"]
    engine = Engine.from_checkpoint("sft", "t", device="cpu")
    tok = engine.tokenizer
    for question, answer in FACTS:
        prompt = render_for_completion(tok, {"messages": [{"role": "user", "content": question}]})
        result = engine.generate_batch([prompt], max_tokens=30, temperature=0.0)[0]
        assert result.tokens[-1] == tok.special_id("<|assistant_end|>")
        assert tok.decode(result.tokens[:-1]) == answer


OFFLINE = {"CHATFORGE_HUB_URL": "http://hub.invalid", "CHATFORGE_EVAL_BUNDLE_URL": "http://hub.invalid/b.zip"}


def go_offline(monkeypatch):
    """No task data and no network: a hub that does not resolve fails at once, even where there is one."""
    monkeypatch.delenv("CHATFORGE_DATA_DIR", raising=False)
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)


def test_sft_without_mid_checkpoints_points_at_source_base():
    tiny_base()
    with pytest.raises(CheckpointError, match=r"run `chatforge midtrain` first, or pass --source base"):
        run_stage(sft, ["--device", "cpu"])


def test_name_reaches_the_identity_conversations_and_the_stages_after(tmp_path, monkeypatch):
    go_offline(monkeypatch)
    tiny_base()
    extra = str(write_extra(tmp_path / "facts.jsonl"))
    run_stage(midtrain, ["--extra", extra, "--mixture", "extra", "--name", "Zed", "--num-iterations", "1",
                         "--device-batch-size", "4", "--device", "cpu", "--tag", "t"])
    assert checkpoint.read_meta(checkpoint.resolve("mid", "t")[2])["name"] == "Zed"
    # sft from that mid checkpoint, without --name: the model keeps its name
    run_stage(sft, ["--extra", extra, "--num-iterations", "1", "--device-batch-size", "4", "--device", "cpu",
                    "--max-problems", "0", "--tag", "t"])
    assert checkpoint.read_meta(checkpoint.resolve("sft", "t")[2])["name"] == "Zed"

    parser = argparse.ArgumentParser()
    sft.add_arguments(parser)
    args = parser.parse_args(["--extra", extra, "--name", "Zed"])
    args.mixture = "full"
    model = checkpoint.load("base", "t").model
    train, val = sft.sft_mixture(args, model, stage.extra_tasks(args), sized=True)
    identity = json.dumps([list(task) for task in train.tasks if task.name == "Identity"])
    assert identity.count("Zed") > 200 and not re.search(r"(I'm|name is|talking to) chatforge", identity)
    # offline the data sets are left out; the four facts (too few to hold any out) are 3/4 of the run
    counts = Counter(type(train.tasks[t]).__name__ for t, _ in train.index)
    assert {"ARC", "GSM8K", "SmolTalk"}.isdisjoint(counts) and val is None
    assert counts["CustomJSON"] == len(train) - sum(n for k, n in counts.items() if k != "CustomJSON")
    assert 0.7 < counts["CustomJSON"] / len(train) < 0.8 and len(train) >= 60 * args.examples_per_step


def test_sft_finishes_and_keeps_its_checkpoint_when_eval_data_is_unreachable(tmp_path, monkeypatch):
    go_offline(monkeypatch)
    tiny_base()
    extra = str(write_extra(tmp_path / "facts.jsonl", [(f"{q} ({i})", a) for i in range(3) for q, a in FACTS]))
    out = run_stage(sft, ["--source", "base", "--extra", extra, "--mixture", "extra", "--num-iterations", "2",
                          "--device-batch-size", "4", "--device", "cpu", "--tag", "t",
                          "--tasks", "ARC-Easy,SpellingBee", "--max-problems", "2",
                          "--max-new-tokens", "4"])
    assert checkpoint.resolve("sft", "t")[1] == 2
    summary = json.loads((paths.eval_dir("sft", "t") / "sft.json").read_text())
    assert "cannot be downloaded" in summary["chat_eval"]["skipped"]["ARC-Easy"]
    assert set(summary["chat_eval"]["tasks"]) == {"SpellingBee"} and "without ARC-Easy" in summary["chat_eval"]["note"]
    replies = json.loads((paths.eval_dir("sft", "t") / "chat.json").read_text())["samples"]  # for the report card
    assert [r["prompt"] for r in replies] == list(CHAT_SAMPLE_PROMPTS)
    assert all(isinstance(r["reply"], str) for r in replies)
    assert summary["final_val_loss"] == out["final_val_loss"] is not None  # on the held-out line
    assert summary["tok_per_s"] > 0  # counted from the steps' padded rows


def test_a_second_variant_from_the_same_source_is_a_new_tag(tmp_path):
    tiny_base()
    extra = str(write_extra(tmp_path / "facts.jsonl"))
    quick = ["--source", "base", "--extra", extra, "--mixture", "extra", "--device", "cpu", "--num-iterations", "2",
             "--device-batch-size", "2", "--examples-per-step", "2", "--eval-every", "0", "--max-problems", "0"]
    assert run_stage(sft, quick)["tag"] == "t"  # no --tag: the source's
    with pytest.raises(UsageError, match=r"checkpoints/sft/t already holds step 2; pass --resume to continue it, "
                                         r"or a new --tag"):
        run_stage(sft, quick)
    second = run_stage(sft, [*quick, "--tag", "v2"])  # base has no v2: its latest tag, t
    third = run_stage(sft, [*quick, "--tag", "v3", "--source-tag", "t"])
    assert second["source"] == third["source"] == "base/t/step 1"
    assert checkpoint.list_tags("sft") == ["t", "v2", "v3"]
    meta = checkpoint.read_meta(checkpoint.resolve("sft", "v2")[2])
    assert meta["args"]["source_tag"] == "t" and meta["source"] == "base/t/step 1"
    assert meta["data"] == f"--extra {extra}"  # the lineage the report shows


def test_a_resumed_variant_keeps_its_source_and_does_not_call_it_the_latest(tmp_path, capsys):
    tiny_base()
    extra = str(write_extra(tmp_path / "facts.jsonl"))
    quick = ["--source", "base", "--extra", extra, "--mixture", "extra", "--device", "cpu", "--num-iterations", "2",
             "--device-batch-size", "2", "--examples-per-step", "2", "--eval-every", "0", "--max-problems", "0"]
    run_stage(sft, [*quick, "--tag", "v2"])
    assert "the most recently written base tag" in capsys.readouterr().out  # base/t: a guess, said so
    newer = checkpoint.load("base", "t").model
    save_checkpoint("base", "u", 1, newer, None, model_config=newer.config.to_dict(),
                    vocab_size=newer.config.vocab_size)  # now the most recently written base tag
    resumed = run_stage(sft, [*quick, "--tag", "v2", "--resume"])
    assert resumed["source"] == "base/t/step 1"  # the source it started from, recorded in its checkpoint
    assert "most recently written" not in capsys.readouterr().out


@pytest.mark.parametrize("source_step_kept", [True, False])
def test_a_resumed_run_keeps_the_source_step_it_started_from(tmp_path, monkeypatch, capsys, source_step_kept):
    """sft started from base/t step 1 and was cut off after its step-1 save; base/t then trained on
    (steps 2 and 3, other settings) and, when not kept, pruned step 1. The resumed run still names
    base/t step 1 as its source, with that step's settings, and finishes."""
    from chatforge.train import loop

    tiny_base()
    base = checkpoint.load("base", "t").model

    def save_base(step, matrix_lr):
        save_checkpoint("base", "t", step, base, None, model_config=base.config.to_dict(),
                        vocab_size=base.config.vocab_size, extra={"settings": {"matrix_lr": matrix_lr}})

    save_base(1, 0.01)
    extra = str(write_extra(tmp_path / "facts.jsonl"))
    flags = ["--source", "base", "--extra", extra, "--mixture", "extra", "--device", "cpu", "--num-iterations", "2",
             "--device-batch-size", "2", "--examples-per-step", "2", "--eval-every", "0", "--max-problems", "0",
             "--save-every", "1", "--tag", "t"]
    real_step = loop.optimizer_step

    def power_cut_at_step_1(*args, **kwargs):
        if args[6] == 1:
            raise RuntimeError("power cut")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(loop, "optimizer_step", power_cut_at_step_1)
    with pytest.raises(RuntimeError, match="power cut"):
        run_stage(sft, flags)
    monkeypatch.setattr(loop, "optimizer_step", real_step)
    save_base(2, 0.5)
    save_base(3, 0.5)  # pretraining went on
    if not source_step_kept:
        checkpoint.prune_checkpoints("base", "t", 2)
    capsys.readouterr()

    resumed = run_stage(sft, [*flags, "--resume"])
    assert resumed["resumed_from_step"] == 1 and resumed["source"] == "base/t/step 1"
    meta = checkpoint.read_meta(checkpoint.resolve("sft", "t")[2])
    assert meta["step"] == 2 and meta["source"] == "base/t/step 1"
    assert meta["settings"] == {"matrix_lr": 0.01}  # the learning rates it started with, not step 3's
    out = capsys.readouterr().out
    assert "start: base/t step 1 -> sft/t" in out and "'matrix_lr': 0.01" in out
    assert ("base/t step 1, where sft/t started, is no longer on disk" in out) != source_step_kept
