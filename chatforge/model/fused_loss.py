"""The training loss without the full logits: output head, soft-cap and cross-entropy, chunked over rows.

Where it sits: with `GPT.fused_loss` set, `GPT.forward` calls `linear_softcap_cross_entropy(h,
lm_head.weight, targets, ...)` when it trains (targets given, grad on, a "mean" or "sum" loss);
inference and evaluation take the plain path. It is opt-in (`bench train --loss fused` sets it): compiled,
the plain loss measured as fast and lighter at depth 20 (docs/benchmarks.md), so no stage turns it on.

Why: the plain loss makes (rows, V) fp32 logits, their soft-capped copy and their gradient — at depth
20, 32 x 2048 rows and V = 32768, 8.6 GB each — only to reduce them to one number. Here the rows go
through in chunks, and each chunk's gradient is taken in the forward, while its logits exist anyway:

    z = h_c @ W^T  (compute dtype, fp32 accumulation)      zc = softcap * tanh(z / softcap)
    loss_r = logsumexp(zc_r) - zc_r[target_r]              (0 for ignored targets, target == -1)
    dL/dz = (softmax(zc) - onehot(target)) * (1 - tanh^2) * scale_r
    grad_h_c = dL/dz @ W        grad_W += (dL/dz)^T @ h_c

scale_r is 1 for "sum", 1 / (number of counted targets) for "mean", 0 for ignored rows. backward then
only multiplies the saved grad_h and grad_W by the incoming gradient (a scalar: the loss is one).
The idea is the one behind Liger Kernel's fused linear cross-entropy; this is our own code.

Numerics match the plain path under bf16 autocast: the head matmul runs in bf16 and its output is
widened to fp32 before the soft-cap, as `linear(...).float()` does; dL/dz is rounded to bf16 before its
two matmuls, as autograd rounds it at that `.float()`. grad_W is summed over chunks in fp32 (the plain
path rounds the whole sum to bf16 once), so the two agree within bf16 rounding. Without autocast all
of it is fp32.

Speed: `_chunk_loss_and_grad` is plain tensor code so that torch.compile (the model is compiled on
CUDA) fuses the soft-cap, log-sum-exp and gradient into a couple of kernels per chunk that read the
bf16 logits instead of writing fp32 copies; the chunk loop unrolls into the compiled graph. Eager (the
CPU, or --compile off) runs the same code op by op, with a few fp32 chunk-sized temporaries.
"""

from __future__ import annotations

import torch

# The largest chunk's fp32 logits, in bytes: 2048 rows at V = 32768. Large enough that each chunk's
# matmuls stay efficient, small enough that the chunk's temporaries are noise next to activations.
CHUNK_BYTES = 256 * 2**20


def chunk_rows_for(vocab_size: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Rows per chunk so that one chunk's fp32 logits take at most chunk_bytes (at least one row)."""
    return max(1, chunk_bytes // (4 * vocab_size))


def linear_softcap_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float,
                                 reduction: str = "mean", chunk_rows: int | None = None) -> torch.Tensor:
    """Cross-entropy of softcap * tanh((h @ weight^T) / softcap) against targets, ignoring targets == -1.

    h (N, C), weight (V, C), targets (N,) int64; softcap <= 0 means no soft-cap. reduction "mean"
    (over counted targets) or "sum". The matmuls run in the autocast dtype when autocast is on, else
    in h's dtype; the loss is an fp32 scalar. chunk_rows: rows per chunk (default from CHUNK_BYTES).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"fused loss supports reduction 'mean' or 'sum', not {reduction!r}")
    device_type = h.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else h.dtype
    rows = chunk_rows or chunk_rows_for(weight.shape[0])
    return _LinearSoftcapCrossEntropy.apply(h, weight, targets, float(softcap), reduction, rows, dtype)


class _LinearSoftcapCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, softcap, reduction, chunk_rows, dtype):
        N = h.shape[0]
        with torch.autocast(h.device.type, enabled=False):  # every cast below is deliberate
            w = weight.to(dtype)                                        # (V, C)
            counted = targets != -1
            if reduction == "mean":  # a tensor, not .item(): no host sync, and compile keeps one graph
                scale = 1.0 / counted.sum().to(torch.float32)
            else:
                scale = torch.ones((), dtype=torch.float32, device=h.device)
            grad_h = []  # joined once at the end: under compile a write into a slice may copy the whole buffer
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device)  # (V, C)
            loss = torch.zeros((), dtype=torch.float32, device=h.device)
            for start in range(0, N, chunk_rows):
                end = min(start + chunk_rows, N)
                h_c = h[start:end].to(dtype)                            # (r, C)
                loss_c, dz = _chunk_loss_and_grad(h_c, w, targets[start:end], counted[start:end], scale, softcap)
                loss = loss + loss_c
                grad_h.append(dz @ w)                                   # (r, V) @ (V, C)
                grad_w += (dz.t() @ h_c).float()                       # (V, r) @ (r, C)
            loss = loss * scale
            grad_h = torch.cat(grad_h)                                  # (N, C)
        ctx.save_for_backward(grad_h.to(h.dtype), grad_w.to(weight.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_loss, grad_w * grad_loss, None, None, None, None, None


def _chunk_loss_and_grad(h_c, w, targets_c, counted_c, scale, softcap: float):
    """One chunk: the summed loss of its counted rows (fp32 scalar) and dL/dlogits (r, V) in w's dtype,
    already scaled for the reduction."""
    z = (h_c @ w.t()).float()                                          # (r, V)
    if softcap > 0:
        t = torch.tanh(z / softcap)
        z = softcap * t
    lse = torch.logsumexp(z, dim=-1)                                   # (r,)
    safe = targets_c.clamp(min=0)  # ignored rows point at column 0; their scale is 0 below
    picked = z.gather(1, safe[:, None]).squeeze(1)                     # (r,)
    loss = torch.where(counted_c, lse - picked, 0.0).sum()
    probs = torch.exp(z - lse[:, None])
    cols = torch.arange(z.shape[1], device=z.device)
    dz = torch.where(cols[None, :] == safe[:, None], probs - 1.0, probs)  # softmax - onehot
    dz = dz * torch.where(counted_c, scale, 0.0)[:, None]
    if softcap > 0:
        dz = dz * (1.0 - t * t)  # d(softcap * tanh(z / softcap)) / dz
    return loss, dz.to(w.dtype)
