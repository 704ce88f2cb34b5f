"""The server `chatforge bench serve --depth D` measures: random weights, no checkpoint needed.

A speed measurement needs the model's shape, not its knowledge: this builds a random-weight GPT of
the given depth (as `bench infer` does), a stand-in vocabulary whose ids decode to short words (so
the server detokenizes and streams as much text as with a real tokenizer), and serves it with the
same `WorkerPool`, app and connection guard (serve/guard.py) as `chatforge serve`. The special
tokens' output weights are zeroed, so their logits sit below the best word and every greedy reply
runs to its max_tokens.

Started by bench/serve.py in its own process; it prints "listening on" once it serves:

    python -m chatforge.bench.random_server --depth 20 --port 8123 --max-batch 128 --compile on
"""

from __future__ import annotations

import argparse

import torch

from chatforge.bench.infer import RandomVocabulary, random_model
from chatforge.flags import add_compile_flag, add_flag
from chatforge.infer.engine import Engine
from chatforge.model.scaling import derive
from chatforge.runtime import add_runtime_arguments, init_runtime

SYLLABLES = ("ka", "lo", "mi", "ne", "ru", "ta", "vo", "zi", "pe", "su", "do", "ha", "bi", "fu", "ge", "wa")


class WordVocabulary(RandomVocabulary):
    """Ids below 256 are bytes (prompts are encoded as UTF-8); each other ordinary id is a word of
    two or three syllables with a leading space, about as long as a real token's text."""

    def decode(self, ids: list[int]) -> str:
        out = []
        for i in ids:
            if i < 256:
                out.append(chr(i) if i < 128 else "?")
            elif i < self.first_special:
                word = SYLLABLES[i % 16] + SYLLABLES[(i >> 4) % 16] + (SYLLABLES[(i >> 8) % 16] if i & 1 else "")
                out.append(" " + word)
        return "".join(out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--depth", type=int, required=True, help="model depth (the scaling dial)")
    parser.add_argument("--vocab-size", type=int, default=32768)
    add_flag(parser, "--max-seq-len", "--seq-len", type=int, default=2048, help="the model's context length")
    add_compile_flag(parser, "the decode step", auto="on on CUDA")


def random_engine(args) -> Engine:
    rt = init_runtime(args.device, args.dtype, seed=0, announce=False)
    cuda = rt.device.type == "cuda"
    if rt.device.type == "cpu":
        torch.set_num_threads(1)  # a near-free forward: OpenMP's spinning threads only add noise on shared cores
    config = derive(args.depth, sequence_len=args.max_seq_len, vocab_size=args.vocab_size).model_config()
    model = random_model(config, rt)
    vocab = WordVocabulary(args.vocab_size)
    with torch.no_grad():
        model.lm_head.weight[vocab.first_special:] = 0.0
    compile_ = args.compile == "on" or (args.compile == "auto" and cuda)
    return Engine(model, vocab, rt.device, rt.dtype, compile=compile_ and cuda)


def random_replica(args, index: int) -> Engine:
    """The engine process's recipe (module level, so it pickles): one replica of random weights."""
    return random_engine(args)


def main(argv=None) -> int:
    from functools import partial

    from chatforge.serve.app import Limits, create_app
    from chatforge.serve.command import bind_port, run_server
    from chatforge.serve.engine_process import ProcessPool
    from chatforge.serve.workers import WorkerPool

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-queue", type=int, default=256)
    parser.add_argument("--scheduling", choices=("continuous", "batch"), default="continuous")
    parser.add_argument("--engine", choices=("process", "thread"), default="process")
    add_runtime_arguments(parser)
    args = parser.parse_args(argv)
    sock = bind_port("127.0.0.1", args.port)
    continuous = args.scheduling == "continuous"
    if args.engine == "process":
        pool = ProcessPool(partial(random_replica, args), max_batch=args.max_batch, max_queue=args.max_queue,
                           continuous=continuous)
    else:
        pool = WorkerPool([random_engine(args)], max_batch=args.max_batch, max_queue=args.max_queue,
                          continuous=continuous)
    engine = pool.engine
    app = create_app(pool, f"chatforge-random-d{args.depth}", Limits(context=args.max_seq_len))
    return run_server(app, pool, sock, lambda host, port: (
        f"serve: listening on http://{host}:{port} (random weights, depth {args.depth}, {engine.device}, "
        f"compile {engine.compile}, engine {args.engine})"))


if __name__ == "__main__":
    raise SystemExit(main())
