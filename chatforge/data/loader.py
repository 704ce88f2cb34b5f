"""The pretraining loader: documents -> tokens -> BOS-aligned, best-fit packed rows, no padding, no cropping.

    loader = PackedLoader(open_corpus(), tokenizer, batch_size=32, seq_len=2048, rank=r, world_size=w,
                          device="cuda")
    for inputs, targets in loader:   # (B, T) int64 each; targets are inputs shifted by one
        ...
    meta["loader"] = loader.state_dict()          # per rank; PackedLoader(..., state=it) resumes exactly

How a row of `seq_len + 1` tokens is filled (inputs = row[:-1], targets = row[1:]):
- every document gets `<|bos|>` in front and is tokenized in a background thread (`encode_batch`
  over chunks of documents, tiktoken's own threads doing the work);
- a buffer holds the next `buffer_docs` documents; a row is filled by repeatedly taking the LARGEST
  buffered document that still fits the space left (best fit), so rows start at a document start and
  hold whole documents;
- when nothing fits the space left, the largest buffered document is split: its first part (with its
  bos) closes the row and the rest, behind a fresh `<|bos|>`, opens the next row. A document longer
  than a row is consumed this way, row after row. So every row starts with bos, a continuation is
  never placed mid-row (within a row every token after a bos belongs to the document that bos
  opened, so masks built from bos positions stay right), and every token of every document is a
  target exactly once. The cost of never cropping: one extra bos per split (`stats()["splits"]`),
  and a continuation's first tokens are predicted without the text before the split.
- Training rows are never padded and, while looping, no token is dropped. A finite pass
  (`loop=False`) ends with the last full batch; the tokens of the unfinished last rows count as
  dropped. A validation pass passes `pad_last=True` instead: the leftover rows become one more batch of the same shape, padded
  with bos inputs and ignored (-1) targets, so every token is measured once and a split smaller than
  one batch per rank still gives a loss (without it, midtraining's small chat val split gave no
  batch at all on 8 ranks, hence a NaN validation loss).

nanochat's loader crops what does not fit (its notes: ~35% of FineWeb tokens discarded; with the ~5k
token documents of the docs corpus most tokens). Here `stats()["tokens_dropped"]` is 0 while looping.

Ranks: document i of a split goes to rank i % world_size (see corpus.py); each rank packs its own.
Exact resume: the state names, for each buffered document, (epoch, index, offset) plus the stream
position; a new loader re-reads and re-tokenizes from the oldest buffered document, rebuilds the
buffer exactly, and so yields bit-identical batches. Reading, tokenizing and packing all run ahead in
background threads (`prefetch` batches); on CUDA the batches are pinned and copied non-blocking.
`close()` (or leaving a `with PackedLoader(...)` block) stops those threads and waits for them; an
exit hook does the same for loaders nobody closed. A daemon thread still inside torch's C++ code when
the interpreter finalizes is killed mid-call and aborts the process ("terminate called without an
active exception", exit 134) after the run's work is done, so they must be gone before that.
A pre-tokenized cache (`shards.TokenCache`) can stand in for the corpus: same documents, same batches.
"""

from __future__ import annotations

import atexit
import queue
import threading
import weakref
from typing import Iterator

import numpy as np
import torch

from chatforge.errors import DataError, UsageError

STATE_VERSION = 1


class _Background:
    """Run a generator in a daemon thread, handing its items (or its exception) through a queue.

    Daemon, so a consumer that forgets to stop it cannot hang the interpreter at exit; the owner
    still stops and joins it (PackedLoader.close) so it is never running when the interpreter dies.
    """

    def __init__(self, gen, maxsize: int, stop: threading.Event, name: str):
        self.queue: queue.Queue = queue.Queue(maxsize)
        self.stop = stop
        self.thread = threading.Thread(target=self._run, args=(gen,), daemon=True, name=name)
        self.thread.start()

    def join(self) -> None:
        if self.thread is not threading.current_thread():
            self.thread.join()

    def _put(self, message) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(message, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, gen) -> None:
        try:
            for item in gen:
                if not self._put(("item", item)):
                    return
            self._put(("end", None))
        except BaseException as exc:  # handed to the consumer, which re-raises it
            self._put(("error", exc))
        finally:
            gen.close()  # here, not at some later garbage collection: its files and inner threads end now

    def __iter__(self):
        while True:
            if self.stop.is_set():  # not after draining the queue: up to a whole buffer of work
                return
            try:
                kind, item = self.queue.get(timeout=0.1)
            except queue.Empty:
                continue
            if kind == "item":
                yield item
            elif kind == "end":
                return
            else:
                raise item


class RowPacker:
    """Best-fit packing of bos-led documents into rows of `row_len` tokens; see the module docstring."""

    def __init__(self, row_len: int, bos_id: int):
        self.row_len = row_len
        self.bos_id = bos_id
        self.docs: list[list] = []  # [key, 0, tokens] of whole documents waiting
        self.conts: list[list] = []  # [key, offset > 0, tokens] of a split document; starts the next row
        self.splits = 0

    def __len__(self) -> int:
        return len(self.docs)

    def add(self, key: tuple[int, int], tokens: np.ndarray, offset: int = 0) -> None:
        (self.conts if offset else self.docs).append([key, offset, tokens])

    def empty(self) -> bool:
        return not self.docs and not self.conts

    def entries(self) -> list[list]:
        """(epoch, index, offset) of every waiting document, in packing order: the resume state."""
        return [[*e[0], e[1]] for e in self.docs + self.conts]

    def next_row(self) -> tuple[np.ndarray, int]:
        """(row, filled): filled < row_len only when the documents ran out (the caller drops that row)."""
        L = self.row_len
        row = np.empty(L, dtype=np.int64)
        pos = 0
        if self.conts:  # a split document's rest opens the row, behind a fresh bos
            key, offset, tokens = self.conts[0]
            n = min(len(tokens) - offset, L - 1)
            row[0] = self.bos_id
            row[1:1 + n] = tokens[offset:offset + n]
            pos = 1 + n
            self.splits += 1  # counts the pieces after a document's first, i.e. the extra bos tokens
            if offset + n == len(tokens):
                self.conts.pop(0)
            else:
                self.conts[0][1] = offset + n
        while pos < L and self.docs:
            space = L - pos
            best, best_len = -1, 0
            for j, entry in enumerate(self.docs):
                n = len(entry[2])
                if best_len < n <= space:
                    best, best_len = j, n
            if best >= 0:
                tokens = self.docs.pop(best)[2]
                row[pos:pos + best_len] = tokens
                pos += best_len
                continue
            # nothing fits: the largest document closes the row and its rest opens the next one
            j = max(range(len(self.docs)), key=lambda k: len(self.docs[k][2]))
            key, _, tokens = self.docs.pop(j)
            row[pos:] = tokens[:space]
            self.conts.append([key, space, tokens])
            pos = L
        return row, pos


class PackedLoader:
    """Yields (inputs, targets), each (batch_size, seq_len) int64 on `device`, from packed rows."""

    def __init__(self, corpus, tokenizer, batch_size: int, seq_len: int, split: str = "train", rank: int = 0,
                 world_size: int = 1, device="cpu", state: dict | None = None, loop: bool = True,
                 buffer_docs: int = 256, tokenize_batch: int = 128, num_threads: int | None = None,
                 prefetch: int = 4, pad_last: bool = False):
        """pad_last: end a finite pass with its leftover rows padded into one more batch (validation)."""
        self._stop: threading.Event | None = None
        self._workers: list[_Background] = []
        if pad_last and loop:
            raise ValueError("pad_last applies to a finite pass (loop=False)")
        if batch_size < 1 or seq_len < 1:
            raise UsageError(f"batch size ({batch_size}) and sequence length ({seq_len}) must be positive")
        if buffer_docs < 1:
            raise UsageError("buffer_docs must be at least 1")
        self.corpus = corpus
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.split = split
        self.rank = rank
        self.world_size = world_size
        self.device = torch.device(device)
        self.loop = loop
        self.buffer_docs = buffer_docs
        self.tokenize_batch = tokenize_batch
        self.num_threads = num_threads
        self.prefetch = prefetch
        self.pad_last = pad_last
        self.bos_id = tokenizer.bos_id
        self._initial = self._check_state(state) if state is not None else self._fresh_state()
        self._state = self._initial

    # --- state -------------------------------------------------------------------------------

    def _fresh_state(self) -> dict:
        return {"version": STATE_VERSION, "split": self.split, "rank": self.rank, "world_size": self.world_size,
                "seq_len": self.seq_len, "vocab_size": self.tokenizer.vocab_size, "pulled": None,
                "buffer": [], "stats": {"tokens_used": 0, "tokens_dropped": 0, "documents": 0, "splits": 0,
                                        "rows": 0, "batches": 0, "epoch": 0}}

    def _check_state(self, state: dict) -> dict:
        fresh = self._fresh_state()
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise UsageError("loader state is missing or from another chatforge version; start without resume")
        for key in ("split", "rank", "world_size", "seq_len", "vocab_size"):
            if state.get(key) != fresh[key]:
                raise UsageError(f"loader state was saved with {key}={state.get(key)!r} but this run has "
                                 f"{fresh[key]!r}; resume with the same settings (same number of ranks too)")
        return {**state, "buffer": [list(e) for e in state["buffer"]], "stats": dict(state["stats"])}

    def state_dict(self) -> dict:
        """The exact position after the last batch yielded (JSON-serialisable; one per rank)."""
        return {**self._state, "buffer": [list(e) for e in self._state["buffer"]],
                "stats": dict(self._state["stats"])}

    def stats(self) -> dict:
        """Counters since the first batch: tokens used / dropped, documents, split documents, rows."""
        s = dict(self._state["stats"])
        total = s["tokens_used"] + s["tokens_dropped"]
        s["dropped_fraction"] = s["tokens_dropped"] / total if total else 0.0
        return s

    # --- the pipeline --------------------------------------------------------------------------

    def _documents(self, epoch: int, start: int) -> Iterator[list[tuple[tuple[int, int], np.ndarray]]]:
        """Chunks of ((epoch, index), tokens with bos) from (epoch, start) on; cycles epochs when looping."""
        cached = hasattr(self.corpus, "iter_token_docs")
        while True:
            found = False
            chunk: list = []
            source = (self.corpus.iter_token_docs if cached else self.corpus.iter_indexed)(
                self.split, self.rank, self.world_size, start)
            for index, doc in source:
                found = True
                chunk.append((index, doc))
                if len(chunk) == self.tokenize_batch:
                    yield self._tokenize(epoch, chunk, cached)
                    chunk = []
            if chunk:
                yield self._tokenize(epoch, chunk, cached)
            if start == 0 and not found:
                raise DataError(f"{getattr(self.corpus, 'description', self.corpus)}: the {self.split} split has "
                                f"no documents for rank {self.rank} of {self.world_size}; add data or use fewer ranks")
            if not self.loop:
                return
            epoch, start = epoch + 1, 0

    def _tokenize(self, epoch: int, chunk: list, cached: bool) -> list:
        if cached:
            return [((epoch, i), np.asarray(toks, dtype=np.int64)) for i, toks in chunk]
        ids = self.tokenizer.encode_batch([text for _, text in chunk], prepend=self.bos_id,
                                          num_threads=self.num_threads)
        return [((epoch, i), np.asarray(toks, dtype=np.int64)) for (i, _), toks in zip(chunk, ids)]

    def _batches(self, state: dict, stop: threading.Event,
                 finished: dict) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict]]:
        stats = dict(state["stats"])
        saved = {(e, i): off for e, i, off in state["buffer"]}
        order = [(e, i) for e, i, _ in state["buffer"]]
        pulled = tuple(state["pulled"]) if state["pulled"] is not None else None
        begin = min(order + ([pulled] if pulled else [])) if (order or pulled) else (0, 0)
        if not order and pulled:  # nothing buffered: continue right after the last document pulled
            begin = (pulled[0], pulled[1] + 1)
        docs = _Background(
            (doc for chunk in self._documents(*begin) for doc in chunk), 4 * self.tokenize_batch, stop, "tokenize")
        self._workers.append(docs)
        stream = iter(docs)
        packer = RowPacker(self.seq_len + 1, self.bos_id)
        if order:  # rebuild the buffer: re-read up to the last document pulled before the save
            found: dict = {}
            for key, tokens in stream:
                if key in saved:
                    found[key] = tokens
                if key >= pulled:
                    break
            missing = [k for k in order if k not in found]
            if missing:
                raise DataError(f"loader state names document {missing[0]} that the corpus no longer has; "
                                "the data changed since the checkpoint: resume with the same data")
            for key in order:
                packer.add(key, found[key], saved[key])
        exhausted = False
        rows: list[np.ndarray] = []
        while True:
            while not exhausted and len(packer) < self.buffer_docs:
                item = next(stream, None)
                if item is None:
                    exhausted = True
                    break
                packer.add(*item)
                pulled = item[0]
                stats["documents"] += 1
                stats["epoch"] = pulled[0]
            if exhausted and packer.empty():
                break
            row, filled = packer.next_row()
            if filled < len(row):
                if self.pad_last:  # the documents ran out: this is the last row
                    rows.append(row[:filled])
                else:
                    stats["tokens_dropped"] += filled
                continue
            rows.append(row)
            if len(rows) < self.batch_size:
                continue
            batch = torch.from_numpy(np.stack(rows))
            rows = []
            stats["tokens_used"] += batch.numel()
            stats["rows"] += self.batch_size
            stats["batches"] += 1
            stats["splits"] = state["stats"]["splits"] + packer.splits
            snapshot = {**state, "pulled": list(pulled) if pulled else None, "buffer": packer.entries(),
                        "stats": dict(stats)}
            inputs, targets = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
            if self.device.type == "cuda":
                inputs, targets = inputs.pin_memory(), targets.pin_memory()
            yield inputs, targets, snapshot
        if self.pad_last and rows and not stop.is_set():
            yield self._padded_batch(rows, stats, state, pulled, packer)
            rows = []
        stats["tokens_dropped"] += sum(len(r) for r in rows)
        if not stop.is_set():
            finished["stats"] = dict(stats, splits=state["stats"]["splits"] + packer.splits)

    def _padded_batch(self, rows: list[np.ndarray], stats: dict, state: dict, pulled, packer):
        """The leftover rows of a finite pass as a full-shape batch: bos inputs, -1 targets where padded.

        A fixed shape keeps a compiled model from recompiling for the last batch; a causal model's
        real positions never see the padding behind them.
        """
        L = self.seq_len + 1
        inputs = np.full((self.batch_size, self.seq_len), self.bos_id, dtype=np.int64)
        targets = np.full((self.batch_size, self.seq_len), -1, dtype=np.int64)
        for r, row in enumerate(rows):
            n = len(row)
            inputs[r, :min(n, L - 1)] = row[:L - 1]
            targets[r, :n - 1] = row[1:]
            stats["tokens_used"] += n
        stats["rows"] += len(rows)
        stats["batches"] += 1
        stats["splits"] = state["stats"]["splits"] + packer.splits
        snapshot = {**state, "pulled": list(pulled) if pulled else None, "buffer": packer.entries(),
                    "stats": dict(stats)}
        inputs, targets = torch.from_numpy(inputs), torch.from_numpy(targets)
        if self.device.type == "cuda":
            inputs, targets = inputs.pin_memory(), targets.pin_memory()
        return inputs, targets, snapshot

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.close()
        stop = self._stop = threading.Event()
        _open_loaders.add(self)
        finished: dict = {}
        batches = _Background(self._batches(self._state, stop, finished), self.prefetch, stop, "pack")
        self._workers.append(batches)
        try:
            for inputs, targets, snapshot in batches:
                if self.device.type != "cpu":
                    inputs = inputs.to(self.device, non_blocking=True)
                    targets = targets.to(self.device, non_blocking=True)
                self._state = snapshot
                yield inputs, targets
        finally:
            stop.set()
        if "stats" in finished:  # a finite pass ended: keep its counts, start over on the next iteration
            self._state = {**self._initial, "stats": finished["stats"]}

    def close(self) -> None:
        """Stop the background threads and wait for them: each finishes at most the chunk in hand."""
        if self._stop is not None:
            self._stop.set()
            self._stop = None
        # the pack thread first: it starts the tokenize thread, so once it is gone no new one appears
        while self._workers:
            workers, self._workers = self._workers, []
            for worker in sorted(workers, key=lambda w: w.thread.name != "pack"):
                worker.join()
        _open_loaders.discard(self)

    def __enter__(self) -> "PackedLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        # only signal: a finalizer may run on one of these very threads, or during interpreter teardown
        if getattr(self, "_stop", None) is not None:
            self._stop.set()


# Loaders whose threads may still run; emptied at exit, before the interpreter kills daemon threads.
_open_loaders: "weakref.WeakSet[PackedLoader]" = weakref.WeakSet()


@atexit.register
def _close_open_loaders() -> None:
    for loader in list(_open_loaders):
        loader.close()
