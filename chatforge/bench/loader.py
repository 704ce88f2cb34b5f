"""`chatforge bench loader`: tokens/s of the pretraining loader alone (read, tokenize, pack), no model.

    chatforge bench loader --data DIR/pretrain/docs --max-seq-len 2048 --batch-size 32
    chatforge bench loader --data ... --cache /tmp/tokens     # also from a pre-tokenized cache

Compare the figure with what training consumes per rank: batch * seq_len tokens per step divided by
the step time (e.g. 32 * 2048 tokens every ~0.13 s at depth 20 on an H100 is ~500k tokens/s). The
loader runs ahead in background threads, so a GPU waits only when this rate is below that one.
"""

from __future__ import annotations

import time

from chatforge.data.corpus import CORPORA, open_corpus
from chatforge.data.loader import PackedLoader
from chatforge.flags import add_flag
from chatforge.runtime import print0


def add_arguments(parser) -> None:
    parser.add_argument("--data", default=None, help="txt file, folder of txt/jsonl/parquet, or glob "
                        "(default: the downloaded shards of --corpus)")
    parser.add_argument("--corpus", default="fineweb-edu", choices=CORPORA)
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the trained one)")
    add_flag(parser, "--max-seq-len", "--seq-len", type=int, default=2048, help="tokens per row (default 2048)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="tokenizer threads (default: up to 8)")
    parser.add_argument("--batches", type=int, default=50, help="batches to time after the first (default 50)")
    parser.add_argument("--buffer-docs", type=int, default=256, help="documents in the best-fit buffer")
    parser.add_argument("--cache", default=None,
                        help="also time reading from a token cache in this folder (built on first use)")


def time_loader(loader: PackedLoader, batches: int) -> dict:
    """Time `batches` batches after the first (which pays for thread start-up and the first read)."""
    it = iter(loader)
    next(it)
    start = time.perf_counter()
    count = 0
    for _ in it:
        count += 1
        if count == batches:
            break
    seconds = time.perf_counter() - start
    loader.close()
    stats = loader.stats()
    tokens = count * loader.batch_size * loader.seq_len
    return {"batches": count, "seconds": seconds, "tokens_per_s": tokens / seconds if seconds else 0.0,
            "dropped_fraction": stats["dropped_fraction"], "splits_per_row": stats["splits"] / max(1, stats["rows"])}


def main(args) -> None:
    from chatforge.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    corpus = open_corpus(args.data, args.corpus)
    sources = [("text (tokenize on the fly)", corpus)]
    if args.cache:
        from chatforge.data.shards import build_token_cache

        start = time.perf_counter()
        cache = build_token_cache(corpus, tokenizer, args.cache, splits=("train",), num_threads=args.threads)
        print0(f"token cache ready in {time.perf_counter() - start:.1f}s: {args.cache}")
        sources.append(("token cache (memmap)", cache))
    print0(f"loader bench: {corpus}, vocab {tokenizer.vocab_size}, seq_len {args.max_seq_len}, "
           f"batch {args.batch_size}, threads {args.threads or 'default'}")
    print0(f"{'source':<28} {'batches':>8} {'seconds':>8} {'tokens/s':>12} {'dropped':>8} {'splits/row':>10}")
    for name, source in sources:
        loader = PackedLoader(source, tokenizer, args.batch_size, args.max_seq_len, num_threads=args.threads,
                              buffer_docs=args.buffer_docs)
        r = time_loader(loader, args.batches)
        print0(f"{name:<28} {r['batches']:>8} {r['seconds']:>8.2f} {r['tokens_per_s']:>12,.0f} "
               f"{r['dropped_fraction']:>8.2%} {r['splits_per_row']:>10.2f}")
