"""Midtraining: the real mixture's proportions and determinism, exact resume, flag errors."""

import argparse
import itertools
import json
import math
import re
import shutil
from collections import Counter

import pytest
import torch

from chatforge import paths
from chatforge.data.conversations import ConversationCorpus, estimate_tokens
from chatforge.data.loader import PackedLoader
from chatforge.errors import DataError, UsageError
from chatforge.model.checkpoint import step_dir_name
from chatforge.tasks.custom import CustomJSON
from chatforge.train import midtrain
from test_sft import FACTS, tiny_base, write_extra, run_stage


def test_real_mixture_proportions_and_determinism(shared_data, tmp_path):
    tiny_base()
    extra = str(write_extra(tmp_path / "facts.jsonl"))
    parser = argparse.ArgumentParser()
    midtrain.add_arguments(parser)
    args = parser.parse_args(["--data-dir", str(shared_data), "--extra", extra, "--name", "Zed"])
    model = torch.nn.Linear(1, 1)
    model.config, model.num_params = argparse.Namespace(to_dict=lambda: {"n_layer": 2}), lambda: 1000
    mix, val = midtrain.mid_mixture(args, model)
    identity = json.dumps(list(mix.tasks[5]))
    # --name is what they call the model; chatforge remains only as the project that trained it
    assert identity.count("Zed") > 500 and not re.search(r"(I'm|name is|talking to) chatforge", identity)
    counts = Counter(t for t, _ in mix.index)
    sizes = [len(task) for task in mix.tasks]
    # each task appears weight x its size: 1 pass of the sources, 2 of identity and of --extra
    assert [counts[t] for t in range(len(sizes))] == [s * w for s, w in zip(sizes, [1, 1, 1, 1, 1, 2, 2])]
    assert sizes[1] == 285 + 1531  # MMLU dev + validation stand in for auxiliary_train locally
    again, _ = midtrain.mid_mixture(args, model)
    assert again.index == mix.index
    args.seed = 7
    other, _ = midtrain.mid_mixture(args, model)
    assert other.index != mix.index and sorted(other.index) == sorted(mix.index)
    assert len(val) > 300


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    tiny_base(seq_len=32, n_embd=32)
    extra = str(write_extra(tmp_path / "facts.jsonl"))
    argv = ["--extra", extra, "--mixture", "extra", "--device", "cpu", "--num-iterations", "6",
            "--device-batch-size", "2", "--save-every", "3", "--eval-every", "3", "--eval-steps", "1"]
    full = run_stage(midtrain, argv + ["--tag", "t"])
    folder = paths.checkpoint_dir("mid", "t")
    shutil.rmtree(folder / step_dir_name(6))  # as if killed after the step-3 checkpoint
    resumed = run_stage(midtrain, argv + ["--tag", "t", "--resume"])
    assert resumed["resumed_from_step"] == 3
    assert resumed["final_train_loss"] == full["final_train_loss"]
    assert resumed["final_val_loss"] == full["final_val_loss"]
    with pytest.raises(UsageError, match="already holds step 6; pass --resume"):
        run_stage(midtrain, argv + ["--tag", "t"])


def test_flag_errors(tmp_path):
    with pytest.raises(UsageError, match="--mixture extra"):
        run_stage(midtrain, ["--mixture", "extra"])
    with pytest.raises(UsageError, match="--num-iterations must be a positive"):
        run_stage(midtrain, ["--num-iterations", "0"])


def test_val_loss_is_measured_when_the_val_split_fills_less_than_one_batch(tmp_path):
    # The GPU bug: 399 val conversations over 8 ranks of 32 x 2048 tokens gave no full batch on any
    # rank, so validation saw nothing and reported NaN. Here the one line held out of twelve against a
    # 4 x 33 batch.
    tok = tiny_base(seq_len=32, n_embd=32)
    extra = str(write_extra(tmp_path / "facts.jsonl", [(f"{q} ({i})", a) for i in range(3) for q, a in FACTS]))
    _, held = CustomJSON(extra).held_out(1, seed=42)
    assert len(held) == 1 and estimate_tokens(list(held), tok) < 4 * 33
    summary = run_stage(midtrain, ["--extra", extra, "--mixture", "extra", "--device", "cpu", "--num-iterations", "2",
                                   "--device-batch-size", "4", "--eval-every", "1", "--eval-steps", "5"])
    losses = [loss for _, loss in summary["val_loss_history"]]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    # an untrained model's output layer is near zero: its loss is that of a uniform guess
    assert abs(losses[0] - math.log(tok.vocab_size)) < 0.01


def test_no_target_to_score_is_a_data_error_not_nan():
    from chatforge.runtime import init_runtime
    from chatforge.train import loop

    rt = init_runtime("cpu", "fp32", announce=False)
    model = torch.nn.Module()
    with pytest.raises(DataError, match="no target to score"):
        loop.evaluate_loss(model, itertools.islice([], 1), rt)


@pytest.mark.shared_data
def test_the_real_val_split_gives_every_rank_a_batch(shared_data):
    from chatforge.tasks.smoltalk import SmolTalk

    tok = tiny_base()
    val = SmolTalk("test", str(shared_data))
    corpus = ConversationCorpus({"val": val}, tok)
    rank, world = 7, 8  # the d20 recipe on one 8-GPU node: 32 rows of 2048 tokens per rank
    mine = [val[i] for i in range(rank, len(val), world)]
    assert estimate_tokens(mine, tok) < 32 * 2049
    loader = PackedLoader(corpus, tok, 32, 2048, split="val", rank=rank, world_size=world, loop=False, pad_last=True)
    batches = list(loader)
    assert len(batches) == 1 and batches[0][0].shape == (32, 2048)
    stats = loader.stats()
    assert int((batches[0][1] != -1).sum()) == stats["tokens_used"] - stats["rows"] > 0
    assert stats["documents"] == len(mine) and stats["tokens_dropped"] == 0
