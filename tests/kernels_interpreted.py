"""Checks of chatforge/model/decode_kernels.py run by tests/test_decode_kernels.py in a child process
with TRITON_INTERPRET=1 (Triton's interpreter runs the kernels on the CPU with numpy).

    TRITON_INTERPRET=1 python tests/kernels_interpreted.py gemv|attention|engine|bf16

Prints one JSON object with what the test asserts on.
"""

import json
import sys

import torch
import torch.nn.functional as F

from chatforge.model import decode_kernels as dk


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def check_gemv():
    gen = torch.Generator().manual_seed(0)
    errors = {}
    # N not a multiple of the row block, K one or several column blocks, with and without ReLU^2,
    # through the custom op and through each tile shape the GPU uses (gemv_config)
    for N, K, relu2 in [(37, 128, False), (300, 256, True), (40, 1024, False), (16, 4096, True)]:
        x = torch.randn(1, 1, K, generator=gen)
        w = torch.randn(N, K, generator=gen)
        ref = F.linear(x.double(), w.double())
        ref = F.relu(ref).square() if relu2 else ref
        y = dk.gemv(x, w, relu2)
        errors[f"{N}x{K}{'+relu2' if relu2 else ''}"] = [rel(y, ref), list(y.shape)]
        for config in [(1, 128, 2), (4, 256, 4), (1, 1024, 8)]:
            if K % config[1] == 0:
                y = dk.launch_gemv(x, w, relu2, config)
                errors[f"{N}x{K}{'+relu2' if relu2 else ''} tiles {config}"] = [rel(y, ref), list(y.shape)]
    return errors


def check_attention():
    gen = torch.Generator().manual_seed(1)
    out = {}
    # GQA (4 query heads on 2 kv heads), positions at chunk edges and the first slot, windows on and off
    for window in [1 << 30, 17, 1]:
        B, H, Hkv, D, L = 4, 4, 2, 32, 200
        kc, vc = torch.randn(B, Hkv, L, D, generator=gen), torch.randn(B, Hkv, L, D, generator=gen)
        q = torch.randn(B, H, D, generator=gen)
        k, v = torch.randn(B, Hkv, D, generator=gen), torch.randn(B, Hkv, D, generator=gen)
        pos = torch.tensor([0, 63, 64, 199])
        kc_ref, vc_ref = kc.clone(), vc.clone()
        for b in range(B):
            kc_ref[b, :, pos[b]], vc_ref[b, :, pos[b]] = k[b], v[b]
        y = dk.launch_decode_attention(q, k, v, kc, vc, pos, window, chunk=dk.CHUNK)  # the GPU's splits
        j = torch.arange(L)
        errs = []
        for b in range(B):
            allowed = (j <= pos[b]) & (pos[b] - j < window)
            kk = kc_ref[b].repeat_interleave(H // Hkv, 0).double()
            vv = vc_ref[b].repeat_interleave(H // Hkv, 0).double()
            ref = F.scaled_dot_product_attention(q[b][:, None].double(), kk, vv, attn_mask=allowed[None, None])
            errs.append(rel(y[b], ref[:, 0]))
        out[str(window)] = {"error": max(errs), "cache_written": bool(torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref))}
    return out


def check_engine():
    """Greedy tokens of the engine with the kernels equal those without, past the sliding window."""
    from chatforge.bench.infer import RandomVocabulary
    from chatforge.infer.engine import Engine
    from chatforge.model.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    config = GPTConfig(sequence_len=64, vocab_size=320, n_layer=2, n_head=2, n_kv_head=1, n_embd=128,
                       window_pattern="SL")  # window 16
    model = GPT(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 1.0 if "wte" in name else 0.1)
    model.eval()
    results = {}
    prompts = [[5, 9, 33, 2, 71], [100, 3, 3, 8, 12]]
    for kernels in ["none", "all"]:
        model.fuse_for_inference(kernels)
        engine = Engine(model, RandomVocabulary(320))
        one = engine.generate_batch(prompts[:1], max_tokens=24, temperature=0.0, use_tools=False, ignore_stops=True)
        two = engine.generate_batch(prompts, max_tokens=24, temperature=0.0, use_tools=False, ignore_stops=True)
        results[kernels] = {"kernels": sorted(model.kernels), "batch1": one[0].tokens, "batch2": [r.tokens for r in two]}
    return results


def check_bf16():
    """In bf16 the kernels' logits sit as close to an fp32 forward as torch's own bf16 path does:
    rounding, not a different function (greedy tokens of random models can still part ways)."""
    import copy

    from chatforge.model.gpt import GPT, GPTConfig, KVCache

    torch.manual_seed(0)
    config = GPTConfig(sequence_len=64, vocab_size=320, n_layer=2, n_head=2, n_kv_head=1, n_embd=128,
                       window_pattern="SL")
    model = GPT(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 1.0 if "wte" in name else 0.1)
    feed = [[(t * 37) % 300] for t in range(30)]  # 5 + 30 positions: past the 16-token window

    def logits(m, dtype):
        cache = KVCache(config, 1, 256, "cpu", dtype)
        with torch.inference_mode():
            m(torch.tensor([[5, 9, 33, 2, 71]]), kv_cache=cache)
            return torch.stack([m(torch.tensor([x]), kv_cache=cache)[0, -1].float() for x in feed])

    fp32 = logits(copy.deepcopy(model).eval().fuse_for_inference("none"), torch.float32)
    out = {}
    for kernels in ["none", "all"]:
        m = copy.deepcopy(model).to(torch.bfloat16).eval().fuse_for_inference(kernels)
        diff = (logits(m, torch.bfloat16) - fp32).abs()
        out[kernels] = {"max": diff.max().item(), "mean": diff.mean().item()}
    out["scale"] = fp32.abs().max().item()
    return out


if __name__ == "__main__":
    print(json.dumps({"gemv": check_gemv, "attention": check_attention, "engine": check_engine, "bf16": check_bf16}[sys.argv[1]]()))
