"""Pre-tokenized token shards: tokenize a corpus once, then let PackedLoader read tokens instead of text.

    cache = build_token_cache(open_corpus(), tokenizer, paths.data_dir("fineweb-edu") / "tokens-v32768")
    loader = PackedLoader(cache, tokenizer, batch_size=32, seq_len=2048)   # same batches as from text

A cache directory holds, per split, `<split>.bin` (every document's tokens, bos first, back to back,
uint16 when the vocabulary fits in 16 bits, else uint32, read through a numpy memmap) and
`<split>.idx.npz` (each document's index within the split and its start offset), plus `meta.json`
(vocabulary size, dtype, a fingerprint of the tokenizer). Document indices are the corpus' own, so
rank sharding and the loader's resume state are the same as when tokenizing on the fly, and the
batches are bit-identical.

When it pays: tokenizing on the fly costs CPU per token every epoch; the cache costs one pass and
2 bytes per token of disk. It pays when the loader's tokens/s from text (`chatforge bench loader`)
is near what the GPUs consume (each rank needs batch*seq_len tokens per step), when the same data
is read for several epochs or runs, or when CPU cores are few per GPU. See `chatforge bench loader
--cache DIR` for the two rates side by side.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
from pathlib import Path
from typing import Iterator

import numpy as np

from chatforge import paths
from chatforge.errors import DataError
from chatforge.progress import Progress

CACHE_VERSION = 1


def tokenizer_fingerprint(tokenizer) -> str:
    """Changes when the vocabulary changes: the bytes of every token, and the special ids."""
    digest = hashlib.sha256()
    digest.update(str(tokenizer.vocab_size).encode())
    digest.update(str(tokenizer.bos_id).encode())
    for i in range(tokenizer.vocab_size):
        if not tokenizer.is_special(i):
            digest.update(tokenizer.id_to_bytes(i) + b"\0")
    return digest.hexdigest()[:16]


def build_token_cache(corpus, tokenizer, directory: str | Path, splits=("train", "val"),
                      chunk_docs: int = 256, num_threads: int | None = None) -> "TokenCache":
    """Tokenize `splits` of `corpus` into `directory` (written beside it, then renamed into place)."""
    directory = Path(directory)
    if (directory / "meta.json").exists():
        return TokenCache(directory, tokenizer)
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    counts = {}
    for split in splits:
        offsets, indices, total = [0], [], 0
        bar = Progress(None, f"tokenize {split}", unit="doc")
        with open(tmp / f"{split}.bin", "wb") as f:
            chunk: list = []
            for item in itertools.chain(corpus.iter_indexed(split), [None]):
                if item is not None:
                    chunk.append(item)
                if chunk and (item is None or len(chunk) == chunk_docs):
                    ids = tokenizer.encode_batch([t for _, t in chunk], prepend=tokenizer.bos_id,
                                                 num_threads=num_threads)
                    for (index, _), toks in zip(chunk, ids):
                        np.asarray(toks, dtype=dtype).tofile(f)
                        total += len(toks)
                        offsets.append(total)
                        indices.append(index)
                    bar.update(len(chunk))
                    chunk = []
        bar.close()
        np.savez(tmp / f"{split}.idx.npz", offsets=np.asarray(offsets, dtype=np.int64),
                 indices=np.asarray(indices, dtype=np.int64))
        counts[split] = {"documents": len(indices), "tokens": total}
    meta = {"version": CACHE_VERSION, "vocab_size": tokenizer.vocab_size, "dtype": np.dtype(dtype).name,
            "tokenizer": tokenizer_fingerprint(tokenizer), "source": getattr(corpus, "description", str(corpus)),
            "splits": counts}
    paths.atomic_write_text(tmp / "meta.json", json.dumps(meta, indent=2))
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)
    return TokenCache(directory, tokenizer)


class TokenCache:
    """A built cache; PackedLoader takes it in place of a Corpus (it reads `iter_token_docs`)."""

    def __init__(self, directory: str | Path, tokenizer=None):
        self.directory = Path(directory)
        meta_path = self.directory / "meta.json"
        if not meta_path.exists():
            raise DataError(f"{self.directory}: not a token cache (no meta.json); build it with build_token_cache")
        self.meta = json.loads(meta_path.read_text())
        self.description = f"token cache {self.directory}"
        if tokenizer is not None and self.meta["tokenizer"] != tokenizer_fingerprint(tokenizer):
            raise DataError(f"{self.directory}: built with another tokenizer; delete the folder so it is "
                            "rebuilt with the current one")

    def _split(self, split: str):
        if split not in self.meta["splits"]:
            raise DataError(f"{self.directory}: the cache has no {split!r} split (has: "
                            f"{', '.join(self.meta['splits'])})")
        index = np.load(self.directory / f"{split}.idx.npz")
        size = int(index["offsets"][-1])
        tokens = (np.memmap(self.directory / f"{split}.bin", dtype=self.meta["dtype"], mode="r", shape=(size,))
                  if size else np.zeros(0, dtype=self.meta["dtype"]))
        return tokens, index["offsets"], index["indices"]

    def iter_token_docs(self, split: str = "train", rank: int = 0, world_size: int = 1,
                        start: int = 0) -> Iterator[tuple[int, np.ndarray]]:
        """(index within the split, tokens with bos) for this rank's documents from index `start` on."""
        tokens, offsets, indices = self._split(split)
        for k in range(int(np.searchsorted(indices, start)), len(indices)):
            index = int(indices[k])
            if index % world_size == rank:
                yield index, np.asarray(tokens[offsets[k]:offsets[k + 1]], dtype=np.int64)
