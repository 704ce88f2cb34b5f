"""SFT: padded batches train only on assistant tokens; the tiny base -> mid -> sft pipeline chats."""

import argparse
import json

import pytest
import torch

from chatforge import paths
from chatforge.conversation import render_conversation, render_for_completion
from chatforge.data.conversations import SFTBatches
from chatforge.errors import UsageError
from chatforge.model.checkpoint import save_checkpoint
from chatforge.model.gpt import GPT, GPTConfig
from chatforge.tokenizer import Tokenizer
from chatforge.train import midtrain, sft

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
    assert mid["num_iterations"] == 30 and mid["final_val_loss"] is not None
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


def test_a_second_variant_from_the_same_source_is_a_new_tag(tmp_path):
    from chatforge.model import checkpoint

    tiny_base()
    extra = str(write_extra(tmp_path / "facts.jsonl"))
    quick = ["--source", "base", "--extra", extra, "--mixture", "extra", "--device", "cpu", "--num-iterations", "2",
             "--device-batch-size", "2", "--examples-per-step", "2", "--eval-every", "0", "--eval-max-problems", "0"]
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
