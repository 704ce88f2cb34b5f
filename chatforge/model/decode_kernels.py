"""Triton kernels for one-token decode steps on CUDA: a matrix-vector product for the weights and an
attention over the KV cache that also stores the new token's key and value.

Why they exist: at batch 1 a decode step reads every weight once and does almost no arithmetic, so
its time is bytes over memory bandwidth plus a fixed cost per kernel. On an H200 (torch 2.11) the
depth-20 step spent 460 us in cuBLAS products of a (1, 1280) row with the weights (about 2 TB/s of
the 4.8 the memory gives), 170 us in cuDNN attention over the whole static cache with an additive
mask, and a few more kernels per layer writing the cache and squaring the ReLU. Here:

- `gemv`: y = x W^T for a single row x, each program streaming BLOCK_N whole rows of W with wide
  loads; ReLU^2 can be applied on the way out, saving the MLP one kernel per layer.
- `decode_attention`: split-L ("flash decoding"): program (row*head, split) covers CHUNK cache
  positions, skips those past the row's length or outside its window, and keeps an online softmax;
  a second kernel combines the splits. The new token's key/value come straight from the projection
  and are written into the cache by the program whose chunk holds that position, so no other
  program reads that slot during the launch.

Together with sampling inside the step's CUDA graph (infer/engine.py) they took depth-20 decode at
batch 1 from 887 to 1,172 tokens/s on an H200 (docs/benchmarks.md has the per-kernel figures).

Both are registered as torch custom ops so `torch.compile` and CUDA graphs treat them as single
calls. Without Triton or off CUDA nothing here is used (`available` says so) and the model keeps
its torch path, which is also the reference the tests compare these kernels against.
"""

from __future__ import annotations

import math
import os

import torch

try:  # Triton ships with CUDA builds of torch; CPU builds (and CI) go without
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where Triton is missing
    triton = None

CHUNK = 64  # cache positions per attention program


def available(device: torch.device) -> bool:
    """On CUDA with Triton; or on the CPU under Triton's interpreter (TRITON_INTERPRET=1, set before
    Triton is imported), which is how the tests check these kernels on machines without a GPU."""
    if triton is None:
        return False
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


if triton is not None:

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, y_ptr, N, K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     RELU2: tl.constexpr):
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = rn < N
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):  # K is a multiple of BLOCK_K (checked by the caller)
            rk = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + rk).to(tl.float32)
            w = tl.load(w_ptr + rn[:, None] * K + rk[None, :], mask=nmask[:, None], other=0.0,
                        eviction_policy="evict_first")
            acc += w.to(tl.float32) * x[None, :]
        y = tl.sum(acc, axis=1)
        if RELU2:
            y = tl.maximum(y, 0.0)
            y = y * y
        tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty), mask=nmask)

    @triton.jit
    def _attn_split_kernel(q_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr, pos_ptr, m_ptr, l_ptr, acc_ptr,
                           H, G, window, scale, stride_qb, stride_kb, stride_vb, stride_cb, stride_ch, stride_cl,
                           NSPLIT: tl.constexpr, D: tl.constexpr, CHUNK: tl.constexpr, BLOCK_L: tl.constexpr):
        bh = tl.program_id(0)
        split = tl.program_id(1)
        b = bh // H
        h = bh % H
        kvh = h // G
        pos = tl.load(pos_ptr + b).to(tl.int32)       # where this row's new token goes
        d = tl.arange(0, D)
        q = tl.load(q_ptr + b * stride_qb + h * D + d).to(tl.float32) * scale
        chunk_lo = split * CHUNK
        lo = tl.maximum(chunk_lo, pos - window + 1)    # window >= 1; a huge window means the whole past
        hi = tl.minimum(chunk_lo + CHUNK, pos)         # exclusive: position pos comes from k/v below
        m = tl.max(tl.full((BLOCK_L,), float("-inf"), tl.float32), axis=0)
        l = tl.sum(tl.zeros((BLOCK_L,), tl.float32), axis=0)
        acc = tl.zeros((D,), tl.float32)
        base = b * stride_cb + kvh * stride_ch
        for s0 in range(0, CHUNK, BLOCK_L):  # fixed trip count; masked loads of skipped positions cost no traffic
            j = chunk_lo + s0 + tl.arange(0, BLOCK_L)
            valid = (j >= lo) & (j < hi)
            offs = base + j[:, None] * stride_cl + d[None, :]
            kt = tl.load(kc_ptr + offs, mask=valid[:, None], other=0.0).to(tl.float32)
            s = tl.where(valid, tl.sum(kt * q[None, :], axis=1), float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(s - m_safe)
            alpha = tl.exp(m - m_safe)
            # V is loaded only now: with both tiles live in fp32, two warps ran out of registers
            # (a depth-20 step's attention went from 137 to 207 us on an H200)
            vt = tl.load(vc_ptr + offs, mask=valid[:, None], other=0.0).to(tl.float32)
            acc = acc * alpha + tl.sum(p[:, None] * vt, axis=0)
            l = l * alpha + tl.sum(p, axis=0)
            m = m_new
        if (pos >= chunk_lo) & (pos < chunk_lo + CHUNK):
            kn = tl.load(k_ptr + b * stride_kb + kvh * D + d)
            vn = tl.load(v_ptr + b * stride_vb + kvh * D + d)
            s = tl.sum(kn.to(tl.float32) * q, axis=0)
            m_new = tl.maximum(m, s)
            alpha = tl.exp(m - m_new)
            p = tl.exp(s - m_new)
            acc = acc * alpha + p * vn.to(tl.float32)
            l = l * alpha + p
            m = m_new
            if h % G == 0:  # one query head per kv head stores the new key and value
                tl.store(kc_ptr + base + pos * stride_cl + d, kn.to(kc_ptr.dtype.element_ty))
                tl.store(vc_ptr + base + pos * stride_cl + d, vn.to(vc_ptr.dtype.element_ty))
        out = bh * NSPLIT + split
        tl.store(m_ptr + out, m)
        tl.store(l_ptr + out, l)
        tl.store(acc_ptr + out * D + d, acc)

    @triton.jit
    def _attn_combine_kernel(m_ptr, l_ptr, acc_ptr, o_ptr, NSPLIT: tl.constexpr, NSPLIT_P2: tl.constexpr,
                             D: tl.constexpr):
        bh = tl.program_id(0)
        sp = tl.arange(0, NSPLIT_P2)
        smask = sp < NSPLIT
        d = tl.arange(0, D)
        m = tl.load(m_ptr + bh * NSPLIT + sp, mask=smask, other=float("-inf"))
        l = tl.load(l_ptr + bh * NSPLIT + sp, mask=smask, other=0.0)
        acc = tl.load(acc_ptr + (bh * NSPLIT + sp)[:, None] * D + d[None, :], mask=smask[:, None], other=0.0)
        top = tl.max(m, axis=0)  # finite: the split holding the new token always has a score
        w = tl.exp(m - top)      # exp(-inf) = 0 for splits that saw nothing
        o = tl.sum(w[:, None] * acc, axis=0) / tl.sum(w * l, axis=0)
        tl.store(o_ptr + bh * D + d, o.to(o_ptr.dtype.element_ty))


# ---- launchers (plain functions, so benchmarks can sweep their tile sizes) -------------------------

def gemv_config(N: int, K: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps) for an (N, K) weight.

    From a sweep on an H200 (depth-20 shapes, each call inside a CUDA graph, us per call, cuBLAS in
    brackets): (3840, 1280) 4.4 [5.4]; (1280, 1280) 2.3 [4.7]; (5120, 1280) 5.0 [6.1];
    (1280, 5120) 4.9 [8.4]; (32768, 1280) 20.6 [22.5]. Small matrices want many light programs
    (one row each) so every SM has loads in flight at once; a long K wants wide loads and more warps.
    """
    if os.environ.get("TRITON_INTERPRET") == "1":
        return 64, 128, 4  # the interpreter pays per program: few, large ones (tests only)
    if N >= 16384:
        return 4, 256, 4
    if K >= 4096 and K % 1024 == 0:
        return 1, 1024, 8
    return 1, (256 if K % 256 == 0 else 128), 2


def launch_gemv(x: torch.Tensor, weight: torch.Tensor, relu2: bool = False, config=None) -> torch.Tensor:
    N, K = weight.shape
    block_n, block_k, warps = config or gemv_config(N, K)
    y = torch.empty(x.shape[:-1] + (N,), device=x.device, dtype=x.dtype)
    _gemv_kernel[(triton.cdiv(N, block_n),)](x, weight, y, N, K, BLOCK_N=block_n, BLOCK_K=block_k, RELU2=relu2,
                                             num_warps=warps)
    return y


def gemv_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """One row, contiguous operands, K a multiple of 128 (the kernel has no K mask)."""
    return (x.numel() == x.shape[-1] and x.is_contiguous() and weight.is_contiguous()
            and weight.shape[1] % 128 == 0 and x.dtype == weight.dtype)


def launch_decode_attention(q, k, v, k_cache, v_cache, positions, window: int, block_l: int = 32, warps: int = 2,
                            chunk: int | None = None) -> torch.Tensor:
    """q (B, H, D), k/v (B, Hkv, D) (each row's heads contiguous), caches (B, Hkv, L, D) contiguous,
    positions (B,) the index the new token takes. Returns (B, H, D) in q's dtype."""
    B, H, D = q.shape
    Hkv, L = k_cache.shape[1], k_cache.shape[2]
    if chunk is None:  # the interpreter pays per program: one split per row and head there (tests only)
        chunk = 256 if os.environ.get("TRITON_INTERPRET") == "1" else CHUNK
    nsplit = triton.cdiv(L, chunk)
    m = torch.empty(B * H * nsplit, device=q.device, dtype=torch.float32)
    l = torch.empty_like(m)
    acc = torch.empty(B * H * nsplit, D, device=q.device, dtype=torch.float32)
    _attn_split_kernel[(B * H, nsplit)](
        q, k, v, k_cache, v_cache, positions, m, l, acc, H, H // Hkv, window, 1.0 / math.sqrt(D),
        q.stride(0), k.stride(0), v.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        NSPLIT=nsplit, D=D, CHUNK=chunk, BLOCK_L=block_l, num_warps=warps)
    out = torch.empty(B, H, D, device=q.device, dtype=q.dtype)
    _attn_combine_kernel[(B * H,)](m, l, acc, out, NSPLIT=nsplit, NSPLIT_P2=triton.next_power_of_2(nsplit), D=D,
                                   num_warps=4)
    return out


# ---- custom ops: what the model calls -------------------------------------------------------------

@torch.library.custom_op("chatforge::gemv", mutates_args=())
def gemv(x: torch.Tensor, weight: torch.Tensor, relu2: bool) -> torch.Tensor:
    """x (..., K) holding one row, weight (N, K): x W^T, optionally relu(.)^2, in x's dtype."""
    return launch_gemv(x, weight, relu2)


@gemv.register_fake
def _(x, weight, relu2):
    return x.new_empty(x.shape[:-1] + (weight.shape[0],))


@torch.library.custom_op("chatforge::decode_attention", mutates_args=("k_cache", "v_cache"))
def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, positions: torch.Tensor, window: int) -> torch.Tensor:
    """One new token per row: store k/v at `positions` in the caches and attend over positions
    (positions - window, positions]. q (B, H, D), k/v (B, Hkv, D). Returns (B, H, D)."""
    return launch_decode_attention(q, k, v, k_cache, v_cache, positions, window)


@decode_attention.register_fake
def _(q, k, v, k_cache, v_cache, positions, window):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def decode_attention_supported(q, k, v, k_cache) -> bool:
    D = q.shape[-1]
    return (D & (D - 1)) == 0 and q.stride(-1) == 1 and q.stride(-2) == D and k.stride(-2) == D and \
        k.stride(-1) == 1 and v.stride(-2) == D and v.stride(-1) == 1 and k_cache.is_contiguous()
