"""Shared training-loop pieces: schedules at key steps, accumulation == big batch, divergence, MFU."""

import math

import pytest
import torch

from chatforge.errors import TrainingDiverged, UsageError
from chatforge.model.gpt import GPT, GPTConfig
from chatforge.runtime import init_runtime
from chatforge.train import loop


def test_lr_multiplier_is_flat_then_linear_to_final_fraction():
    s = loop.Schedule(num_iterations=100)  # defaults: no warmup, warmdown last 65% to 5%
    assert s.lr_multiplier(0) == 1.0
    assert s.lr_multiplier(35) == 1.0  # warmdown starts after step 100 - 65
    # straight line from (35, 1.0) to (100, 0.05), written as interpolation
    for step in (36, 50, 67, 90, 100):
        t = (step - 35) / 65
        assert s.lr_multiplier(step) == pytest.approx((1 - t) * 1.0 + t * 0.05)
    assert s.lr_multiplier(100) == pytest.approx(0.05)


def test_lr_warmup_ramps_to_one():
    s = loop.Schedule(num_iterations=100, warmup_ratio=0.1, warmdown_ratio=0.0)
    assert [s.lr_multiplier(i) for i in (0, 4, 9, 10, 99)] == [0.1, 0.5, 1.0, 1.0, 1.0]


def test_momentum_and_weight_decay_schedules():
    s = loop.Schedule(num_iterations=1000)
    assert s.muon_momentum(0) == pytest.approx(0.85)
    assert s.muon_momentum(150) == pytest.approx(0.90)
    assert s.muon_momentum(300) == s.muon_momentum(900) == pytest.approx(0.95)
    assert [s.weight_decay_multiplier(i) for i in (0, 250, 1000)] == [1.0, 0.75, 0.0]


def test_apply_schedules_sets_groups_and_survives_a_state_dict_round_trip():
    a, b = torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([
        {"params": [a], "lr": 0.02, "initial_lr": 0.02, "kind": "muon", "momentum": 0.5, "weight_decay": 0.2},
        {"params": [b], "lr": 0.3, "initial_lr": 0.3, "kind": "adamw", "weight_decay": 0.0},
    ])
    s = loop.Schedule(num_iterations=100)
    loop.apply_schedules(opt, 0, s)
    values = loop.apply_schedules(opt, 50, s)
    muon, adamw = opt.param_groups
    assert muon["lr"] == pytest.approx(0.02 * s.lr_multiplier(50)) and adamw["lr"] == pytest.approx(0.3 * s.lr_multiplier(50))
    assert muon["momentum"] == pytest.approx(s.muon_momentum(50))
    assert adamw["momentum"] == 0  # SGD's default, untouched: only Muon groups get the momentum schedule
    assert muon["weight_decay"] == pytest.approx(0.1) and values["weight_decay_multiplier"] == 0.5
    # a resumed optimizer keeps scaling the original weight decay, not the already-decayed one
    opt2 = torch.optim.SGD([{"params": [a]}, {"params": [b]}], lr=1.0)
    opt2.load_state_dict(opt.state_dict())
    loop.apply_schedules(opt2, 75, s)
    assert opt2.param_groups[0]["weight_decay"] == pytest.approx(0.05)


def _tiny_model(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(sequence_len=8, vocab_size=32, n_layer=2, n_head=2, n_kv_head=1, n_embd=16))


def test_gradient_accumulation_equals_the_big_batch():
    rt = init_runtime("cpu", "fp32", announce=False)
    torch.manual_seed(1)
    x = torch.randint(0, 32, (4, 8))
    y = torch.randint(0, 32, (4, 8))

    big = _tiny_model()
    # the zero-initialised projections give no gradient to most weights at step 0; perturb them
    with torch.no_grad():
        for p in big.parameters():
            p.add_(0.05 * torch.randn_like(p))
    small = _tiny_model()
    small.load_state_dict(big.state_dict())

    big_loss = loop.accumulate_gradients(big, iter([(x, y)]), 1, rt)
    micro = iter([(x[i:i + 1], y[i:i + 1]) for i in range(4)])
    small_loss = loop.accumulate_gradients(small, micro, 4, rt)
    assert small_loss.item() == pytest.approx(big_loss.item(), rel=1e-6)
    for (name, p), q in zip(big.named_parameters(), small.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=name)

    # and the same optimizer update follows
    for model in (big, small):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        opt.step()
    for p, q in zip(big.parameters(), small.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)


def test_non_finite_loss_names_step_and_checkpoint():
    loop.check_finite(2.5, 10, None)
    with pytest.raises(TrainingDiverged, match=r"loss became nan at step 12; the last good checkpoint is /x/step_000010"):
        loop.check_finite(float("nan"), 12, "/x/step_000010")
    with pytest.raises(TrainingDiverged, match=r"inf at step 3; no checkpoint was saved yet"):
        loop.check_finite(math.inf, 3, None)


def test_global_mean_on_one_process_is_the_value():
    assert loop.global_mean(torch.tensor(1.25)) == 1.25


def test_cadence():
    assert [s for s in range(11) if loop.is_due(s, 4, 10)] == [0, 4, 8, 10]
    assert not any(loop.is_due(s, 0, 10) for s in range(11))


def test_throughput_and_mfu_bookkeeping():
    t = loop.Throughput(tokens_per_step=1000, flops_per_token=6e6, peak_flops_per_device=1e12, world_size=2,
                        skip_steps=1)
    t.record(5.0)  # a compile step, not counted
    t.record(0.5)
    t.record(0.5)
    assert t.tokens_per_second == pytest.approx(2000)
    assert t.mfu == pytest.approx(6e6 * 2000 / 2e12)
    assert t.eta_seconds(10) == pytest.approx(5.0)
    assert t.summary() == {"tok_per_s": 2000.0, "step_ms": 500.0, "mfu": 0.6}
    assert loop.Throughput(1, 1.0, None).mfu is None
    varying = loop.Throughput(0, 6e6, 1e12, skip_steps=1)  # SFT: each step says what it trained on
    for seconds, tokens in ((5.0, 10), (0.5, 1500), (1.0, 1500)):
        varying.record(seconds, tokens)
    assert varying.tokens_per_second == pytest.approx(2000) and varying.mfu == pytest.approx(6e6 * 2000 / 1e12)
    assert loop.progress_fields(1.0, varying)["tok/s"] == "2,000"
    assert loop.peak_flops("cpu") is None and loop.memory_stats("cpu") == {}


def test_running_out_of_cpu_memory_becomes_the_same_one_line_advice_as_cuda():
    with pytest.raises(UsageError) as caught:
        with loop.out_of_memory_advice("with --device-batch-size 8; lower it"):
            torch.empty(2 ** 62, dtype=torch.uint8)  # a real failed allocation: the CPU allocator's own error
    assert str(caught.value) == "out of CPU memory with --device-batch-size 8; lower it"
    with pytest.raises(UsageError, match="^out of GPU memory with x$"):
        with loop.out_of_memory_advice("with x"):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    with pytest.raises(RuntimeError, match="shape mismatch"):  # any other error stays a bug with its traceback
        with loop.out_of_memory_advice("with x"):
            raise RuntimeError("shape mismatch")


def test_out_of_memory_advice_can_name_a_size_settled_inside_it():
    """midtrain/sft/rl pass a callable: --device-batch-size auto is only a number once the run found
    it, and the advice must say that number (before, it read "--device-batch-size None")."""
    args = {"device_batch_size": None}
    with pytest.raises(UsageError, match="^out of GPU memory with --device-batch-size 16; lower it$"):
        with loop.out_of_memory_advice(lambda: f"with --device-batch-size {args['device_batch_size']}; lower it"):
            args["device_batch_size"] = 16  # what the auto search wrote back
            raise torch.OutOfMemoryError("CUDA out of memory")
