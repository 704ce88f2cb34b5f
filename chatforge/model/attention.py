"""Which kernel runs attention and the matmuls: the model says what to compute, this file how.

`model/gpt.py` calls three things here:
- `linear(x, layer, kernels)`: a projection, through our Triton GEMV for single-row decode steps
  when the decode kernels are on, else the Linear module itself (which FP8 training may have swapped).
- `causal(q, k, v, window)`: training attention. Full-context layers use PyTorch SDPA, on CUDA with
  a preferred backend order; sliding-window layers use FlexAttention on CUDA (compiled, with a block
  mask per shape) and a masked SDPA on the CPU.
- `decode_step(...)`: one decode step's attention through the split-L Triton kernel that also writes
  the new key/value, when the engine turned the kernels on and the shapes suit it; None otherwise
  (the model then writes its cache and attends itself).

Choices that come from the environment are read once, at first use, never at import:
`CHATFORGE_SDPA=cudnn|flash|auto` (the training SDPA backend order, taken when a model is built) and
`CHATFORGE_DECODE_KERNELS=all|gemv|attn|none` (default for `GPT.fuse_for_inference`).
"""

from __future__ import annotations

import os
from functools import lru_cache

import torch
import torch.nn as nn
import torch.nn.functional as F

from chatforge.errors import UsageError
from chatforge.model import decode_kernels

NO_WINDOW = 1 << 30  # the decode attention kernel's window for full-context layers


def linear(x: torch.Tensor, layer: nn.Linear, kernels: frozenset = frozenset(), relu2: bool = False):
    """layer(x) (then relu(.)^2 when asked): the Triton GEMV for a single row when enabled, else the
    module itself (which FP8 training may have swapped for its own Linear)."""
    if "gemv" in kernels and decode_kernels.gemv_supported(x, layer.weight):
        return decode_kernels.gemv(x, layer.weight, relu2)
    y = layer(x)
    return F.relu(y).square() if relu2 else y


def decode_kernels_for(device: torch.device, kernels: str | None = None) -> frozenset:
    """The Triton decode kernels to use on `device`: "all", "gemv", "attn" or "none"; default
    CHATFORGE_DECODE_KERNELS, else "all" where Triton runs on that device."""
    choice = (kernels or os.environ.get("CHATFORGE_DECODE_KERNELS") or "all").lower()
    named = {"all": {"gemv", "attn"}, "gemv": {"gemv"}, "attn": {"attn"}, "none": set()}
    if choice not in named:
        raise UsageError(f"CHATFORGE_DECODE_KERNELS={choice!r} is not one of all, gemv, attn, none")
    return frozenset(named[choice]) if decode_kernels.available(device) else frozenset()


def decode_step(q, k, v, k_cache, v_cache, lengths, window: int | None, kernels: frozenset):
    """(B, H, D) attention output of a one-token step with the new k/v written, or None when the
    decode attention kernel is off or cannot take these shapes."""
    if "attn" not in kernels or not decode_kernels.decode_attention_supported(q, k, v, k_cache):
        return None
    return decode_kernels.decode_attention(q, k, v, k_cache, v_cache, lengths, window or NO_WINDOW)


def causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None,
           backends: tuple = ()) -> torch.Tensor:
    """Causal attention of (B, H, T, D) queries over (B, Hkv, T, D) keys/values, within `window`
    tokens when given. backends: the SDPA order for CUDA (`sdpa_backends()`, taken by the caller
    once, so a compiled forward sees a constant)."""
    T = q.shape[2]
    gqa = k.shape[1] != q.shape[1]
    if window is None or window >= T:
        if backends and q.device.type == "cuda":
            from torch.nn.attention import sdpa_kernel

            with sdpa_kernel(list(backends), set_priority=True):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if q.device.type == "cuda":
        # unlike SDPA, FlexAttention is not an autocast op: give it one dtype (v's is the linear's)
        q, k = q.to(v.dtype), k.to(v.dtype)
        return _flex(q, k, v, _window_block_mask(T, window, q.device), gqa)
    i = torch.arange(T, device=q.device)
    allowed = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window)  # (Tq, Tk)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=gqa)


@lru_cache(maxsize=1)
def sdpa_backends() -> tuple:
    """Which fused attention kernels CUDA training tries first (CHATFORGE_SDPA=cudnn|flash|auto).

    cuDNN first: on an H200 (torch 2.11) it made a depth-20 training step 2.4% faster than the
    default choice (docs/benchmarks.md); the others stay as fallbacks for shapes cuDNN refuses.
    """
    choice = os.environ.get("CHATFORGE_SDPA", "cudnn").lower()
    if choice == "auto":
        return ()
    from torch.nn.attention import SDPBackend

    order = {"cudnn": [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION],
             "flash": [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION]}
    if choice not in order:
        raise UsageError(f"CHATFORGE_SDPA={choice!r} is not one of cudnn, flash, auto")
    return tuple(order[choice] + [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


_block_masks: dict = {}


def _window_block_mask(T: int, window: int, device: torch.device):
    """FlexAttention block mask for causal attention within `window` tokens.

    Eager: built once per shape and kept. Inside torch.compile it is traced into the graph instead
    (cheap: one bit per 128x128 tile), since a cache mutated during tracing would not be replayed.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    def sliding_causal(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx < window)

    if torch.compiler.is_compiling():
        return create_block_mask(sliding_causal, B=None, H=None, Q_LEN=T, KV_LEN=T, device=device)
    key = (T, window, str(device))
    if key not in _block_masks:
        _block_masks[key] = create_block_mask(sliding_causal, B=None, H=None, Q_LEN=T, KV_LEN=T, device=device)
    return _block_masks[key]


_flex_compiled = None


def _flex(q, k, v, block_mask, enable_gqa):
    """FlexAttention is fast only as a compiled kernel: inside a compiled model it is traced like any op;
    in an eager model we compile just this call (how FlexAttention is meant to be used)."""
    global _flex_compiled
    from torch.nn.attention.flex_attention import flex_attention

    if torch.compiler.is_compiling():
        return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)
    if _flex_compiled is None:
        _flex_compiled = torch.compile(flex_attention, dynamic=False)
    return _flex_compiled(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)
