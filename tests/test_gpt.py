"""The GPT: shapes, causality, loss semantics, and KV-cache forward equal to the full forward."""

import math

import pytest
import torch
import torch.nn.functional as F

from chatforge.errors import UsageError
from chatforge.model.gpt import GPT, GPTConfig, KVCache, layer_windows

VARIANTS = {
    "full": dict(n_head=4, n_kv_head=4, window_pattern="L"),
    "gqa": dict(n_head=4, n_kv_head=2, window_pattern="L"),
    "window": dict(n_head=4, n_kv_head=4, window_pattern="SL"),
    "gqa+window": dict(n_head=4, n_kv_head=1, window_pattern="SSL"),
}


def tiny_model(seed=0, **kw) -> GPT:
    """A tiny fp32 model whose residual-branch outputs are NOT zero (the default init zeroes them,
    which would make attention invisible to these tests)."""
    cfg = dict(sequence_len=16, vocab_size=97, n_layer=3, n_head=4, n_kv_head=4, n_embd=32, window_pattern="L")
    cfg.update(kw)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**cfg))
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_proj.weight.normal_(0, 0.2)
            block.mlp.c_proj.weight.normal_(0, 0.2)
        model.lm_head.weight.normal_(0, 0.2)
    return model.eval()


def test_shapes_and_loss_reductions():
    model = tiny_model()
    idx = torch.randint(0, 97, (2, 16))
    logits = model(idx)
    assert logits.shape == (2, 16, 97) and logits.dtype == torch.float32
    assert logits.abs().max() <= model.config.softcap
    targets = torch.randint(0, 97, (2, 16))
    targets[0, :5] = -1
    per_token = model(idx, targets, loss_reduction="none")
    assert per_token.shape == (2, 16)
    assert torch.all(per_token[0, :5] == 0)
    # reference: the loss computed another way from the logits
    logp = torch.log_softmax(logits, dim=-1)
    ref = -logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    valid = targets != -1
    torch.testing.assert_close(per_token[valid], ref[valid], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model(idx, targets), ref[valid].mean(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model(idx, targets, loss_reduction="sum"), ref[valid].sum(), rtol=1e-5, atol=1e-4)


def test_fresh_model_predicts_near_uniform():
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=16, vocab_size=97, n_layer=2, n_head=2, n_kv_head=2, n_embd=32))
    idx = torch.randint(0, 97, (2, 16))
    loss = model(idx, idx)
    assert abs(loss.item() - math.log(97)) < 0.05


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_future_tokens_do_not_change_past_logits(variant):
    model = tiny_model(**VARIANTS[variant])
    idx = torch.randint(0, 97, (2, 16))
    changed = idx.clone()
    changed[:, 9:] = torch.randint(0, 97, (2, 7))
    a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :9], b[:, :9], rtol=0, atol=1e-6)
    assert (a[:, 9:] - b[:, 9:]).abs().max() > 1e-3  # and the later ones do move


def test_sliding_window_limits_what_a_query_sees():
    # every layer windowed except the last; with 3 layers of window 4 a token's receptive field is
    # at most (4-1)*3 = 9 tokens back, so a token 12 positions back cannot matter
    model = tiny_model(window_pattern="S", sequence_len=16)
    assert layer_windows(model.config) == [4, 4, None]
    idx = torch.randint(0, 97, (1, 16))
    changed = idx.clone()
    changed[0, 0] = (idx[0, 0] + 1) % 97
    # the last layer is full attention, so use the second-to-last layer's output: compare with the
    # model truncated to the windowed layers
    model.transformer.h = model.transformer.h[:2]
    a, b = model(idx), model(changed)
    torch.testing.assert_close(a[0, 7:], b[0, 7:], rtol=0, atol=1e-6)
    assert (a[0, :7] - b[0, :7]).abs().max() > 1e-4


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_kv_cache_prefill_then_decode_equals_full_forward(variant):
    model = tiny_model(**VARIANTS[variant])
    idx = torch.randint(0, 97, (2, 16))
    full = model(idx)
    cache = KVCache(model.config, batch_size=2, max_len=20, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        out = [model(idx[:, :6], kv_cache=cache)]
        for t in range(6, 16):
            out.append(model(idx[:, t:t + 1], kv_cache=cache))
    assert cache.lengths.tolist() == [16, 16]
    torch.testing.assert_close(torch.cat(out, dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["full", "gqa+window"])
def test_decode_rows_of_different_lengths_built_with_copy_rows(variant):
    model = tiny_model(**VARIANTS[variant])
    prompts = [torch.randint(0, 97, (1, n)) for n in (3, 7, 5)]
    continuations = torch.randint(0, 97, (3, 6))
    batch = KVCache(model.config, batch_size=3, max_len=16, device="cpu")
    last = []
    with torch.no_grad():
        for row, p in enumerate(prompts):  # prefill each prompt alone, in a smaller cache
            single = KVCache(model.config, batch_size=1, max_len=8, device="cpu")
            last.append(model(p, kv_cache=single)[:, -1])
            batch.copy_rows(single, [0], [row])
        assert batch.lengths.tolist() == [3, 7, 5]
        steps = [torch.cat(last)]
        for t in range(6):
            steps.append(model(continuations[:, t:t + 1], kv_cache=batch)[:, 0])
    for row, p in enumerate(prompts):
        seq = torch.cat([p, continuations[row:row + 1]], dim=1)
        ref = model(seq)[0, p.shape[1] - 1:]
        got = torch.stack([s[row] for s in steps])
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_cache_reset_and_one_prefill_serving_several_samples():
    model = tiny_model(**VARIANTS["gqa"])
    prompt = torch.randint(0, 97, (1, 5))
    one = KVCache(model.config, 1, 12, "cpu")
    with torch.no_grad():
        model(prompt, kv_cache=one)
        many = KVCache(model.config, 4, 12, "cpu")
        many.copy_rows(one, [0, 0, 0, 0], [0, 1, 2, 3])
        nxt = torch.randint(0, 97, (4, 1))
        got = model(nxt, kv_cache=many)[:, 0]
    ref = torch.stack([model(torch.cat([prompt[0], nxt[i]])[None])[0, -1] for i in range(4)])
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    many.reset()
    assert many.lengths.tolist() == [0, 0, 0, 0]


def test_flops_and_param_counts():
    cfg = GPTConfig(sequence_len=64, vocab_size=100, n_layer=2, n_head=2, n_kv_head=1, n_embd=32, window_pattern="SL")
    model = GPT(cfg)
    C, D, kv = 32, 16, 16
    per_layer = C * C + 2 * C * kv + C * C + 2 * 4 * C * C
    assert model.num_params() == 100 * C * 2 + 2 * per_layer
    assert model.num_params(include_embedding=False) == 100 * C + 2 * per_layer
    attn = 12 * 2 * D * 16 + 12 * 2 * D * 64  # S layer sees 64//4 tokens, the last layer is L
    assert model.estimate_flops() == 6 * (100 * C + 2 * per_layer) + attn


def test_backward_reaches_every_parameter():
    model = tiny_model(**VARIANTS["gqa+window"]).train()
    idx = torch.randint(0, 97, (2, 16))
    model(idx, idx).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_bad_configs_name_the_setting():
    with pytest.raises(UsageError, match="n_kv_head"):
        GPTConfig(n_head=6, n_kv_head=4, n_embd=384)
    with pytest.raises(UsageError, match="window-pattern"):
        GPTConfig(window_pattern="SXL")
    with pytest.raises(UsageError, match="max_len"):
        KVCache(GPTConfig(sequence_len=8, n_layer=1, n_head=1, n_kv_head=1, n_embd=8), 1, 1000, "cpu")


@pytest.mark.filterwarnings("ignore")
def test_cuda_window_mask_for_flex_attention_matches_the_cpu_mask():
    # the CUDA training path uses FlexAttention with a block mask; check its mask_mod against the
    # boolean mask of the CPU path (FlexAttention's eager reference runs on CPU)
    from torch.nn.attention.flex_attention import flex_attention

    from chatforge.model.attention import _window_block_mask

    torch.manual_seed(0)
    B, H, Hkv, T, D, W = 2, 4, 2, 40, 16, 7
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, Hkv, T, D), torch.randn(B, Hkv, T, D)
    got = flex_attention(q, k, v, block_mask=_window_block_mask(T, W, torch.device("cpu")), enable_gqa=True)
    i = torch.arange(T)
    allowed = (i[None] <= i[:, None]) & (i[:, None] - i[None] < W)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_fused_qkv_inference_model_matches_the_trained_layout():
    """fuse_for_inference (one QKV matmul) gives the same logits, with and without a KV cache."""
    import copy

    from chatforge.model.gpt import GPT, GPTConfig, KVCache

    torch.manual_seed(0)
    config = GPTConfig(sequence_len=32, vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
    model = GPT(config)
    for p in model.parameters():  # the zero-init output projections would hide a wrong fusion
        torch.nn.init.normal_(p, std=0.05)
    fused = copy.deepcopy(model).fuse_for_inference()
    idx = torch.randint(0, 97, (2, 12))
    torch.testing.assert_close(fused(idx), model(idx), rtol=1e-5, atol=1e-5)
    cache_a, cache_b = KVCache(config, 2, 32, "cpu"), KVCache(config, 2, 32, "cpu")
    torch.testing.assert_close(fused(idx, kv_cache=cache_a), model(idx, kv_cache=cache_b), rtol=1e-5, atol=1e-5)
