"""`chatforge pretrain` end to end on a tiny synthetic corpus: exact resume, bad input, the smoke preset,
and two gloo ranks under torchrun."""

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from chatforge import paths
from chatforge.errors import CheckpointError, TrainingDiverged, UsageError
from chatforge.eval import core
from chatforge.model import checkpoint
from chatforge.progress import read_metrics
from chatforge.tokenizer import Tokenizer
from chatforge.train import pretrain

SUBJECTS = ["the cat", "a dog", "my friend", "the teacher", "our neighbour", "the old man", "a small bird",
            "the children", "her brother", "the baker"]
VERBS = ["sees", "likes", "finds", "helps", "calls", "follows", "paints", "visits", "watches", "thanks"]
OBJECTS = ["the river", "a red house", "the garden", "an apple", "the library", "a blue boat", "the market",
           "the mountain", "a quiet road", "the station"]
ENDINGS = ["in the morning.", "at night.", "every day.", "after lunch.", "before the rain.", "on sunday."]


def write_corpus(folder: Path, num_docs: int = 400, seed: int = 0) -> Path:
    """Documents of template sentences: word choices are random, the grammar is fixed."""
    rng = random.Random(seed)
    path = folder / "stories.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(num_docs):
            sentences = [f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(ENDINGS)}"
                         for _ in range(rng.randint(4, 10))]
            f.write(json.dumps({"text": " ".join(s.capitalize() for s in sentences)}) + "\n")
    return path


@pytest.fixture
def corpus(tmp_path) -> Path:
    data = write_corpus(tmp_path)
    texts = [json.loads(line)["text"] for line in data.read_text().splitlines()]
    Tokenizer.train(iter(texts), 384).save(paths.tokenizer_dir())
    return data


def run(*argv: str) -> dict:
    parser = argparse.ArgumentParser()
    pretrain.add_arguments(parser)
    return pretrain.main(parser.parse_args(list(argv)))


def tiny_flags(data: Path, *extra: str) -> list[str]:
    return ["--data", str(data), "--preset", "smoke", "--device", "cpu", "--max-seq-len", "32",
            "--device-batch-size", "2", "--total-batch-size", "128", "--eval-tokens", "256",
            "--sample-every", "0", *extra]


def losses(run_id: str) -> dict[int, float]:
    records = read_metrics(paths.runs_dir() / run_id / "metrics.jsonl")
    return {r["step"]: r["train_loss"] for r in records if "train_loss" in r}


def test_resume_reproduces_the_uninterrupted_run_bit_for_bit(corpus):
    run(*tiny_flags(corpus, "--num-iterations", "8", "--save-every", "4", "--eval-every", "4",
                    "--run-id", "straight"))
    straight = losses("straight")
    assert sorted(straight) == list(range(1, 9))  # 2 micro-steps of 2x32 per step fill 128 tokens
    # pretend the run was killed after the step-4 save: only step 4 survives
    tag_dir = paths.checkpoint_dir("base", "d2")
    kept = tag_dir.parent / "step8-uninterrupted"
    shutil.move(tag_dir / "step_000008", kept)
    assert checkpoint.latest_step("base", "d2") == 4

    summary = run(*tiny_flags(corpus, "--num-iterations", "8", "--save-every", "4", "--eval-every", "4",
                              "--run-id", "resumed", "--resume"))
    resumed = losses("resumed")
    assert sorted(resumed) == [5, 6, 7, 8]
    assert [resumed[s] for s in range(5, 9)] == [straight[s] for s in range(5, 9)]  # exact, not approx
    assert summary["resumed_from_step"] == 4
    assert [step for step, _ in summary["val_bpb_history"]] == [0, 4, 8]  # the history survives the resume
    a = torch.load(kept / "model.pt", weights_only=True)
    b = torch.load(tag_dir / "step_000008" / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)

    report = json.loads((paths.eval_dir("base", "d2") / "pretrain.json").read_text())
    assert report["num_iterations"] == 8 and report["final_val_bpb"] > 0 and report["git_commit"] is not None


def test_bad_input_messages(corpus):
    with pytest.raises(UsageError, match=r"--total-batch-size 100 is not a multiple of --device-batch-size x --max-seq-len"):
        run(*tiny_flags(corpus, "--total-batch-size", "100", "--num-iterations", "2"))
    with pytest.raises(UsageError, match="--depth must be a positive integer"):
        run(*tiny_flags(corpus, "--depth", "0"))

    first = run(*tiny_flags(corpus, "--num-iterations", "2", "--eval-every", "0", "--tag", "shape"))
    # resuming a finished run trains nothing and keeps its summary
    assert run(*tiny_flags(corpus, "--num-iterations", "2", "--eval-every", "0", "--tag", "shape",
                           "--resume"))["final_train_loss"] == first["final_train_loss"]
    with pytest.raises(UsageError, match=r"already holds step 2; pass --resume"):
        first = run(*tiny_flags(corpus, "--num-iterations", "2", "--eval-every", "0", "--tag", "shape"))
    # resuming a finished run trains nothing and keeps its summary
    assert run(*tiny_flags(corpus, "--num-iterations", "2", "--eval-every", "0", "--tag", "shape",
                           "--resume"))["final_train_loss"] == first["final_train_loss"]
    with pytest.raises(CheckpointError, match=r"another model shape .*n_layer=2 vs 3"):
        run(*tiny_flags(corpus, "--num-iterations", "2", "--eval-every", "0", "--tag", "shape", "--depth", "3",
                        "--resume"))


def test_diverging_loss_stops_with_step_and_checkpoint(corpus, loader_threads):
    with pytest.raises(TrainingDiverged, match=r"loss became (nan|inf) at step \d+; the last good checkpoint is .*step_0000"):
        run(*tiny_flags(corpus, "--num-iterations", "20", "--eval-every", "0", "--save-every", "1",
                        "--matrix-lr", "1e30", "--embedding-lr", "1e30", "--unembedding-lr", "1e30"))
    assert loader_threads and not any(t.is_alive() for t in loader_threads)  # stopped on the way out too


@pytest.fixture
def loader_threads(monkeypatch):
    """Every background thread a PackedLoader starts during the test."""
    from chatforge.data import loader

    started = []

    class Recorded(loader._Background):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            started.append(self.thread)

    monkeypatch.setattr(loader, "_Background", Recorded)
    return started


def test_loader_threads_are_joined_before_pretrain_returns(corpus, loader_threads):
    # A thread still inside torch at interpreter exit aborts the process after "done ... summary in"
    # (exit 134); test_loader.py shows that in subprocesses, this that pretrain leaves none running.
    run(*tiny_flags(corpus, "--num-iterations", "3", "--eval-every", "3"))
    assert sorted(t.name for t in loader_threads) == ["pack", "pack", "pack", "tokenize", "tokenize", "tokenize"]
    assert not any(t.is_alive() for t in loader_threads)


def unigram_entropy_bits_per_byte(data: Path) -> float:
    """The bits per byte of the best model that ignores context: token frequencies only."""
    tokenizer = Tokenizer.load(paths.tokenizer_dir())
    counts, nbytes = Counter(), 0
    for line in data.read_text().splitlines():
        text = json.loads(line)["text"]
        counts.update(tokenizer.encode(text))
        nbytes += len(text.encode("utf-8"))
    total = sum(counts.values())
    nats_per_token = -sum(c / total * math.log(c / total) for c in counts.values())
    return nats_per_token * total / (math.log(2) * nbytes)


@pytest.mark.slow
def test_smoke_preset_learns_well_below_the_unigram_entropy(corpus):
    summary = run("--preset", "smoke", "--data", str(corpus), "--device", "cpu", "--sample-every", "0")
    unigram = unigram_entropy_bits_per_byte(corpus)
    first_bpb = summary["val_bpb_history"][0][1]
    assert first_bpb > unigram  # step 0: an untrained model is worse than counting tokens
    assert summary["final_val_bpb"] < 0.6 * unigram, (summary["val_bpb_history"], unigram)


@pytest.mark.slow
def test_two_gloo_ranks_under_torchrun(corpus, chatforge_home):
    env = {**os.environ, "CHATFORGE_HOME": str(chatforge_home), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "chatforge",
           "pretrain", *tiny_flags(corpus, "--num-iterations", "4", "--save-every", "2", "--eval-every", "2",
                                   "--run-id", "two-ranks")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    folder = paths.checkpoint_dir("base", "d2") / "step_000004"
    assert sorted(p.name for p in folder.iterdir()) == ["meta.json", "model.pt", "optim_rank0.pt", "optim_rank1.pt"]
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["world_size"] == 2 and len(meta["loader_state"]) == 2 and meta["loader_state"][0] != meta["loader_state"][1]
    straight = losses("two-ranks")
    assert sorted(straight) == [1, 2, 3, 4]

    shutil.rmtree(folder)
    cmd[-1] = "two-ranks-resumed"
    done = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = losses("two-ranks-resumed")
    assert [resumed[s] for s in (3, 4)] == [straight[s] for s in (3, 4)]


@pytest.mark.shared_data
def test_core_at_the_end_on_the_real_bundle(corpus, shared_data):
    summary = run(*tiny_flags(corpus, "--num-iterations", "2", "--eval-every", "0", "--max-problems", "2",
                              "--data-dir", str(shared_data / "eval" / "core")))
    assert summary["core_tasks"] and len(summary["core_tasks"]) >= 20
    assert summary["core"] == pytest.approx(sum(summary["core_tasks"].values()) / len(summary["core_tasks"]))


def test_core_whose_bundle_is_unreachable_is_skipped_after_the_summary_is_written(corpus, monkeypatch):
    monkeypatch.delenv(core.BUNDLE_ENV, raising=False)
    monkeypatch.setenv(core.BUNDLE_URL_ENV, "http://hub.invalid/eval_bundle.zip")  # offline, even where online
    summary = run(*tiny_flags(corpus, "--num-iterations", "2", "--eval-every", "0", "--max-problems", "2",
                              "--tag", "t"))
    written = json.loads((paths.eval_dir("base", "t") / "pretrain.json").read_text())
    assert summary["core"] is None and written["checkpoint"] == summary["checkpoint"]
    assert "cannot be downloaded" in written["not_measured"]["core"]


def test_epochs_sets_the_steps_from_the_train_split(corpus):
    from chatforge.data.corpus import open_corpus

    tokenizer = Tokenizer.load(paths.tokenizer_dir())
    texts = list(open_corpus(corpus).iter_documents("train"))
    tokens = sum(len(tokenizer.encode(t)) + 1 for t in texts)  # + its bos
    summary = run(*tiny_flags(corpus, "--epochs", "0.05", "--eval-every", "0"))
    assert summary["num_iterations"] == int(0.05 * tokens) // 128
    with pytest.raises(UsageError, match="--epochs"):
        run(*tiny_flags(corpus, "--epochs", "1", "--num-iterations", "3"))


def test_a_log_file_gets_a_progress_line_at_every_eval(corpus, capsys):
    run(*tiny_flags(corpus, "--num-iterations", "4", "--eval-every", "2"))
    err = capsys.readouterr().err  # not a terminal: plain lines, no bar
    at_evals = [line for line in err.splitlines() if line.startswith(("pretrain: step 2/4 ", "pretrain: step 4/4 "))
                and "done in" not in line]
    assert [line.split(" | ")[0] for line in at_evals] == ["pretrain: step 2/4 (50%)", "pretrain: step 4/4 (100%)"]
    assert all(" | loss " in line and " | tok/s " in line and " | eta " in line for line in at_evals)


def test_the_summary_says_why_val_bpb_was_not_measured(corpus, capsys):
    summary = run(*tiny_flags(corpus, "--num-iterations", "2", "--eval-every", "0"))
    done = [line for line in capsys.readouterr().out.splitlines() if line.startswith("done in")]
    assert len(done) == 1 and "None" not in done[0]
    assert f"final train loss {summary['final_train_loss']:.4f}, val bpb not measured (--eval-every 0);" in done[0]
    assert summary["final_val_bpb"] is None and summary["not_measured"] == {
        "final_val_bpb": "--eval-every 0", "min_val_bpb": "--eval-every 0",
        "core": "--max-problems 0; `chatforge eval base` runs CORE"}


def test_an_absurd_depth_is_refused_from_its_memory_floor_before_anything_is_allocated(corpus, monkeypatch):
    from chatforge import runtime
    from chatforge.model.gpt import GPT

    def must_not_allocate(self, *args, **kwargs):
        raise AssertionError("the model was allocated")

    monkeypatch.setattr(GPT, "to_empty", must_not_allocate)
    monkeypatch.setattr(runtime, "available_memory", lambda device: 16 * 2 ** 30)
    with pytest.raises(UsageError, match=r"^--depth 200 needs at least [\d.,]+ TiB to train \(.*\) but cpu has "
                                         r"16\.0 GiB free; lower --depth$"):
        run(*tiny_flags(corpus, "--depth", "200"))
    # a shape whose weights fit but whose micro-batch does not: the advice is the batch, not the depth
    with pytest.raises(UsageError, match=r"lower --device-batch-size or --max-seq-len"):
        run(*tiny_flags(corpus, "--depth", "2", "--device-batch-size", "4096", "--max-seq-len", "1024",
                        "--total-batch-size", str(4096 * 1024)))


def test_cpu_out_of_memory_while_training_is_one_line_of_advice(corpus, monkeypatch):
    def step_that_runs_out(*args, **kwargs):
        return torch.empty(2 ** 62, dtype=torch.uint8)

    monkeypatch.setattr(pretrain.loop, "optimizer_step", step_that_runs_out)
    with pytest.raises(UsageError, match=r"^out of CPU memory with --depth 2, --device-batch-size 2 at "
                                         r"--max-seq-len 32; lower --device-batch-size"):
        run(*tiny_flags(corpus, "--num-iterations", "2", "--eval-every", "0"))


def test_on_cpu_the_dial_takes_one_micro_batch_per_step_and_counts_passes_over_the_data(corpus, capsys):
    from chatforge.data.corpus import open_corpus

    tokenizer = Tokenizer.load(paths.tokenizer_dir())
    tokens = sum(len(tokenizer.encode(t)) + 1 for t in open_corpus(corpus).iter_documents("train"))
    summary = run("--data", str(corpus), "--depth", "2", "--device", "cpu", "--max-seq-len", "32",
                  "--device-batch-size", "2", "--num-iterations", "3", "--eval-every", "0", "--sample-every", "0")
    assert summary["total_batch_size"] == 2 * 32 and summary["settings"]["grad_accum_steps"] == 1
    assert summary["settings"]["data_tokens"] == tokens  # a small corpus is counted, not estimated
    assert summary["settings"]["passes"] == pytest.approx(3 * 64 / tokens)
    table = capsys.readouterr().out
    assert f"data_tokens              {tokens:,}" in table and "warning" not in table


def test_a_corpus_larger_than_the_sample_is_estimated_from_its_size_on_disk(corpus):
    from chatforge.data.corpus import open_corpus

    tokenizer = Tokenizer.load(paths.tokenizer_dir())
    c = open_corpus(corpus)
    exact = sum(len(tokenizer.encode(t)) + 1 for t in c.iter_documents("train"))
    assert pretrain.estimate_train_tokens(c, tokenizer) == exact  # the whole split fits in the sample
    estimate = pretrain.estimate_train_tokens(c, tokenizer, sample_bytes=4000)  # about a dozen documents
    assert estimate != exact and abs(estimate - exact) < 0.15 * exact


@pytest.mark.slow
def test_ctrl_c_saves_and_resume_finishes_the_run(corpus, chatforge_home):
    import signal
    import time

    env = {**os.environ, "CHATFORGE_HOME": str(chatforge_home), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "chatforge", "pretrain", *tiny_flags(corpus, "--num-iterations", "400",
                                                                        "--eval-every", "0", "--run-id", "ctrlc")]
    # as from a terminal: a CI runner may start us with SIGINT ignored, which a child would inherit
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    metrics = chatforge_home / "runs" / "ctrlc" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and metrics.read_text().count('"train_loss"') >= 2):  # training is under way
        assert proc.poll() is None and time.monotonic() < deadline, "pretrain ended or stalled before step 2"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("chatforge: error: interrupted by Ctrl-C after step ") and "--resume" in line
    step = int(line.split("after step ")[1].split()[0])
    assert 2 <= step < 400 and (paths.checkpoint_dir("base", "d2") / f"step_{step:06d}").is_dir()
    done = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "resuming from" in done.stdout and f"(step {step})" in done.stdout
