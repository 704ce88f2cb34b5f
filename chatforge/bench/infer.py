"""`chatforge bench infer`: time to first token, decode speed and memory-bandwidth use of the engine.

Random weights and random prompts (no checkpoint, no tokenizer needed): each batch size gets B
different prompts of --prompt-len tokens, and every row generates exactly --max-new-tokens tokens
(stop tokens are ignored, the tool is off). Reported per batch size:

- TTFT: from the call until every row has its first token (prefill of all B prompts included);
- decode ms/step and tok/s = B / step time (the figure nanochat's numbers in REFERENCE.md use);
- bandwidth: the bytes a decode step must read (weights once, plus the K/V of the tokens each row
  actually has, on average prompt + new/2) over the step time, as a fraction of the GPU's peak
  memory bandwidth. At batch 1 decoding is bound by that read, so this says how close to the
  physical limit we are. (The engine's masked attention reads the whole static cache, so the real
  traffic is somewhat higher than the bytes counted here.)

    chatforge bench infer --depth 20                         # prompt 512, 256 new, batch 1,8,32,128
    chatforge bench infer --depth 20 --compile on            # CUDA graph around a compiled step

--compile on fuses the small element-wise kernels between the products (norms, rotary, residuals);
without it they run as eager kernels inside the same CUDA graph. The Triton decode kernels are used
either way where Triton is installed (CHATFORGE_DECODE_KERNELS=none to compare against cuBLAS/cuDNN).
    chatforge bench infer --depth 2 --head-dim 32 --vocab-size 512 --max-seq-len 128 --prompt-len 16 \\
        --max-new-tokens 8 --batch-sizes 1,2 --device cpu        # a CPU check of the plumbing
"""

from __future__ import annotations

import argparse
import time

import torch

from chatforge.errors import UsageError
from chatforge.flags import add_compile_flag, add_flag
from chatforge.infer.engine import Engine
from chatforge.model.gpt import GPT
from chatforge.model.scaling import derive
from chatforge.runtime import add_runtime_arguments, init_runtime, print0
from chatforge.tokenizer import SPECIAL_TOKENS

# peak HBM bandwidth in bytes/s by GPU name fragment (SXM parts)
PEAK_BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12, "H800": 3.35e12, "GH200": 4.0e12, "A100": 2.0e12,
                  "B200": 8.0e12, "L40S": 0.864e12, "4090": 1.0e12}


def peak_bandwidth(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BANDWIDTH.items() if k in name), None)


class RandomVocabulary:
    """What the engine needs of a tokenizer when the weights are random: the size and the special ids
    (the top of the vocabulary, as in the real tokenizer). Ids below 256 stand for bytes, so tool code
    and tool output (bench tools) can be decoded and encoded."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.first_special = vocab_size - len(SPECIAL_TOKENS)

    def special_id(self, name: str) -> int:
        return self.first_special + SPECIAL_TOKENS.index(name)

    def is_special(self, token_id: int) -> bool:
        return token_id >= self.first_special

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", "replace")


def random_model(config, rt) -> GPT:
    """A GPT with random weights in the compute dtype, fused for inference, as a checkpoint would load."""
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=rt.device)
    model.init_weights()
    with torch.no_grad():  # init zeroes the output projections; time on data that looks like a trained model's
        for block in model.transformer.h:
            for lin in (block.attn.c_proj, block.mlp.c_proj):
                lin.weight.normal_(0.0, 0.02)
    model.to(dtype=rt.dtype).eval()  # inference weights in the compute dtype (bf16 on modern GPUs)
    return model.fuse_for_inference()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--depth", type=int, default=20, help="model depth (the scaling dial)")
    parser.add_argument("--prompt-len", type=int, default=512, help="tokens per prompt")
    add_flag(parser, "--max-new-tokens", "--new-tokens", type=int, default=256, help="tokens generated per row")
    parser.add_argument("--batch-sizes", default="1,8,32,128", help="comma-separated rows per batch")
    parser.add_argument("--vocab-size", type=int, default=32768)
    add_flag(parser, "--max-seq-len", "--seq-len", type=int, default=2048, help="the model's context length")
    parser.add_argument("--head-dim", type=int, default=None, help="attention head size (default 128)")
    parser.add_argument("--n-kv-head", type=int, default=None, help="key/value heads for GQA (default: all)")
    parser.add_argument("--window-pattern", default="L", help="S/L per layer, e.g. SSSL")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0 = greedy)")
    parser.add_argument("--top-k", type=int, default=50, help="top-k filter while sampling")
    add_compile_flag(parser, "the decode step", "off (on compiles on CUDA only; see the module docstring)")
    parser.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=True,
                        help="capture the decode step in a CUDA graph (CUDA only; default on)")
    parser.add_argument("--profile", action="store_true",
                        help="also time the decode step alone on the GPU, to separate host overhead")
    add_runtime_arguments(parser)


def _batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise UsageError(f"--batch-sizes {text!r} must be positive integers separated by commas, e.g. 1,8,32")
    return sizes


def main(args: argparse.Namespace) -> list[dict]:
    sizes = _batch_sizes(args.batch_sizes)
    if args.prompt_len < 1 or args.max_new_tokens < 2:
        raise UsageError("--prompt-len must be at least 1 and --max-new-tokens at least 2")
    if args.prompt_len + args.max_new_tokens > args.max_seq_len:
        raise UsageError(f"--prompt-len {args.prompt_len} + --max-new-tokens {args.max_new_tokens} exceed "
                         f"--max-seq-len {args.max_seq_len}; raise --max-seq-len or ask for fewer tokens")
    rt = init_runtime(args.device, args.dtype, seed=0)
    cuda = rt.device.type == "cuda"
    s = derive(args.depth, sequence_len=args.max_seq_len, vocab_size=args.vocab_size, head_dim=args.head_dim,
               n_kv_head=args.n_kv_head, window_pattern=args.window_pattern)
    config = s.model_config()
    engine = Engine(random_model(config, rt), RandomVocabulary(args.vocab_size), rt.device, rt.dtype,
                    compile=args.compile == "on" and cuda, cuda_graph=args.cuda_graph and cuda)
    elem = torch.finfo(rt.dtype).bits // 8
    weight_bytes = (s.num_params - config.vocab_size * config.n_embd) * elem  # the embedding is a lookup
    kv_per_token = 2 * config.n_layer * config.n_kv_head * config.head_dim * elem
    bandwidth = peak_bandwidth(rt.device)
    device_name = torch.cuda.get_device_name(rt.device) if cuda else rt.device.type
    print0(f"bench infer: depth {s.depth}, {s.num_params / 1e6:.1f}M params, vocab {config.vocab_size}, "
           f"prompt {args.prompt_len}, {args.max_new_tokens} new tokens, {str(rt.dtype).replace('torch.', '')}, "
           f"compile {engine.compile}, cuda graph {engine.cuda_graph}, on {device_name}")
    gen = torch.Generator().manual_seed(0)
    kw = dict(max_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, use_tools=False,
              ignore_stops=True, seed=0)
    results = []
    for B in sizes:
        prompts = torch.randint(0, engine.tokenizer.first_special, (B, args.prompt_len), generator=gen).tolist()
        try:
            ttft, step_time, steps, total = time_generate(engine, prompts, kw, rt)
        except torch.OutOfMemoryError:
            raise UsageError(f"out of GPU memory at batch {B}; leave it out of --batch-sizes") from None
        gpu_step = _time_decode_step(engine, args.prompt_len) if args.profile and cuda else None
        bytes_per_step = weight_bytes + kv_per_token * B * (args.prompt_len + args.max_new_tokens / 2)
        frac = bytes_per_step / step_time / bandwidth if bandwidth else None
        results.append(dict(batch=B, ttft_s=ttft, decode_ms_per_step=1000 * step_time, tokens_per_s=B / step_time,
                            end_to_end_tokens_per_s=B * steps / total, bandwidth_fraction=frac,
                            depth=s.depth, params=s.num_params, device=device_name, gpu_step_ms=gpu_step))
    print0(f"{device_name}, torch {torch.__version__}")
    print0("| batch | TTFT | decode ms/step | tok/s | tok/s incl. prefill | bandwidth used |")
    print0("|---|---|---|---|---|---|")
    for r in results:
        frac = f"{100 * r['bandwidth_fraction']:.0f}%" if r["bandwidth_fraction"] is not None else "n/a"
        print0(f"| {r['batch']} | {1000 * r['ttft_s']:.1f} ms | {r['decode_ms_per_step']:.2f} | "
               f"{r['tokens_per_s']:,.0f} | {r['end_to_end_tokens_per_s']:,.0f} | {frac} |")
    if args.profile and cuda:
        print0("decode step on the GPU alone (graph replays back to back, sampling included, no host work): " +
               ", ".join(f"batch {r['batch']} {r['gpu_step_ms']:.2f} ms" for r in results))
    return results


def time_generate(engine, prompts: list[list[int]], kw: dict, rt) -> tuple[float, float, int, float]:
    """(first-token seconds, decode seconds per step, steps, total seconds) of one `generate` call,
    after a short warm-up call (compile and graph capture stay out of the figures)."""
    for i, _ in enumerate(engine.generate(prompts, **kw)):
        if i == 2:
            break
    rt.synchronize()
    start = time.perf_counter()
    first = None
    steps = 0
    for _ in engine.generate(prompts, **kw):
        steps += 1
        if first is None:
            first = time.perf_counter()
    rt.synchronize()
    end = time.perf_counter()
    return first - start, (end - first) / (steps - 1), steps, end - start


@torch.inference_mode()
def _time_decode_step(engine, prompt_len: int, reps: int = 50) -> float:
    """Milliseconds per decode step (forward and sampling) with the host out of the way: the gap to
    ms/step is what the host adds."""
    _, cache, _, _, _, steps = engine._decoder
    step_fn = next(iter(steps.values()))
    cache.lengths.fill_(prompt_len)
    step_fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    cache.lengths.fill_(prompt_len)
    start.record()
    for _ in range(reps):
        step_fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps
