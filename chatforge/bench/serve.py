"""`chatforge bench serve`: requests/s and time to first token of the server under concurrent load.

Starts `chatforge serve` (a separate process, so the clients never share its GIL) on a free
loopback port with a checkpoint from the base directory, then runs --requests streaming chat
requests from --concurrency client threads at once (each request a different short prompt,
greedy, --max-tokens long; stop tokens still end a reply, so replies may be shorter). Reported:

- requests/s: completed requests over the wall time of the whole run;
- TTFT p50 / p90: from sending a request to its first content chunk (queueing included);
- latency p50 / p90 and completion tokens/s over all requests (from the usage chunks).

    chatforge bench serve --source sft --concurrency 32 --requests 128 --max-tokens 128
    chatforge bench serve --device cpu --concurrency 4 --requests 8 --max-tokens 8   # CPU plumbing check

With --soak it runs the soak instead (bench/soak.py: clients that leave, abandon and misbehave for
--duration seconds, then slots, queue, connections and RSS before and after; exit 1 if one fails):

    chatforge bench serve --soak --duration 180 --concurrency 64 --max-tokens 128 --source sft
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from chatforge.errors import UsageError
from chatforge.runtime import print0

TOPICS = "the sky,a cat,rivers,prime numbers,bread,the moon,trains,music,chess,rain,maps,bees".split(",")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", default="sft", help="checkpoint stage to serve (default: sft)")
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: the most recent)")
    parser.add_argument("--device", default=None, help="passed to chatforge serve (default: auto)")
    parser.add_argument("--concurrency", type=int, default=32, help="clients streaming at once (default: 32)")
    parser.add_argument("--requests", type=int, default=128, help="requests in all (default: 128)")
    parser.add_argument("--max-tokens", type=int, default=128, help="reply length cap per request (default: 128)")
    parser.add_argument("--max-batch", type=int, default=32, help="the server's --max-batch (default: 32)")
    parser.add_argument("--continuous-batching", action="store_true", help="start the server with it")
    parser.add_argument("--start-timeout", type=float, default=300, help="seconds to wait for the server to start")
    parser.add_argument("--soak", action="store_true", help="run the soak instead (see bench/soak.py)")
    parser.add_argument("--duration", type=float, default=180, help="seconds the soak lasts (default: 180)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_request(port: int, index: int, max_tokens: int) -> dict:
    """One streaming request: TTFT, latency and completion tokens."""
    body = {"messages": [{"role": "user", "content": f"Tell me about {TOPICS[index % len(TOPICS)]} ({index})."}],
            "temperature": 0, "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True}}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    start = time.perf_counter()
    ttft, tokens = None, 0
    try:
        conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            raise RuntimeError(f"request {index}: HTTP {response.status}: {response.read()[:200]!r}")
        for raw in response:  # ends when the server closes the stream after [DONE]
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if ttft is None and any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                ttft = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    finally:
        conn.close()
    return {"ttft": ttft if ttft is not None else time.perf_counter() - start,
            "latency": time.perf_counter() - start, "tokens": tokens}


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)]


def _start_server(args, port: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "chatforge", "serve", "--source", args.source, "--port", str(port),
               "--max-batch", str(args.max_batch), "--max-queue", str(max(args.requests, 1))]
    if args.continuous_batching:
        command.append("--continuous-batching")
    if args.tag:
        command += ["--tag", args.tag]
    if args.device:
        command += ["--device", args.device]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + args.start_timeout
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
    raise UsageError("chatforge serve did not start; its output was:\n" + "".join(lines[-20:]).rstrip())


def _soak(port: int, args) -> int:
    from chatforge.bench.soak import print_report, run_soak

    print0(f"bench serve --soak: {args.concurrency} clients for {args.duration:g}s, max_tokens {args.max_tokens}, "
           f"source {args.source}, device {args.device or 'auto'}, max-batch {args.max_batch}")
    report = run_soak(f"http://127.0.0.1:{port}", clients=args.concurrency, duration=args.duration,
                      max_tokens=args.max_tokens)
    print_report(report)
    return 1 if report.failures() else 0


def main(args) -> int:
    for flag in ("concurrency", "requests", "max_tokens"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} {getattr(args, flag)} must be at least 1")
    port = _free_port()
    proc = _start_server(args, port)
    try:
        if args.soak:
            return _soak(port, args)
        _one_request(port, 0, args.max_tokens)  # warm up (CUDA graphs, allocator) outside the timing
        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=args.concurrency) as pool:
            results = list(pool.map(lambda i: _one_request(port, i, args.max_tokens), range(args.requests)))
        wall = time.perf_counter() - start
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    ttft = [r["ttft"] for r in results]
    latency = [r["latency"] for r in results]
    tokens = sum(r["tokens"] for r in results)
    print0(f"bench serve: {args.requests} requests, {args.concurrency} concurrent, max_tokens {args.max_tokens}, "
           f"source {args.source}, device {args.device or 'auto'}, max-batch {args.max_batch}, "
           f"continuous batching {'on' if args.continuous_batching else 'off'}")
    print0(f"{'requests/s':>12} {'TTFT p50':>10} {'TTFT p90':>10} {'lat p50':>9} {'lat p90':>9} {'tok/s':>9}")
    print0(f"{args.requests / wall:12.2f} {_percentile(ttft, 0.5) * 1e3:8.0f}ms {_percentile(ttft, 0.9) * 1e3:8.0f}ms "
           f"{_percentile(latency, 0.5):8.2f}s {_percentile(latency, 0.9):8.2f}s {tokens / wall:9.0f}")
    return 0
