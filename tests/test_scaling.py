"""The --depth dial: derived values, overrides, and errors that name the flag."""

import argparse
import math

import pytest

from chatforge.errors import UsageError
from chatforge.model.gpt import GPT
from chatforge.model.scaling import FLAGS, add_scaling_arguments, derive, overrides_from_args


def test_depth_20_matches_the_reference_shape():
    s = derive(20, vocab_size=65536)
    assert (s.n_embd, s.n_head, s.head_dim, s.n_kv_head) == (1280, 10, 128, 10)
    assert 555e6 < s.num_params < 565e6  # nanochat's d20 is ~560M params with a 65,536 vocab
    assert s.total_batch_size == 2 ** 19 and s.grad_accum_steps == 8  # 32 x 2048 per micro-step
    assert s.matrix_lr == pytest.approx(0.02)
    assert s.embedding_lr == pytest.approx(0.2 * (1280 / 768) ** -0.5)


def test_width_rounds_up_to_head_dim_and_counts_match_a_real_model():
    s = derive(3, head_dim=32, sequence_len=32, vocab_size=100, device_batch_size=2)
    assert s.n_embd == 192 and s.n_head == 6
    s5 = derive(5, head_dim=128)
    assert s5.n_embd == 384  # 320 rounded up to a multiple of 128
    model = GPT(s.model_config())
    assert s.num_params == model.num_params()
    assert s.num_scaling_params == model.num_params(include_embedding=False)
    assert s.flops_per_token == model.estimate_flops()
    assert s.target_tokens == int(10.5 * s.num_scaling_params)
    assert s.num_iterations == math.ceil(s.target_tokens / s.total_batch_size)


def test_batch_grows_with_budget_and_always_divides():
    sizes = [derive(d, world_size=w) for d in (4, 12, 20, 26, 32) for w in (1, 8)]
    for s in sizes:
        micro = s.device_batch_size * s.sequence_len * s.world_size
        assert s.total_batch_size % micro == 0
        assert s.grad_accum_steps == s.total_batch_size // micro
        ratio = s.total_batch_size // micro
        assert ratio & (ratio - 1) == 0  # a power of two
    single = [s.total_batch_size for s in sizes if s.world_size == 1]
    assert single == sorted(single) and single[-1] > single[0]


def test_overrides_win_and_are_reported_as_given():
    s = derive(4, total_batch_size=2 ** 16, num_iterations=7, matrix_lr=0.01, n_kv_head=1, window_pattern="sl")
    assert (s.total_batch_size, s.num_iterations, s.matrix_lr, s.n_kv_head, s.window_pattern) == (2 ** 16, 7, 0.01, 1, "SL")
    text = s.describe()
    assert "--total-batch-size (given)" in text and "--num-iterations (given)" in text
    for name in FLAGS:
        assert f"  {name} " in text


@pytest.mark.parametrize("kwargs, flag", [
    (dict(depth=0), "--depth"),
    (dict(depth=4, n_embd=300), "--n-embd"),
    (dict(depth=4, n_kv_head=3), "--n-kv-head"),
    (dict(depth=4, total_batch_size=100_000), "--total-batch-size"),
    (dict(depth=4, device_batch_size=0), "--device-batch-size"),
    (dict(depth=4, matrix_lr=float("nan")), "--matrix-lr"),
    (dict(depth=4, window_pattern="SXL"), "--window-pattern"),
])
def test_invalid_combinations_name_the_flag(kwargs, flag):
    depth = kwargs.pop("depth")
    with pytest.raises(UsageError, match=flag):
        derive(depth, **kwargs)


def test_argparse_flags_round_trip_into_derive():
    parser = argparse.ArgumentParser()
    add_scaling_arguments(parser, skip=("world_size",))
    args = parser.parse_args(["--max-seq-len", "128", "--device-batch-size", "4", "--embedding-lr", "0.1"])
    over = overrides_from_args(args)
    assert "world_size" not in over and over["vocab_size"] is None
    s = derive(2, **over)
    assert (s.sequence_len, s.device_batch_size, s.embedding_lr) == (128, 4, 0.1)
