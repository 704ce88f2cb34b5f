"""Choosing the next token from logits: greedy, temperature, top-k, top-p (nucleus), seeded.

The engine calls `sample_next` once per decode step for every row at once. Nothing here reads a
value back to the host: the draw uses the exponential race (argmax of p_i / E_i with E_i ~ Exp(1)
picks i with probability p_i, the trick gpt-fast uses) instead of `torch.multinomial`, which
synchronises on CUDA. Filters are applied in the usual order: temperature, then top-k, then top-p.
"""

from __future__ import annotations

import torch

from chatforge.errors import UsageError


def check_sampling_args(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if temperature < 0:
        raise UsageError(f"--temperature {temperature} must be >= 0 (0 means greedy)")
    if top_k is not None and top_k < 1:
        raise UsageError(f"--top-k {top_k} must be >= 1 (or left out for no top-k filter)")
    if top_p is not None and not 0 < top_p <= 1:
        raise UsageError(f"--top-p {top_p} must be in (0, 1] (1 keeps the whole distribution)")


def filtered_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                    top_p: float | None = None) -> torch.Tensor:
    """(B, V) fp32 logits scaled by 1/temperature with the excluded tokens at -inf.

    top-k keeps the k largest (ties at the k-th value are all kept); top-p keeps the smallest set of
    most likely tokens whose probability reaches top_p (always at least the most likely one).
    """
    logits = logits.float() / max(temperature, 1e-8)
    V = logits.shape[-1]
    if top_k is not None and top_k < V:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # probability mass strictly above each token
        drop_sorted = before >= top_p           # the first token always has before == 0: kept
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B,) int64 token ids drawn from (B, V) logits; temperature 0 is argmax (greedy)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = filtered_logits(logits, temperature, top_k, top_p).softmax(dim=-1)
    race = torch.empty_like(probs).exponential_(1.0, generator=generator).clamp_min_(1e-20)  # no 0/0
    return (probs / race).argmax(dim=-1)
