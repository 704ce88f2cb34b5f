"""The GPU presets dry-run on CPU: every stage's arguments parse with the real command line, and the
token budgets and batch derivations are the ones the presets' comments in speedrun.py state."""

import argparse
from pathlib import Path

import pytest
import torch

from chatforge import cli, speedrun
from chatforge.model.scaling import derive
from chatforge.train import pretrain

GPU_PRESETS = ("gpu1", "d20", "gpt2")
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
LOCAL = speedrun.Sources("local", ["--data", "/d/pretrain/*/shard_*.parquet"], "/d/eval/core", "/d", [],
                         list(speedrun.CHAT_TASKS), [], [])
# a FineWeb-Edu shard holds ~250M characters, ~52M tokens at ~4.8 characters a token
SHARD_TOKENS = 250e6 / 4.8


class CudaRuntime:
    device = torch.device("cuda")


def stage_args(argv: list[str]) -> argparse.Namespace:
    parser, _ = cli.build_parser(argv)
    return parser.parse_args(argv)


def pretrain_settings(name: str, world_size: int, data_tokens: int | None = None):
    """What `chatforge pretrain` derives for the preset on `world_size` GPUs, up to the batch search."""
    preset = speedrun.PRESETS[name]
    args = pretrain.resolve_arguments(stage_args(["pretrain", *preset.pretrain]))
    overrides, search = pretrain.device_batch_overrides(args, CudaRuntime(), existing=None)
    assert search, "the GPU presets leave the device batch to the auto search"
    vocab = int(preset.tokenizer[preset.tokenizer.index("--vocab-size") + 1])
    return derive(args.depth, device="cuda", vocab_size=vocab, world_size=world_size, data_tokens=data_tokens,
                  **overrides)


@pytest.mark.parametrize("name", GPU_PRESETS)
def test_every_stage_of_the_preset_parses(name):
    plan = speedrun.build_plan(name, speedrun.PRESETS[name], LOCAL, rl=True)
    for stage in plan:
        args = stage_args(stage.argv)
        assert args.command == stage.argv[0], stage.name


@pytest.mark.parametrize("name", GPU_PRESETS)
def test_dry_run_prints_the_plan_and_runs_nothing(name, chatforge_home, capsys):
    result = speedrun.main(argparse.Namespace(preset=name, data_dir=None, offline=False, rl=True, nproc_per_node=8,
                                              stop_after=None, dry_run=True, name=None))
    assert result == {"ran": [], "skipped": [], "absent": []}
    out = capsys.readouterr().out
    assert "torchrun --standalone --nproc_per_node=8 -m chatforge pretrain" in out
    assert not (chatforge_home / "checkpoints").exists()


def test_d20_budget_and_batch_are_what_its_comment_says():
    for world, rows_per_rank in ((8, 32), (1, 256)):
        s = pretrain_settings("d20", world)
        assert s.target_tokens == int(10.5 * s.num_scaling_params)
        assert round(s.num_scaling_params / 1e6) == 477 and round(s.target_tokens / 1e9, 1) == 5.0
        assert s.total_batch_size == 524_288 == world * rows_per_rank * 2048
        assert s.num_iterations == 9_555
    one_gpu = pretrain_settings("d20", 1).with_device_batch(32, "auto")
    assert one_gpu.grad_accum_steps == 8  # the one-GPU run: 32-row micro-batches, 8x accumulation
    assert pretrain_settings("d20", 8).with_device_batch(32, "auto").grad_accum_steps == 1
    assert 2 * s.target_tokens < speedrun.PRESETS["d20"].shards * SHARD_TOKENS < 3 * s.target_tokens  # "~2.5x"


def test_gpt2_budget_and_batch_are_what_its_comment_says():
    s = pretrain_settings("gpt2", 8)
    assert round(s.num_scaling_params / 1e6) == 973 and round(s.target_tokens / 1e9, 1) == 10.2
    assert s.total_batch_size == 1_048_576 == 8 * 64 * 2048 and s.num_iterations == 9_743
    assert 190 < s.target_tokens / SHARD_TOKENS < 200 < speedrun.PRESETS["gpt2"].shards
    assert "--fp8" in speedrun.PRESETS["gpt2"].pretrain


def test_gpu1_is_one_pass_at_real_settings_as_its_comment_says():
    preset = speedrun.PRESETS["gpu1"]
    args = pretrain.resolve_arguments(stage_args(["pretrain", *preset.pretrain]))
    assert (args.depth, args.sequence_len, args.compile, args.epochs) == (12, 2048, "on", 1.0)
    tokens = 20_000_000  # ~80M characters of prose
    s = pretrain_settings("gpu1", 1, data_tokens=tokens)
    assert s.total_batch_size == 131_072 == 64 * 2048  # capped at 1/100 of the train split, a power of two
    steps = int(args.epochs * tokens) // s.total_batch_size
    assert 140 <= steps <= 160 and s.with_device_batch(16, "auto").grad_accum_steps == 4
    plan = {st.name: st for st in speedrun.build_plan("gpu1", preset, LOCAL, rl=False)}
    assert "rl" in plan or preset.rl_by_default
    assert set(plan) >= {"tokenizer", "pretrain", "eval-base", "midtrain", "sft", "eval-sft", "report"}
    chat = stage_args(plan["eval-sft"].argv)
    assert chat.max_problems >= 100 and set(chat.tasks.split(",")) == set(speedrun.CHAT_TASKS)
    assert stage_args(plan["eval-base"].argv).max_problems >= 100


@pytest.mark.skipif(not (SHARED / "pretrain" / "openstax").is_dir(), reason="no ../shared/data here")
def test_gpu1_finds_everything_in_the_shared_data_layout():
    src = speedrun._local_sources(speedrun.PRESETS["gpu1"], SHARED)
    assert src.skipped_evals == [] and set(src.chat_tasks) == set(speedrun.CHAT_TASKS)
    from chatforge.data.corpus import open_corpus

    corpus = open_corpus(src.corpus_args[1])
    assert {p.parent.name for p in corpus.files} == {"openstax", "docs"}
    assert 70e6 < corpus.approx_bytes("train") < 90e6  # the ~80M characters the budget counts on
