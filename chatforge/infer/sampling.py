"""Choosing the next token from logits: greedy, temperature, top-k, top-p (nucleus), seeded.

The engine calls `sample_next` once per decode step for every row at once. Nothing here reads a
value back to the host: the draw uses the exponential race (argmax of p_i / E_i with E_i ~ Exp(1)
picks i with probability p_i, the trick gpt-fast uses) instead of `torch.multinomial`, which
synchronises on CUDA. Filters are applied in the usual order: temperature, then top-k, then top-p.

The engine's noise is keyed, not streamed: E for row b and token v is a hash of (the row's key, the
position being sampled, v), computed on the device. A row's tokens then depend on its seed and its
own history only, not on how many steps the batch took: a row that sits out steps while its tool runs
(or joins a running decode) draws exactly what it would have drawn without waiting. The hash is a
32-bit integer mixer (two multiply-xorshift rounds, as in Wellons' "lowbias32") evaluated in int64
with the products split so nothing overflows; its top 24 bits become a uniform in (0, 1).
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
                top_p: float | None = None, generator: torch.Generator | None = None,
                keys: torch.Tensor | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) int64 token ids drawn from (B, V) logits; temperature 0 is argmax (greedy).

    With `keys` and `positions` ((B,) int64 tensors on the logits' device) the noise is keyed (see the
    module docstring); otherwise it is drawn from `generator`."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = filtered_logits(logits, temperature, top_k, top_p).softmax(dim=-1)
    if keys is not None:
        race = keyed_exponential(keys, positions, probs.shape[-1])
    else:
        race = torch.empty_like(probs).exponential_(1.0, generator=generator).clamp_min_(1e-20)  # no 0/0
    return (probs / race).argmax(dim=-1)


M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for x < 2^32, in int64 without overflow: c split into 16-bit halves."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def row_keys(seed: int, rows: int, device) -> torch.Tensor:
    """(rows,) int64 keys, one per row, from one seed (any Python int)."""
    base = torch.arange(rows, dtype=torch.int64, device=device)
    seeded = _mix32(torch.full_like(base, seed & M32) ^ _mix32(torch.full_like(base, seed >> 32 & M32)))
    return _mix32(seeded ^ _mix32(base))


def keyed_exponential(keys: torch.Tensor, positions: torch.Tensor, V: int) -> torch.Tensor:
    """(B, V) float32 Exp(1) draws, a function of (keys[b], positions[b], v) alone.

    Every constant stays below 2^16 (inside `_mul32`): compiled, Inductor multiplies index variables
    as 32-bit integers and refuses larger literals."""
    row = _mix32((keys.long() ^ _mix32(positions.long() & M32)) & M32)  # (B,)
    v = torch.arange(V, dtype=torch.int64, device=keys.device)
    x = _mix32(row[:, None] ^ _mix32(v)[None, :])  # (B, V)
    uniform = ((x >> 8).float() + 0.5) * (1.0 / (1 << 24))  # in (0, 1), never 0 or 1
    return -torch.log(uniform)
