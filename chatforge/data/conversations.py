"""Conversations as training batches: packed rows for midtraining, padded rows for SFT.

Where it sits: `train/midtrain.py` and `train/sft.py` turn a task mixture (tasks/base.py) into
batches here; each conversation is rendered by `conversation.render_conversation` (ids + mask).

Midtraining (`ConversationCorpus`): a mixture looks to `data/loader.PackedLoader` like a
pre-tokenized corpus (it has `iter_token_docs`), so conversations are packed exactly like pretraining
documents — bos-led, best fit, no padding, rank i % world_size, exact resume from the loader state.
Every token is a target there (see train/midtrain.py for why).

SFT (`SFTBatches`): one conversation per row, cut to max_seq_len + 1 tokens, padded on the right to
the longest row of the micro-batch (or to max_seq_len, for a compiled model's fixed shapes).
Targets are -1 (never trained) wherever the mask is 0 — bos, user turns, `<|assistant_start|>`,
tool output — and on padding. Rank r takes conversations r,
r + world_size, ...; its state is how many it has taken, so resume is exact.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from chatforge.conversation import render_conversation
from chatforge.errors import DataError, UsageError

STATE_VERSION = 1


class ConversationCorpus:
    """Datasets of conversations per split ("train", "val"), read by PackedLoader as token documents."""

    def __init__(self, splits: dict, tokenizer, description: str = "conversation mixture"):
        self.splits = splits
        self.tokenizer = tokenizer
        self.description = description

    def _split(self, split: str):
        if split not in self.splits:
            raise UsageError(f"{self.description} has no {split!r} split (has: {', '.join(self.splits)})")
        return self.splits[split]

    def iter_token_docs(self, split: str = "train", rank: int = 0, world_size: int = 1,
                        start: int = 0):
        """(index, ids starting with bos) of this rank's conversations from index `start` on."""
        dataset = self._split(split)
        first = start + (rank - start) % world_size  # the first index >= start that is this rank's
        for index in range(first, len(dataset), world_size):
            ids, _ = render_conversation(self.tokenizer, dataset[index])
            yield index, np.asarray(ids, dtype=np.int64)


def estimate_tokens(dataset, tokenizer, sample: int = 2000, seed: int = 0) -> int:
    """Tokens in the whole dataset, from a fixed random sample of its conversations (exact when smaller)."""
    n = len(dataset)
    if n == 0:
        return 0
    picked = range(n) if n <= sample else random.Random(seed).sample(range(n), sample)
    total = sum(len(render_conversation(tokenizer, dataset[i])[0]) for i in picked)
    return round(total * n / len(picked))


def sft_row(tokenizer, conversation, max_seq_len: int) -> tuple[list[int], list[int]]:
    """(inputs, targets) of one conversation: targets are the next ids where the mask is 1, else -1."""
    ids, mask = render_conversation(tokenizer, conversation, max_tokens=max_seq_len + 1)
    targets = [t if m else -1 for t, m in zip(ids[1:], mask[1:])]
    return ids[:-1], targets


def pad_rows(rows: list[tuple[list[int], list[int]]], pad_id: int, width: int | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets), each (B, T) int64, T the longest row (or `width`); inputs padded with pad_id,
    targets with -1. Padding sits on the right, so a causal model's real positions never attend to it.
    """
    width = width or max(len(inputs) for inputs, _ in rows)
    x = torch.full((len(rows), width), pad_id, dtype=torch.long)
    y = torch.full((len(rows), width), -1, dtype=torch.long)
    for r, (inputs, targets) in enumerate(rows):
        x[r, :len(inputs)] = torch.tensor(inputs, dtype=torch.long)
        y[r, :len(targets)] = torch.tensor(targets, dtype=torch.long)
    return x, y


class SFTBatches:
    """Endless padded micro-batches of this rank's conversations, epoch after epoch, in dataset order."""

    def __init__(self, dataset, tokenizer, batch_size: int, max_seq_len: int, rank: int = 0, world_size: int = 1,
                 device="cpu", state: dict | None = None, pad_to: int | None = None):
        """pad_to: pad every micro-batch to this length (fixed shapes for a compiled model)."""
        if batch_size < 1 or max_seq_len < 1:
            raise UsageError(f"batch size ({batch_size}) and sequence length ({max_seq_len}) must be positive")
        self.per_rank = len(range(rank, len(dataset), world_size))
        if self.per_rank == 0:
            raise DataError(f"the SFT mixture has {len(dataset)} conversation(s): none for rank {rank} of "
                            f"{world_size}; add data or use fewer ranks")
        self.dataset, self.tokenizer = dataset, tokenizer
        self.batch_size, self.max_seq_len = batch_size, max_seq_len
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.pad_to = pad_to
        self.taken = 0  # conversations this rank has consumed, over all epochs
        if state is not None:
            expected = {"version": STATE_VERSION, "rank": rank, "world_size": world_size, "size": len(dataset)}
            for key, value in expected.items():
                if state.get(key) != value:
                    raise UsageError(f"SFT loader state was saved with {key}={state.get(key)!r} but this run has "
                                     f"{value!r}; resume with the same data and number of ranks")
            self.taken = state["taken"]

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "rank": self.rank, "world_size": self.world_size,
                "size": len(self.dataset), "taken": self.taken}

    @property
    def epoch(self) -> float:
        return self.taken / self.per_rank

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = []
        for k in range(self.taken, self.taken + self.batch_size):
            index = self.rank + self.world_size * (k % self.per_rank)
            rows.append(sft_row(self.tokenizer, self.dataset[index], self.max_seq_len))
        self.taken += self.batch_size
        inputs, targets = pad_rows(rows, self.tokenizer.bos_id, self.pad_to)
        return inputs.to(self.device), targets.to(self.device)


