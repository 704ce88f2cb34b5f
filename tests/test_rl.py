"""`chatforge rl`: advantages and the masked policy-gradient loss by hand, the question stream, a
synthetic task the policy learns in a few dozen steps, exact resume, bad input, and the CLI end to end."""

import argparse
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from chatforge import paths
from chatforge.errors import CheckpointError, UsageError
from chatforge.infer.engine import GenerationResult
from chatforge.model import checkpoint
from chatforge.model.checkpoint import save_checkpoint
from chatforge.model.gpt import GPT, GPTConfig
from chatforge.progress import read_metrics
from chatforge.train import rewards, rl
from tiny_chat import save_tiny_checkpoint, tiny_model, tiny_tokenizer

# ---------------------------------------------------------------------------------------------
# the pieces, against hand computations


def test_group_advantages_subtract_each_groups_mean():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    expected = torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.0, 0.0, 0.0, 0.0], [0.75, -0.25, -0.25, -0.25]])
    assert torch.equal(rl.group_advantages(r), expected)  # no division by the std


def test_masked_policy_gradient_loss_matches_a_hand_computation():
    tok = tiny_tokenizer()
    model = tiny_model(tok.vocab_size).train()
    prompts = [[1, 2, 3], [4, 5]]
    # question 0: two samples; sample 1 called the tool, so its output (mask 0) was forced in
    results = [GenerationResult([7, 8, 9], [1, 1, 1]),
               GenerationResult([10, 11, 12, 13], [1, 0, 0, 1]),
               GenerationResult([20], [1]),
               GenerationResult([21, 22], [1, 1])]
    advantages = torch.tensor([0.5, -0.5, 1.0, -1.0])
    rows = rl.training_rows(prompts, results, num_samples=2)
    assert rows[1] == ([1, 2, 3, 10, 11, 12, 13], [0, 0, 0, 1, 0, 0, 1])
    inputs, targets = rl.pad_batch(rows, pad_id=0, device="cpu")
    normalizer = 3.7
    loss = rl.policy_gradient_loss(model, inputs, targets, advantages, normalizer)

    # by hand: every sampled reply token's log-probability given everything before it, row by row
    expected = 0.0
    for (ids, mask), adv in zip(rows, advantages.tolist()):
        logp = F.log_softmax(model(torch.tensor([ids]))[0], dim=-1)  # (T, V)
        for t in range(1, len(ids)):
            if mask[t]:
                expected += -adv * logp[t - 1, ids[t]].item()
    assert loss.item() == pytest.approx(expected / normalizer, rel=1e-5)
    # exactly the sampled reply tokens are counted: 3 + 2 + 1 + 2
    assert int((targets != -1).sum()) == 8

    # micro-batches summed give the same loss and gradient as one batch
    loss.backward()
    whole = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    for part in ([0, 1], [2], [3]):
        x, y = rl.pad_batch([rows[i] for i in part], 0, "cpu")
        rl.policy_gradient_loss(model, x, y, advantages[part], normalizer).backward()
    for g, p in zip(whole, model.parameters()):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)


def test_question_stream_splits_ranks_and_covers_each_epoch():
    n, E = 10, 4
    single = [rl.step_questions(s, E, n, seed=3) for s in range(5)]  # 20 positions = 2 epochs
    flat = [q for batch in single for q in batch]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    assert flat[:10] != flat[10:]  # a fresh order each epoch
    for s in range(5):
        ranks = [rl.step_questions(s, E, n, seed=3, rank=r, world_size=2) for r in range(2)]
        assert sorted(ranks[0] + ranks[1]) == sorted(single[s])
        assert ranks[0] == single[s][0::2]
    assert rl.step_questions(2, E, n, seed=3) == single[2]  # a pure function of the step: resumable


# ---------------------------------------------------------------------------------------------
# runs on a synthetic task: "answer with the number 7"

SEVEN = [{"messages": [{"role": "user", "content": f"say seven {i}"}, {"role": "assistant", "content": "7"}]}
         for i in range(40)]


def seven_reward(conversation, text):
    return float(text.startswith("7"))


rewards.register(rewards.RewardTask("seven-test", train=lambda data_dir=None: SEVEN,
                                    test=lambda data_dir=None: SEVEN[:6], reward=seven_reward), replace=True)


def fresh_sft_checkpoint():
    """The tiny tokenizer and a freshly initialised (nearly uniform) tiny model as an sft checkpoint."""
    tok = tiny_tokenizer()
    tok.save(paths.tokenizer_dir())
    torch.manual_seed(0)
    config = GPTConfig(sequence_len=64, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_kv_head=1, n_embd=32)
    save_checkpoint("sft", "d2", 1, GPT(config), None, model_config=config.to_dict(), vocab_size=tok.vocab_size)
    return tok


def run(*argv: str) -> dict:
    parser = argparse.ArgumentParser()
    rl.add_arguments(parser)
    return rl.main(parser.parse_args(list(argv)))


def seven_flags(*extra: str) -> list[str]:
    return ["--task", "seven-test", "--device", "cpu", "--examples-per-step", "4", "--num-samples", "16",
            "--max-new-tokens", "2", "--max-problems", "4", "--pass-k", "1,4", "--init-lr-frac", "1.0", *extra]


def test_mean_reward_rises_on_a_learnable_task():
    fresh_sft_checkpoint()
    summary = run(*seven_flags("--num-iterations", "30", "--eval-every", "0", "--run-id", "seven"))
    history = summary["reward_history"]
    assert len(history) == 30
    assert sum(history[:5]) / 5 < 0.1  # about 1/320 by chance
    assert sum(history[-5:]) / 5 > 0.6, history
    assert summary["final_eval"]["pass@4"] >= summary["final_eval"]["pass@1"] > 0.5
    assert summary["samples_per_s"] > 0
    records = read_metrics(paths.runs_dir() / "seven" / "metrics.jsonl")
    step_records = [r for r in records if "reward" in r]
    assert [r["step"] for r in step_records] == list(range(1, 31))
    assert all(r["samples_per_s"] > 0 and len(r["rank0_questions"]) == 4 for r in step_records)
    assert (paths.eval_dir("rl", "d2") / "rl.json").is_file()


def test_resumed_run_continues_with_the_same_next_questions_and_weights(capsys):
    """Killed after its step-2 save, the run resumes exactly: the same questions, samples and weights,
    with the batch sizes it ran with (the flags' auto takes them from its checkpoint, as it would a
    search's result on CUDA) and the source step it started from, though that sft run has moved on."""
    fresh_sft_checkpoint()
    flags = seven_flags("--num-iterations", "4", "--save-every", "2", "--eval-every", "2")
    # 2 questions per engine call and micro-batches of 8 rows, where auto off CUDA would take 256 and 32
    straight = run(*flags, "--device-batch-size", "8", "--rollout-batch-size", "32", "--run-id", "straight")
    folder = paths.checkpoint_dir("rl", "d2")
    final_weights = torch.load(folder / "step_000004" / "model.pt")
    shutil.rmtree(folder / "step_000004")  # as if the run had been killed after the step-2 save
    sft_model = checkpoint.load("sft", "d2").model
    save_checkpoint("sft", "d2", 5, sft_model, None, model_config=sft_model.config.to_dict(),
                    vocab_size=sft_model.config.vocab_size)
    checkpoint.prune_checkpoints("sft", "d2", 1)  # the step rl started from is gone
    capsys.readouterr()

    resumed = run(*flags, "--resume", "--run-id", "resumed")
    out = capsys.readouterr().out
    assert "--device-batch-size auto: 8, the resumed run's" in out
    assert "--rollout-batch-size auto: 32, the resumed run's" in out
    assert "sft/d2 step 1, where rl/d2 started, is no longer on disk" in out
    assert resumed["source"]["step"] == straight["source"]["step"] == 1
    assert resumed["args"]["device_batch_size"] == 8 and resumed["args"]["rollout_batch_size"] == 32
    assert resumed["resumed_from_step"] == 2
    before = {r["step"]: r for r in read_metrics(paths.runs_dir() / "straight" / "metrics.jsonl") if "reward" in r}
    after = {r["step"]: r for r in read_metrics(paths.runs_dir() / "resumed" / "metrics.jsonl") if "reward" in r}
    assert sorted(after) == [3, 4]
    for s in (3, 4):
        assert after[s]["rank0_questions"] == before[s]["rank0_questions"]
        assert (after[s]["reward"], after[s]["pg_loss"]) == (before[s]["reward"], before[s]["pg_loss"])
    again = torch.load(folder / "step_000004" / "model.pt")
    for name, value in final_weights.items():
        assert torch.equal(again[name], value), name
    assert resumed["reward_history"] == straight["reward_history"] and len(straight["reward_history"]) == 4
    assert [e["step"] for e in resumed["eval_history"]] == [0, 2, 4]
    assert resumed["eval_history"][-1] == straight["eval_history"][-1]


def test_bad_input_messages():
    with pytest.raises(CheckpointError, match="no sft checkpoints"):
        run(*seven_flags("--num-iterations", "1"))
    fresh_sft_checkpoint()
    with pytest.raises(UsageError, match="--task 'nope'"):
        run(*seven_flags("--task", "nope"))
    with pytest.raises(UsageError, match="--pass-k"):
        run(*seven_flags("--pass-k", "1,two"))
    with pytest.raises(UsageError, match="--max-new-tokens 64"):
        run(*seven_flags("--max-new-tokens", "64"))
    with pytest.raises(UsageError, match="--num-iterations or --epochs"):
        run(*seven_flags("--num-iterations", "2", "--epochs", "1"))
    run(*seven_flags("--num-iterations", "1", "--eval-every", "0"))
    with pytest.raises(UsageError, match="already holds step 1; pass --resume"):
        run(*seven_flags("--num-iterations", "1"))
    with pytest.raises(CheckpointError, match="--num-iterations 1"):
        run(*seven_flags("--num-iterations", "3", "--resume"))
    with pytest.raises(CheckpointError, match="--seed 42"):
        run(*seven_flags("--num-iterations", "1", "--resume", "--seed", "7"))


def test_epochs_set_the_number_of_steps():
    fresh_sft_checkpoint()
    summary = run(*seven_flags("--epochs", "0.5", "--eval-every", "0"))
    assert summary["num_iterations"] == 5  # 40 questions / 2 / 4 per step


# ---------------------------------------------------------------------------------------------
# the command line


def test_help_lists_the_flags():
    done = subprocess.run([sys.executable, "-m", "chatforge", "rl", "--help"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0
    for flag in ("--source", "--examples-per-step", "--num-samples", "--max-new-tokens", "--temperature",
                 "--top-k", "--num-iterations", "--epochs", "--eval-every", "--pass-k", "--resume", "--wandb"):
        assert flag in done.stdout


@pytest.mark.slow
def test_cli_end_to_end_on_gsm8k(shared_data, chatforge_home):
    save_tiny_checkpoint("sft", "d2", sequence_len=256)  # GSM8K prompts exceed it: kept from the left
    env = {**os.environ, "CHATFORGE_HOME": str(chatforge_home), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "chatforge", "rl", "--data-dir", str(shared_data), "--device", "cpu",
           "--num-iterations", "2", "--examples-per-step", "2", "--num-samples", "2", "--max-new-tokens", "8",
           "--eval-every", "0", "--max-problems", "2", "--pass-k", "1,2", "--run-id", "cli"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout + done.stderr
    assert "step 2/2 | reward" in out and "samples/s" in out and "pass@2" in out
    assert (paths.checkpoint_dir("rl", "d2") / "step_000002" / "meta.json").is_file()
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "pass --resume" in again.stderr


@pytest.mark.slow
def test_two_gloo_ranks_under_torchrun(tmp_path, chatforge_home):
    fresh_sft_checkpoint()
    script = tmp_path / "rl_seven.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import test_rl  # registers the synthetic task
        from chatforge.runtime import shutdown
        test_rl.run(*test_rl.seven_flags(*sys.argv[1:]))
        shutdown()
    """))
    env = {**os.environ, "CHATFORGE_HOME": str(chatforge_home), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           "--num-iterations", "4", "--save-every", "2", "--eval-every", "2", "--run-id", "two-ranks"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    folder = paths.checkpoint_dir("rl", "d2") / "step_000004"
    assert sorted(p.name for p in folder.iterdir()) == ["meta.json", "model.pt", "optim_rank0.pt", "optim_rank1.pt"]
    straight = {r["step"]: r for r in read_metrics(paths.runs_dir() / "two-ranks" / "metrics.jsonl") if "reward" in r}
    assert sorted(straight) == [1, 2, 3, 4] and all(0 < r["sampled_tokens"] <= 4 * 16 * 2 for r in straight.values())

    shutil.rmtree(folder)
    cmd[-1] = "two-ranks-resumed"
    done = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = {r["step"]: r for r in read_metrics(paths.runs_dir() / "two-ranks-resumed" / "metrics.jsonl")
               if "reward" in r}
    assert [(resumed[s]["reward"], resumed[s]["pg_loss"]) for s in (3, 4)] == \
        [(straight[s]["reward"], straight[s]["pg_loss"]) for s in (3, 4)]
