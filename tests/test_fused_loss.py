"""The fused, chunked training loss (model/fused_loss.py) gives the plain loss's value and gradients
without ever making the (rows, V) logits, and GPT.forward uses it exactly when it trains."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from chatforge.model.fused_loss import chunk_rows_for, linear_softcap_cross_entropy
from chatforge.model.gpt import GPT, GPTConfig

N, C, V = 37, 16, 50  # rows not a multiple of the chunk sizes used below


def plain_loss(h, weight, targets, softcap, reduction):
    """What GPT.forward computed before: full fp32 logits, soft-cap, cross-entropy."""
    logits = F.linear(h, weight).float()
    if softcap > 0:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits, targets, ignore_index=-1, reduction=reduction)


def problem(seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(N, C, generator=gen) * 3  # logits of a few units: the soft-cap bends them
    weight = torch.randn(V, C, generator=gen) * 0.5
    targets = torch.randint(0, V, (N,), generator=gen)
    targets[::4] = -1
    return h, weight, targets


def loss_and_grads(fn, h, weight, targets, bf16=False):
    h = (h.bfloat16() if bf16 else h.clone()).requires_grad_()  # bf16: the residual stream's dtype
    weight = weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = fn(h, weight, targets)
    loss.backward()
    return loss.detach(), h.grad, weight.grad


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("softcap", [15.0, 0.0])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunk_rows", [1, 8, 37, 100])
def test_fp32_value_and_gradients_equal_the_plain_loss(softcap, reduction, chunk_rows):
    h, weight, targets = problem()
    ref = loss_and_grads(lambda a, b, t: plain_loss(a, b, t, softcap, reduction), h, weight, targets)
    got = loss_and_grads(lambda a, b, t: linear_softcap_cross_entropy(a, b, t, softcap, reduction, chunk_rows),
                         h, weight, targets)
    for name, a, b in zip(("loss", "grad h", "grad weight"), got, ref):
        assert a.dtype == b.dtype, name
        assert rel(a, b) < 1e-5, (name, rel(a, b))  # relative to the whole tensor: sums cancel elementwise


@pytest.mark.parametrize("softcap", [15.0, 0.0])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_bf16_autocast_agrees_within_bf16_rounding(softcap, reduction):
    h, weight, targets = problem(1)
    plain = lambda a, b, t: plain_loss(a, b, t, softcap, reduction)
    fused = lambda a, b, t: linear_softcap_cross_entropy(a, b, t, softcap, reduction, chunk_rows=8)
    ref = loss_and_grads(plain, h, weight, targets, bf16=True)
    got = loss_and_grads(fused, h, weight, targets, bf16=True)
    # the exact answer for the bf16 operands both paths multiply
    exact = loss_and_grads(plain, h.bfloat16().double(), weight.bfloat16().double(), targets)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.bfloat16 and got[2].dtype == torch.float32
    assert rel(got[0], ref[0]) < 1e-5  # the same bf16 logits, widened the same way
    for a, b, truth in zip(got[1:], ref[1:], exact[1:]):
        assert rel(a, b) < 2 ** -7  # a couple of bf16 roundings apart at most
        assert rel(a, truth) <= rel(b, truth) * 1.5 + 1e-6  # and no further from the exact gradient


def test_sum_over_only_ignored_targets_is_zero_with_zero_gradients():
    h, weight, _ = problem()
    loss, grad_h, grad_w = loss_and_grads(
        lambda a, b, t: linear_softcap_cross_entropy(a, b, t, 15.0, "sum", 8), h, weight, torch.full((N,), -1))
    assert loss.item() == 0 and not grad_h.any() and not grad_w.any()


class LargestLogits(TorchDispatchMode):
    """Records the most rows any new (not a view) tensor of shape (..., vocab_size) had while the mode was on."""

    def __init__(self, vocab_size):
        super().__init__()
        self.vocab_size = vocab_size
        self.rows = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view:
            return out
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dim() and t.shape[-1] == self.vocab_size:
                self.rows = max(self.rows, t.numel() // self.vocab_size)
        return out


def test_no_tensor_as_large_as_the_full_logits_is_made():
    h, weight, targets = problem()
    h = h.requires_grad_()
    weight = weight.requires_grad_()
    chunk = 4
    fused, plain = LargestLogits(V), LargestLogits(V)
    with fused:
        linear_softcap_cross_entropy(h, weight, targets, 15.0, "mean", chunk).backward()
    with plain:
        plain_loss(h, weight, targets, 15.0, "mean").backward()
    assert plain.rows == N  # the probe sees the full logits when they exist
    assert fused.rows == chunk


def test_chunk_size_keeps_fp32_logits_within_the_budget():
    assert chunk_rows_for(32768) == 2048  # 256 MB of fp32 logits at the default budget
    assert chunk_rows_for(10**9) == 1


def tiny_gpt(softcap=15.0):
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=16, vocab_size=64, n_layer=2, n_head=2, n_kv_head=2, n_embd=32,
                          softcap=softcap))
    with torch.no_grad():  # the init zeroes the output projections; make every layer matter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def gpt_batch():
    gen = torch.Generator().manual_seed(2)
    idx = torch.randint(0, 64, (3, 16), generator=gen)
    targets = torch.randint(0, 64, (3, 16), generator=gen)
    targets[:, :3] = -1
    return idx, targets


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_gpt_training_loss_and_every_gradient_match_the_plain_path(reduction):
    idx, targets = gpt_batch()
    results = []
    for fused in (True, False):
        model = tiny_gpt()
        model.fused_loss, model.loss_chunk_rows = fused, 5  # 48 rows: the last chunk is short
        loss = model(idx, targets, loss_reduction=reduction)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (fused_loss, fused_grads), (plain, plain_grads) = results
    assert torch.allclose(fused_loss, plain, rtol=1e-5)
    assert fused_grads.keys() == plain_grads.keys()
    for name in plain_grads:
        assert rel(fused_grads[name], plain_grads[name]) < 1e-5, name


def test_gpt_takes_the_fused_path_only_for_a_training_loss():
    idx, targets = gpt_batch()
    model = tiny_gpt()
    assert not model.fused_loss  # opt-in: compiled, the plain path measured as fast and lighter
    model.fused_loss, model.loss_chunk_rows = True, 5
    probe = LargestLogits(64)
    with probe:
        model(idx, targets).backward()
    assert probe.rows == 5  # training: one chunk of logits at a time, never (48, V)
    with torch.no_grad():
        logits = model(idx)
        per_token = model(idx, targets, loss_reduction="none")
        summed = model(idx, targets, loss_reduction="sum")
    # evaluation and per-token losses are the plain path's, bit for bit
    def expected(reduction):
        return F.cross_entropy(logits.view(-1, 64), targets.view(-1), ignore_index=-1, reduction=reduction)

    assert torch.equal(per_token, expected("none").view(3, 16)) and torch.equal(summed, expected("sum"))
    assert torch.equal(model(idx, targets, loss_reduction="none").detach(), per_token)  # with grad, too


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.xfail(strict=False, reason="failed in its one H200 run (2026-12-01), which did not keep the "
                   "assertion; the fused loss is opt-in until it is understood")
def test_compiled_on_cuda_it_matches_the_plain_loss_in_less_memory():
    """The GPU's path: torch.compile, bf16 autocast, a realistic vocabulary, rows not a multiple of the chunk."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows, width, vocab, chunk = 4133, 512, 32768, 1024
    h = (torch.randn(rows, width, device="cuda", generator=gen) * 2).bfloat16()
    weight = torch.randn(vocab, width, device="cuda", generator=gen) * width ** -0.5
    targets = torch.randint(0, vocab, (rows,), device="cuda", generator=gen)
    targets[::7] = -1
    fused = torch.compile(lambda a, b, t: linear_softcap_cross_entropy(a, b, t, 15.0, "mean", chunk), dynamic=False)

    def run(fn):
        a, b = h.clone().requires_grad_(), weight.clone().requires_grad_()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fn(a, b, targets)
        loss.backward()
        torch.cuda.synchronize()
        return loss.detach(), a.grad, b.grad, torch.cuda.max_memory_allocated() - base

    run(fused)  # compile outside the measurement
    got, ref = run(fused), run(lambda a, b, t: plain_loss(a, b, t, 15.0, "mean"))
    assert rel(got[0], ref[0]) < 1e-4
    assert rel(got[1], ref[1]) < 2 ** -7 and rel(got[2], ref[2]) < 2 ** -7
    assert got[3] < rows * vocab * 4 / 2  # less than half of one copy of the fp32 logits
