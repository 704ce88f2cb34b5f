"""`chatforge bench serve`: tokens/s and time to first token of the server under concurrent load,
beside the engine's own speed at the same batch, and where the server's time went.

Starts a server in a separate process (so the clients never share its GIL) on a free loopback
port: `chatforge serve` on a checkpoint (--source/--tag), or with --depth D a random-weight model
of that depth (bench/random_server.py: no checkpoint or tokenizer needed, every reply runs to
--max-new-tokens). For each --streams level it sends --requests streaming chat requests (a different
short prompt each, greedy, --max-new-tokens long) from that many clients at once. The clients are raw
sockets in several processes that only look for the first content chunk and the usage chunk, so
they stay cheap; the table says how much CPU they used, to show they were not the bottleneck.

Reported per level: requests/s; completion tokens/s over the run's wall time; the engine's own
decode tokens/s at batch = streams (`bench infer`'s measurement on the same model and prompts,
after the server has stopped; --no-engine-baseline skips it) and the server's share of it;
TTFT p50 / p90 (from sending a request to its first content chunk, queueing included); latency.
Then the server's time per phase over each level (its /health "timing" before and after), per
generated token and as a share of the wall time.

    chatforge bench serve --depth 20 --streams 1,8,32,128 --max-new-tokens 128 --compile on   # GPU, no checkpoint
    chatforge bench serve --source sft --streams 32 --requests 128 --max-new-tokens 128        # a checkpoint
    chatforge bench serve --depth 2 --vocab-size 512 --max-seq-len 256 --device cpu --streams 1,8 --max-new-tokens 32

With --soak it runs the soak instead (bench/soak.py: clients that leave, abandon and misbehave for
--duration seconds, then slots, queue, connections and RSS before and after; exit 1 if one fails):

    chatforge bench serve --soak --duration 180 --streams 64 --max-new-tokens 128 --source sft
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import re
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from chatforge.errors import UsageError
from chatforge.flags import add_compile_flag, add_flag
from chatforge.runtime import print0

TOPICS = "the sky,a cat,rivers,prime numbers,bread,the moon,trains,music,chess,rain,maps,bees".split(",")
FIRST_CONTENT = re.compile(rb'"content": "[^"]')  # the role chunk's content is ""
COMPLETION_TOKENS = re.compile(rb'"completion_tokens": (\d+)')
PROMPT_TOKENS = re.compile(rb'"prompt_tokens": (\d+)')
STREAMS_PER_CLIENT_PROCESS = 16


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", default="sft", help="checkpoint stage to serve (default: sft)")
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: the most recent)")
    parser.add_argument("--depth", type=int, default=None,
                        help="serve random weights of this depth instead of a checkpoint (speed only)")
    parser.add_argument("--vocab-size", type=int, default=32768, help="with --depth: the vocabulary size")
    add_flag(parser, "--max-seq-len", "--seq-len", type=int, default=2048, help="with --depth: the model's context")
    parser.add_argument("--device", default=None, help="passed to the server (default: auto)")
    add_flag(parser, "--streams", "--concurrency", default="32",
             help="clients streaming at once; a comma-separated list runs each level (default: 32)")
    parser.add_argument("--requests", type=int, default=None,
                        help="requests per level (default: 4 x streams, at least 16)")
    add_flag(parser, "--max-new-tokens", "--max-tokens", type=int, default=128,
             help="reply length cap per request (default: 128)")
    parser.add_argument("--max-batch", type=int, default=None,
                        help="the server's --max-batch (default: the largest --streams, at least 32)")
    parser.add_argument("--scheduling", choices=("continuous", "batch"), default="continuous",
                        help="the server's scheduling (default: continuous)")
    parser.add_argument("--continuous-batching", dest="scheduling", action="store_const", const="continuous",
                        help=argparse.SUPPRESS)  # the default now; older command lines still run
    parser.add_argument("--engine", choices=("process", "thread"), default="process",
                        help="the server's --engine: its decode loop in a process of its own (default) or a thread")
    add_compile_flag(parser, "the decode step", auto="on with --depth on CUDA, else off")
    parser.add_argument("--engine-baseline", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the engine alone at each batch (default: on)")
    parser.add_argument("--client-processes", type=int, default=None,
                        help=f"processes the clients run in (default: one per {STREAMS_PER_CLIENT_PROCESS} streams)")
    parser.add_argument("--start-timeout", type=float, default=600, help="seconds to wait for the server to start")
    parser.add_argument("--long-prompt", type=int, default=0, metavar="WORDS",
                        help="also send one prompt of about this many words a third of the way into each level, and "
                             "report how long the running streams then went without a token (0: off)")
    parser.add_argument("--soak", action="store_true", help="run the soak instead (see bench/soak.py)")
    parser.add_argument("--duration", type=float, default=180, help="seconds the soak lasts (default: 180)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _messages(index: int) -> list[dict]:
    return [{"role": "user", "content": f"Tell me about {TOPICS[index % len(TOPICS)]} ({index})."}]


def _one_request(port: int, index: int, max_tokens: int, messages: list[dict] | None = None) -> dict:
    """One streaming request over a raw socket: TTFT, latency, completion and prompt tokens, and
    when each piece of the reply arrived (the gaps a running stream sees)."""
    body = json.dumps({"messages": messages or _messages(index), "temperature": 0, "max_tokens": max_tokens,
                       "stream": True, "stream_options": {"include_usage": True}}).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    start = time.perf_counter()
    ttft, seen, tail, arrivals = None, b"", b"", []
    with socket.create_connection(("127.0.0.1", port), timeout=600) as sock:
        sock.sendall(head + body)
        while True:
            chunk = sock.recv(1 << 16)
            if not chunk:
                break
            if not seen:
                seen = chunk[:64]
            if ttft is None and FIRST_CONTENT.search(tail + chunk):
                ttft = time.perf_counter() - start
            if ttft is not None:
                arrivals.append(time.perf_counter())
            tail = (tail + chunk)[-512:]  # the usage chunk is among the last bytes
    end = time.perf_counter()
    if not seen.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"request {index}: {seen.splitlines()[0] if seen else b'no answer'!r}")
    counts, prompt = COMPLETION_TOKENS.findall(tail), PROMPT_TOKENS.findall(tail)
    return {"ttft": ttft if ttft is not None else end - start, "latency": end - start,
            "tokens": int(counts[-1]) if counts else 0, "prompt_tokens": int(prompt[-1]) if prompt else 0,
            "start": start, "end": end, "arrivals": arrivals}


def _client_process(port: int, indices: list[int], streams: int, max_tokens: int) -> tuple[list[dict], float]:
    """Requests `indices` from `streams` threads; (results, this process's CPU seconds)."""
    cpu = time.process_time()
    with ThreadPoolExecutor(max_workers=streams) as pool:
        results = list(pool.map(lambda i: _one_request(port, i, max_tokens), indices))
    return results, time.process_time() - cpu


def _run_level(port: int, streams: int, requests: int, max_tokens: int, processes: int) -> dict:
    processes = max(1, min(processes, streams))
    shares = [(list(range(p, requests, processes)), streams // processes + (p < streams % processes))
              for p in range(processes)]
    ctx = multiprocessing.get_context("fork")  # the clients need nothing but sockets; forking is instant
    work = [(port, idx, s, max_tokens) for idx, s in shares if idx]
    processes = len(work)  # the client-CPU share counts only processes that had requests
    with ctx.Pool(processes) as pool:
        outs = pool.starmap(_client_process, work)
    results = [r for rs, _ in outs for r in rs]
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    return dict(streams=streams, requests=requests, wall=wall, tokens=tokens, client_cpu=sum(c for _, c in outs),
                processes=processes, ttft=[r["ttft"] for r in results], latency=[r["latency"] for r in results],
                results=results)


def _long_prompt_messages(words: int) -> list[dict]:
    text = " ".join(TOPICS[i % len(TOPICS)] for i in range(words))
    return [{"role": "user", "content": f"Summarize this: {text}"}]


def _with_long_prompt(port: int, streams: int, requests: int, max_tokens: int, processes: int, words: int,
                      after: float) -> dict:
    """A level with one long prompt sent `after` seconds in, while the streams run: the level's
    figures, plus the long request and how long the running streams went without a token while
    it was prefilled."""
    long = {}

    def send():
        time.sleep(after)
        try:
            long.update(_one_request(port, -1, 1, _long_prompt_messages(words)))
        except RuntimeError as exc:  # e.g. a 400: longer than the model's context
            long["error"] = str(exc)

    sender = threading.Thread(target=send)
    sender.start()
    run = _run_level(port, streams, requests, max_tokens, processes)
    sender.join()
    if "error" in long:
        raise UsageError(f"--long-prompt {words}: the long request failed ({long['error']}); use fewer words")
    t0, t1 = long["start"], long["start"] + long["ttft"]
    stalls, gaps, waiting = [], [], 0
    for r in run["results"]:
        times = r["arrivals"]
        mine = [b - a for a, b in zip(times, times[1:]) if a < t1 and b > t0]  # waiting while it was prefilled
        gaps += [b - a for a, b in zip(times, times[1:])]
        stalls += mine
        waiting += bool(mine)
    run["long_prompt"] = dict(prompt_tokens=long["prompt_tokens"], ttft=long["ttft"],
                              worst_gap=max(stalls, default=0.0), median_gap=_percentile(gaps, 0.5) if gaps else 0.0,
                              streams_waiting=waiting)
    return run


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)]


def _timing(port: int) -> dict:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(1 << 16):
            data += chunk
    return json.loads(data.partition(b"\r\n\r\n")[2]).get("timing", {})


def _server_command(args, port: int, max_batch: int, max_queue: int) -> list[str]:
    common = ["--port", str(port), "--max-batch", str(max_batch), "--max-queue", str(max_queue),
              "--scheduling", args.scheduling, "--engine", args.engine]
    if args.device:
        common += ["--device", args.device]
    if args.depth is not None:
        return [sys.executable, "-m", "chatforge.bench.random_server", "--depth", str(args.depth), "--vocab-size",
                str(args.vocab_size), "--max-seq-len", str(args.max_seq_len), "--compile", args.compile, *common]
    command = [sys.executable, "-m", "chatforge", "serve", "--source", args.source, *common]
    if args.tag:
        command += ["--tag", args.tag]
    return command + ["--compile", "on" if args.compile == "on" else "off"]


def _start_server(command: list[str], timeout: float) -> subprocess.Popen:
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + timeout
    lines = []
    for line in proc.stdout:  # bounded: the server prints "listening on" or exits
        lines.append(line)
        if "listening on" in line:
            # keep draining its log (one line per request) so the pipe never fills up
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
            return proc
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise UsageError("the server did not start; its output was:\n" + "".join(lines[-20:]).rstrip())


def engine_baseline(args, levels: list[int]) -> dict[int, float]:
    """The engine's decode tokens/s at batch = each level, on the model the server ran and the
    bench's own prompts (`bench infer`'s measurement: every row generates --max-new-tokens)."""
    from chatforge.bench.infer import time_generate
    from chatforge.conversation import render_for_completion
    from chatforge.infer.engine import Engine
    from chatforge.runtime import init_runtime

    rt = init_runtime(args.device, None, announce=False)
    if args.depth is not None:
        from chatforge.bench.random_server import random_engine
        engine = random_engine(argparse.Namespace(**vars(args), dtype=None))
    else:
        engine = Engine.from_checkpoint(args.source, tag=args.tag, device=rt.device, compile=args.compile == "on")
    kw = dict(max_tokens=args.max_new_tokens, temperature=0.0, use_tools=False, ignore_stops=True)
    speeds = {}
    for B in levels:
        prompts = [render_for_completion(engine.tokenizer, {"messages": _messages(i)}) for i in range(B)]
        _, step_time, _, _ = time_generate(engine, prompts, kw, rt)
        speeds[B] = B / step_time
    return speeds


def _levels(text: str) -> list[int]:
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        levels = []
    if not levels or min(levels) < 1:
        raise UsageError(f"--streams {text!r} must be positive integers separated by commas, e.g. 1,8,32,128")
    return levels


def _soak(port: int, args, clients: int, max_batch: int) -> int:
    from chatforge.bench.soak import print_report, run_soak

    print0(f"bench serve --soak: {clients} clients for {args.duration:g}s, max_tokens {args.max_new_tokens}, "
           f"source {args.source}, device {args.device or 'auto'}, max-batch {max_batch}")
    import torch

    on_gpu = args.device != "cpu" and torch.cuda.is_available()  # the server runs on this machine
    report = run_soak(f"http://127.0.0.1:{port}", clients=clients, duration=args.duration,
                      max_tokens=args.max_new_tokens, exact_replies=not on_gpu)
    print_report(report)
    return 1 if report.failures() else 0


def main(args) -> int:
    levels = _levels(args.streams)
    for flag in ("requests", "max_new_tokens", "max_batch", "client_processes"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} {getattr(args, flag)} must be at least 1")
    if args.long_prompt < 0:
        raise UsageError(f"--long-prompt {args.long_prompt} must be 0 (off) or a number of words")
    max_batch = args.max_batch or max(32, *levels)
    requests = {s: args.requests or max(16, 4 * s) for s in levels}
    port = _free_port()
    proc = _start_server(_server_command(args, port, max_batch, max(requests.values())), args.start_timeout)
    runs = []
    try:
        if args.soak:
            return _soak(port, args, max(levels), max_batch)
        warm = _run_level(port, 1, 1, args.max_new_tokens, 1)  # warm up (CUDA graphs, allocator) outside the timing
        for s in levels:
            processes = args.client_processes or math.ceil(s / STREAMS_PER_CLIENT_PROCESS)
            before = _timing(port)
            processes = min(processes, max(1, os.cpu_count() // 2))
            if args.long_prompt:
                # a third of the way into the level, going by how long one request took alone
                after = max(0.05, warm["latency"][0] * requests[s] / s / 3)
                run = _with_long_prompt(port, s, requests[s], args.max_new_tokens, processes, args.long_prompt, after)
            else:
                run = _run_level(port, s, requests[s], args.max_new_tokens, processes)
            after = _timing(port)
            run["timing"] = {k: {"s": v["s"] - before.get(k, {}).get("s", 0.0), "n": v["n"] - before.get(k, {}).get("n", 0)}
                             for k, v in after.items()}
            runs.append(run)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    baseline = engine_baseline(args, levels) if args.engine_baseline else {}
    model = f"random weights depth {args.depth}" if args.depth is not None else f"source {args.source}"
    print0(f"bench serve: {model}, device {args.device or 'auto'}, max_tokens {args.max_new_tokens}, "
           f"max-batch {max_batch}, scheduling {args.scheduling}, compile {args.compile}, engine {args.engine}")
    print0("| streams | requests | req/s | tok/s | engine tok/s | server/engine | TTFT p50 / p90 | latency p50 | "
           "client CPU |")
    print0("|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        tok_s = r["tokens"] / r["wall"]
        engine = baseline.get(r["streams"])
        ratio = f"{100 * tok_s / engine:.0f}%" if engine else "n/a"
        engine_text = f"{engine:,.0f}" if engine else "n/a"
        print0(f"| {r['streams']} | {r['requests']} | {r['requests'] / r['wall']:.2f} | {tok_s:,.0f} | {engine_text} | "
               f"{ratio} | {_percentile(r['ttft'], 0.5) * 1e3:,.0f} / {_percentile(r['ttft'], 0.9) * 1e3:,.0f} ms | "
               f"{_percentile(r['latency'], 0.5):.2f} s | {100 * r['client_cpu'] / (r['wall'] * r['processes']):.0f}% "
               f"of {r['processes']} |")
    for r in runs:
        if "long_prompt" in r:
            lp = r["long_prompt"]
            print0(f"long prompt at {r['streams']} streams: {lp['prompt_tokens']:,} prompt tokens, first token in "
                   f"{lp['ttft'] * 1e3:,.0f} ms; the {lp['streams_waiting']} running streams waiting meanwhile went "
                   f"at most {lp['worst_gap'] * 1e3:,.0f} ms without a token (median gap {lp['median_gap'] * 1e3:.1f} ms)")
    for r in runs:
        print0(f"\nwhere the server's time went at {r['streams']} streams ({r['tokens']:,} tokens in {r['wall']:.2f} s; "
               "phases of different threads overlap):")
        print0("| phase | seconds | µs per token | share of wall |")
        print0("|---|---|---|---|")
        for name, v in sorted(r["timing"].items(), key=lambda kv: -kv[1]["s"]):
            if v["n"] > 0:
                print0(f"| {name} | {v['s']:.3f} | {1e6 * v['s'] / max(r['tokens'], 1):.1f} | "
                       f"{100 * v['s'] / r['wall']:.0f}% |")
    return 0
