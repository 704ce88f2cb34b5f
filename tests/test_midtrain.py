"""Midtraining: the real mixture's proportions and determinism, exact resume, flag errors."""

import argparse
import shutil
from collections import Counter

import pytest
import torch

from chatforge import paths
from chatforge.errors import UsageError
from chatforge.model.checkpoint import step_dir_name
from chatforge.train import midtrain
from test_sft import tiny_base, write_extra, run_stage


def test_real_mixture_proportions_and_determinism(shared_data, tmp_path):
    tiny_base()
    extra = str(write_extra(tmp_path / "facts.jsonl"))
    parser = argparse.ArgumentParser()
    midtrain.add_arguments(parser)
    args = parser.parse_args(["--data-dir", str(shared_data), "--extra", extra])
    model = torch.nn.Linear(1, 1)
    model.config, model.num_params = argparse.Namespace(to_dict=lambda: {"n_layer": 2}), lambda: 1000
    mix, val = midtrain.mid_mixture(args, model)
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
