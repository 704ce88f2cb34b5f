"""`chatforge bench tokenizer`: BPE training time and encode throughput on this machine.

Text comes from `--data`, else from the repository's ../shared/data/pretrain when present, else
from seeded generated word salad (which flatters the numbers: few distinct words). MB here means
10^6 bytes of UTF-8. Encoding is timed once on one thread (`encode` per document) and once with
`encode_batch` on `--threads` threads, over the same documents.

    chatforge bench tokenizer                       # 100 MB, vocab 32768
    chatforge bench tokenizer --mb 1 --vocab-size 1024
"""

from __future__ import annotations

import argparse
import os
import random
import time
from pathlib import Path

from chatforge.runtime import print0
from chatforge.tokenizer import Tokenizer, check_vocab_size

SHARED_PRETRAIN = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "pretrain"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mb", type=float, default=100.0, help="MB of text to train and encode on")
    parser.add_argument("--vocab-size", type=int, default=32768)
    parser.add_argument("--data", default=None, help="text to use (default: ../shared/data/pretrain if present)")
    parser.add_argument("--doc-cap", type=int, default=10000, help="documents are cut into pieces of this many characters")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads for encode_batch")


def _generated_documents(n_bytes: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ne", "tor", "van", "es", "qu", "ri", "sta", "de", "un"]
    vocabulary = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(5000)]
    docs, total = [], 0
    while total < n_bytes:
        doc = " ".join(rng.choice(vocabulary) for _ in range(300)) + ".\n"
        docs.append(doc)
        total += len(doc)
    return docs


def collect_documents(data: str | None, n_bytes: int, doc_cap: int) -> tuple[list[str], str]:
    """Up to `n_bytes` of UTF-8 text as documents, and where it came from."""
    source = data or (str(SHARED_PRETRAIN) if SHARED_PRETRAIN.is_dir() else None)
    if source is None:
        return _generated_documents(n_bytes), "generated word salad"
    from chatforge.data.corpus import open_corpus

    docs, total = [], 0
    for document in open_corpus(source).iter_documents("train"):
        # Long documents are cut into doc_cap pieces (not truncated) so that all the text is used.
        for start in range(0, len(document), doc_cap):
            piece = document[start:start + doc_cap]
            size = len(piece.encode("utf-8"))
            if total + size > n_bytes:
                return docs, source
            docs.append(piece)
            total += size
    return docs, source


def main(args: argparse.Namespace) -> dict:
    check_vocab_size(args.vocab_size)
    docs, source = collect_documents(args.data, int(args.mb * 1e6), args.doc_cap)
    mb = sum(len(d.encode("utf-8")) for d in docs) / 1e6
    print0(f"text: {mb:.1f} MB in {len(docs):,} documents from {source}")

    start = time.perf_counter()
    tokenizer = Tokenizer.train(iter(docs), args.vocab_size)
    train_s = time.perf_counter() - start

    start = time.perf_counter()
    n_tokens = sum(len(tokenizer.encode(doc)) for doc in docs)
    single_s = time.perf_counter() - start

    start = time.perf_counter()
    batch_tokens = sum(len(row) for row in tokenizer.encode_batch(docs, num_threads=args.threads))
    batch_s = time.perf_counter() - start
    assert batch_tokens == n_tokens

    result = {
        "source": source, "mb": round(mb, 3), "documents": len(docs), "vocab_size": tokenizer.vocab_size,
        "train_seconds": round(train_s, 3), "tokens": n_tokens, "bytes_per_token": round(mb * 1e6 / n_tokens, 3),
        "encode_mb_per_s_1_thread": round(mb / single_s, 2),
        "encode_batch_mb_per_s": round(mb / batch_s, 2), "threads": args.threads, "cpu_count": os.cpu_count(),
    }
    print0(f"{'train':<28}{train_s:>10.2f} s   vocab {tokenizer.vocab_size:,}, {mb:.1f} MB")
    print0(f"{'encode (1 thread)':<28}{result['encode_mb_per_s_1_thread']:>10.2f} MB/s")
    print0(f"{f'encode_batch ({args.threads} threads)':<28}{result['encode_batch_mb_per_s']:>10.2f} MB/s")
    print0(f"{'bytes per token':<28}{result['bytes_per_token']:>10.2f}   ({n_tokens:,} tokens; "
           f"{os.cpu_count()} CPU cores)")
    return result
