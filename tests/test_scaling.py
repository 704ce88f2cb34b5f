"""The --depth dial: derived values, overrides, and errors that name the flag."""

import argparse
import math

import pytest
import torch

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


def test_cuda_and_an_unknown_or_large_corpus_derive_exactly_as_before():
    for depth in (4, 12, 20, 26):
        before = derive(depth)
        for facts in (dict(device="cuda"), dict(device="cuda", data_tokens=10 ** 11)):
            after = derive(depth, **facts)
            assert (after.total_batch_size, after.num_iterations, after.matrix_lr) == \
                   (before.total_batch_size, before.num_iterations, before.matrix_lr)


def test_on_a_cpu_a_step_is_one_micro_batch_unless_a_total_is_given():
    # README's old text-file recipe: 32 micro-steps of 16 x 256 per step on CUDA rules, ~140 s a step on 2 cores
    flags = dict(vocab_size=4096, sequence_len=256, device_batch_size=16)
    assert derive(6, **flags).grad_accum_steps == 32
    cpu = derive(6, device="cpu", **flags)
    assert (cpu.total_batch_size, cpu.grad_accum_steps) == (16 * 256, 1)
    assert "on cpu" in cpu.sources["total_batch_size"]
    assert derive(6, device="cpu", total_batch_size=16 * 256 * 4, **flags).grad_accum_steps == 4


def test_a_small_corpus_caps_the_batch_and_the_horizon_and_the_table_counts_passes():
    s = derive(12, device="cuda", data_tokens=10_000_000)  # a ~40 MB corpus on a GPU
    micro = s.device_batch_size * s.sequence_len
    assert s.total_batch_size == micro * 2 ** math.floor(math.log2(10_000_000 / 100 / micro))
    assert s.num_iterations == 4 * 10_000_000 // s.total_batch_size  # 4 passes, not the 10.5 x params budget
    assert s.passes == pytest.approx(s.num_iterations * s.total_batch_size / 10_000_000)
    assert s.passes_warning() is None and "warning" not in s.describe()
    assert "passes" in s.describe() and "10,000,000" in s.describe()

    many = derive(4, device="cpu", data_tokens=300_000, sequence_len=256, device_batch_size=16,
                  num_iterations=2000, vocab_size=4096)
    assert many.passes == pytest.approx(2000 * 4096 / 300_000)
    warning = many.passes_warning()
    assert warning and "27.3 times" in warning and "--num-iterations 292 makes 4" in warning
    assert many.describe().endswith(warning)


def test_the_memory_floor_matches_the_tensors_a_real_training_step_holds():
    from chatforge.model.optim import build_optimizer

    torch.manual_seed(0)
    s = derive(2, head_dim=32, sequence_len=32, vocab_size=300, device_batch_size=3)
    model = GPT(s.model_config())
    optimizer = build_optimizer(model, **s.optimizer_kwargs())
    x = torch.randint(0, 300, (3, 32))

    saved = {}

    def keep(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        loss = model(x, x)
    loss.backward()
    optimizer.step()
    state = sum(p.nbytes + p.grad.nbytes for p in model.parameters())
    state += sum(v.nbytes for st in optimizer.state.values() for v in st.values()
                 if torch.is_tensor(v) and v.ndim > 0)
    floor = s.memory_floor(activation_bytes=4)
    assert floor["state"] == state
    assert floor["activations"] <= sum(saved.values())  # a floor: what backward really keeps is more


def test_memory_floor_grows_with_depth_and_batch():
    base = derive(4, vocab_size=4096).memory_floor()
    assert derive(8, vocab_size=4096).memory_floor()["state"] > 2 * base["state"]
    wide_batch = derive(4, vocab_size=4096, device_batch_size=64).memory_floor()
    assert wide_batch["activations"] == 2 * base["activations"] and wide_batch["state"] == base["state"]
