"""`chatforge bench tools`: what the Python tool costs, alone and inside a decoding batch.

Two tables:

1. The sandbox: latency of calculator-sized calls one after another (p50/p90/p99, the figure a row
   that calls the tool waits), and calls/s with many in flight at once.
2. Decoding with tool calls: random weights (as `bench infer`), B rows each generating --max-new-tokens
   tokens; in --tool-rate of the rows the model is made to write one calculator call at a random
   point of its reply (its logits are biased toward the call's tokens, so the step costs what a real
   one does), the engine runs it in the sandbox and forces the output in, as for a trained model. The
   same batch without calls is the reference: the ratio is what tool use costs the batch.

    chatforge bench tools --depth 12 --batch-size 128 --tool-rate 0.3 --compile on   # one GPU
    chatforge bench tools --depth 2 --batch-size 8 --max-new-tokens 64 --max-seq-len 256 --prompt-len 32 \\
        --vocab-size 512 --device cpu                                                 # a CPU run
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from chatforge.bench.infer import RandomVocabulary, random_model
from chatforge.errors import UsageError
from chatforge.flags import add_compile_flag, add_flag
from chatforge.infer.engine import Engine
from chatforge.infer.sandbox import sandbox_status, shared
from chatforge.model.scaling import derive
from chatforge.runtime import add_runtime_arguments, init_runtime, print0

CALL = "(123457 * 654321 + 98765) % 1000003"  # a GSM8K-calculator-sized program


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--calls", type=int, default=200, help="sandbox calls timed one after another")
    parser.add_argument("--depth", type=int, default=12, help="model depth (the scaling dial)")
    parser.add_argument("--batch-size", type=int, default=128, help="rows decoding together")
    parser.add_argument("--tool-rate", type=float, default=0.3, help="share of rows that call the tool once")
    parser.add_argument("--prompt-len", type=int, default=128, help="tokens per prompt")
    add_flag(parser, "--max-new-tokens", "--new-tokens", type=int, default=256, help="tokens generated per row")
    parser.add_argument("--vocab-size", type=int, default=32768)
    add_flag(parser, "--max-seq-len", "--seq-len", type=int, default=2048, help="the model's context length")
    add_compile_flag(parser, "the decode step", "off (on compiles on CUDA only)")
    add_runtime_arguments(parser)


class ScriptedCalls(torch.nn.Module):
    """A model that writes `<|python_start|> CALL <|python_end|>` where `script` says so.

    script[b, p] is the token row b must produce at position p (-1: whatever the model likes). After
    the real forward, the scripted token gets a large bias and the special tokens a large penalty, so
    free positions never start a call or end a reply by chance. All on the device: CUDA-graph safe."""

    def __init__(self, model, rows: int, max_len: int, first_special: int):
        super().__init__()
        self.model, self.config, self.first_special = model, model.config, first_special
        # filled in place between runs: the compiled step and its CUDA graph keep reading this storage
        self.register_buffer("script", torch.full((rows, max_len), -1, dtype=torch.long,
                                                  device=next(model.parameters()).device), persistent=False)

    def forward(self, idx, kv_cache=None, logits_at=None):
        logits = self.model(idx, kv_cache=kv_cache, logits_at=logits_at)
        if idx.shape[1] != 1 or self.script.shape[0] != idx.shape[0]:
            return logits  # prefill: the first token is always free
        at = kv_cache.lengths.clamp(max=self.script.shape[1] - 1)[:, None]  # the position being sampled
        want = self.script.gather(1, at)  # (B, 1)
        last = logits[:, -1]
        last[:, self.first_special:] -= 1e4
        last.scatter_add_(1, want.clamp(min=0), (want >= 0).to(last.dtype) * 2e4)
        return logits


def sandbox_latency(calls: int) -> dict:
    box = shared()
    box.run("1")  # start the helper
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        result = box.run(CALL)
        times.append(time.perf_counter() - start)
        if not result.ok:
            raise UsageError(f"the sandbox failed a plain call ({result.error}); see `chatforge env`")
    times.sort()
    pick = lambda q: 1000 * times[min(len(times) - 1, int(q * len(times)))]  # noqa: E731
    burst = 4 * box.max_parallel
    start = time.perf_counter()
    for future in [box.submit(CALL) for _ in range(burst)]:
        future.result()
    return {"p50_ms": pick(0.5), "p90_ms": pick(0.9), "p99_ms": pick(0.99),
            "parallel": box.max_parallel, "calls_per_s": burst / (time.perf_counter() - start)}


def decode_with_tools(engine, scripted, B: int, rate: float, prompt_len: int, new_tokens: int, vocab) -> dict:
    call = [vocab.special_id("<|python_start|>"), *vocab.encode(CALL), vocab.special_id("<|python_end|>")]
    rng = random.Random(0)
    callers = sorted(rng.sample(range(B), round(rate * B)))
    script = torch.full((B, scripted.script.shape[1]), -1, dtype=torch.long)
    for b in callers:
        at = prompt_len + rng.randint(1, max(1, new_tokens // 2 - len(call)))
        script[b, at:at + len(call)] = torch.tensor(call)
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, 256, (B, prompt_len), generator=gen).tolist()
    kw = dict(max_tokens=new_tokens, temperature=1.0, top_k=50, ignore_stops=True, seed=0)
    out = {}
    for name, use in (("no tools", torch.full_like(script, -1)), ("tools", script)):
        scripted.script.copy_(use)
        for i, _ in enumerate(engine.generate(prompts, **kw)):  # warm-up: compile and graph capture
            if i == 2:
                break
        engine.tool_stats.update(calls=0, blocked_s=0.0)
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        results = engine.generate_batch(prompts, **kw)
        seconds = time.perf_counter() - start
        tokens = sum(len(r.tokens) for r in results)
        out[name] = {"tokens_per_s": tokens / seconds, "seconds": seconds, "calls": engine.tool_stats["calls"],
                     "blocked_s": engine.tool_stats["blocked_s"]}
    if out["tools"]["calls"] != len(callers):
        raise RuntimeError(f"{len(callers)} rows were scripted to call the tool but {out['tools']['calls']} did")
    return out


def main(args: argparse.Namespace) -> dict:
    if not 0 <= args.tool_rate <= 1:
        raise UsageError(f"--tool-rate {args.tool_rate} must be between 0 and 1")
    if args.batch_size < 1 or args.calls < 1 or args.max_new_tokens < 2 * len(CALL) or args.prompt_len < 1:
        raise UsageError(f"--batch-size and --calls must be positive, --prompt-len at least 1 and --max-new-tokens "
                         f"at least {2 * len(CALL)} (room for a call in the first half of a reply)")
    if args.prompt_len + args.max_new_tokens + 64 > args.max_seq_len:
        raise UsageError(f"--prompt-len + --max-new-tokens (+64 for the tool's output) exceed --max-seq-len "
                         f"{args.max_seq_len}")
    ok, line = sandbox_status()
    print0(f"bench tools: sandbox {line}")
    if not ok:
        raise UsageError("the Python tool is off on this machine; nothing to measure")
    latency = sandbox_latency(args.calls)
    rt = init_runtime(args.device, args.dtype, seed=0)
    cuda = rt.device.type == "cuda"
    s = derive(args.depth, sequence_len=args.max_seq_len, vocab_size=args.vocab_size)
    vocab = RandomVocabulary(args.vocab_size)
    scripted = ScriptedCalls(random_model(s.model_config(), rt), args.batch_size, args.max_seq_len + 1,
                             vocab.first_special)
    engine = Engine(scripted, vocab, rt.device, rt.dtype, compile=args.compile == "on" and cuda)
    decode = decode_with_tools(engine, scripted, args.batch_size, args.tool_rate, args.prompt_len,
                               args.max_new_tokens, vocab)
    device = torch.cuda.get_device_name(rt.device) if cuda else "CPU"
    print0(f"{device}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    print0("| sandbox | p50 | p90 | p99 | calls/s with many in flight |")
    print0("|---|---|---|---|---|")
    print0(f"| one call at a time | {latency['p50_ms']:.1f} ms | {latency['p90_ms']:.1f} ms | "
           f"{latency['p99_ms']:.1f} ms | {latency['calls_per_s']:,.0f} ({latency['parallel']} at once) |")
    base, tools = decode["no tools"], decode["tools"]
    print0(f"| decode, depth {s.depth}, batch {args.batch_size}, {args.max_new_tokens} new tokens | tokens/s | "
           "tool calls | host blocked on tools |")
    print0("|---|---|---|---|")
    print0(f"| no tool calls | {base['tokens_per_s']:,.0f} | 0 | - |")
    print0(f"| calls in {100 * args.tool_rate:.0f}% of rows | {tools['tokens_per_s']:,.0f} "
           f"({100 * tools['tokens_per_s'] / base['tokens_per_s']:.0f}% of no calls) | {tools['calls']} | "
           f"{100 * tools['blocked_s'] / tools['seconds']:.0f}% of the time |")
    return {"sandbox": latency, "decode": decode, "device": device}
