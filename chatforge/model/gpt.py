"""The GPT: a decoder-only Transformer, its training forward, its KV-cache forward, and its FLOPs.

Where it sits: `train/*` calls `forward(idx, targets)` for a loss; `infer/engine.py` allocates a
`KVCache` and calls `forward(idx, kv_cache=cache)` for logits; `model/optim.py` updates the weights;
`model/speedups.py` wraps a built model in compile/FP8 from outside (this file knows neither).

The architecture, top to bottom, and why:
- token embedding, untied from the output head (separate tables learn faster at small scale);
- n_layer blocks of  x + attn(norm(x))  then  x + mlp(norm(x))  (pre-norm residual stream);
- RMSNorm without learnable gain (`F.rms_norm`): the optimizer has nothing to tune there;
- attention with rotary position embeddings (RoFormer), QK-norm (keeps attention logits bounded so
  higher learning rates stay stable), optional grouped-query attention (n_kv_head divides n_head,
  as in GQA, Ainslie et al. 2023) and an optional per-layer sliding window;
- MLP with ReLU² activation (Primer, So et al. 2021), 4x width, no biases anywhere;
- a final norm, the output head, and logit soft-capping  softcap * tanh(logits / softcap)  (Gemma 2)
  which keeps early-training logits from running away.

Sliding windows: `window_pattern` is a string of `S`/`L` tiled over the layers; `L` attends to the
whole context, `S` to the last `short_window(config)` = sequence_len // 4 tokens (512 at seq 2048:
a quarter of the context cuts attention cost while the L layers keep long-range reach). The last
layer is always `L`, whatever the pattern says, so the final representation sees everything.

Precision: every parameter is fp32 (the optimizer's master copy). On CUDA the training stage runs
the forward under autocast (bf16); the embedding output is cast to the autocast dtype right away so
the residual stream is bf16 too. We do not store the embedding table itself in bf16: AdamW updates
of ~1e-4 relative size vanish in bf16's 8-bit mantissa, and the table is small next to activations.
Logits are always returned in fp32. With `fused_loss` set, a training loss (targets, grad on) never
forms them whole: `model/fused_loss.py` runs the head, soft-cap and cross-entropy chunk by chunk.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from chatforge.errors import UsageError
from chatforge.model import attention
from chatforge.model.attention import linear
from chatforge.model.fused_loss import linear_softcap_cross_entropy

# Rotary tables cover this many times sequence_len, so generation may run past the training length.
ROTARY_MARGIN = 10
ROTARY_BASE = 10000.0


@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 32768
    n_layer: int = 12
    n_head: int = 6
    n_kv_head: int = 6
    n_embd: int = 768
    window_pattern: str = "L"
    softcap: float = 15.0

    def __post_init__(self):
        if self.n_embd % self.n_head != 0:
            raise UsageError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}; change --depth or the head size")
        if (self.n_embd // self.n_head) % 2 != 0:
            raise UsageError(f"head_dim {self.n_embd // self.n_head} must be even for rotary embeddings; change the head size")
        if self.n_kv_head < 1 or self.n_head % self.n_kv_head != 0:
            raise UsageError(f"n_kv_head {self.n_kv_head} must divide n_head {self.n_head}; change --n-kv-head")
        pattern = self.window_pattern.upper()
        if not pattern or set(pattern) - {"S", "L"}:
            raise UsageError(f"--window-pattern {self.window_pattern!r} must be a non-empty string of S and L, e.g. SSSL")
        self.window_pattern = pattern

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict:
        return asdict(self)


def short_window(config: GPTConfig) -> int:
    """How many past tokens (including itself) an `S` layer's query may see."""
    return max(1, config.sequence_len // 4)


def layer_windows(config: GPTConfig) -> list[int | None]:
    """Per layer: a window length for `S` layers, None for full-context `L` layers (the last is always L)."""
    pattern = config.window_pattern
    windows = [short_window(config) if pattern[i % len(pattern)] == "S" else None for i in range(config.n_layer)]
    windows[-1] = None
    return windows


# ---------------------------------------------------------------------------------------------
# rotary position embeddings


def rotary_tables(head_dim: int, length: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (length, head_dim // 2), fp32: pair i of a head rotates at base^(-2i/D)."""
    inv_freq = 1.0 / (ROTARY_BASE ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    angles = torch.outer(torch.arange(length, dtype=torch.float32, device=device), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, T, H, D) by cos/sin broadcastable to (B, T, 1, D/2); the two halves of D form the pairs."""
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],))


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int, window: int | None):
        super().__init__()
        self.layer_idx = layer_idx
        self.window = window
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(self.n_head * self.head_dim, config.n_embd, bias=False)
        self.c_qkv = None
        self.kernels: frozenset = frozenset()  # decode kernels in use, set by GPT.fuse_for_inference
        self.sdpa_backends = attention.sdpa_backends()  # CUDA training's SDPA order, read at build time
        self.qkv_sizes = (self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim)

    @torch.no_grad()
    def fuse_qkv(self) -> None:
        """Inference only: replace the three projections by one (they stop training separately)."""
        if self.c_qkv is not None:
            return
        weight = torch.cat([self.c_q.weight, self.c_k.weight, self.c_v.weight], dim=0)
        self.c_qkv = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
        self.c_qkv.weight.copy_(weight)
        del self.c_q, self.c_k, self.c_v

    def forward(self, x, cos, sin, kv_cache=None, step=None):
        B, T, _ = x.shape
        if self.c_qkv is not None:  # inference: one matmul (one weight read) instead of three
            q, k, v = linear(x, self.c_qkv, self.kernels).split(self.qkv_sizes, dim=-1)
        else:
            q, k, v = self.c_q(x), self.c_k(x), self.c_v(x)
        q = q.view(B, T, self.n_head, self.head_dim)      # (B, T, H, D)
        k = k.view(B, T, self.n_kv_head, self.head_dim)   # (B, T, Hkv, D)
        v = v.view(B, T, self.n_kv_head, self.head_dim)   # (B, T, Hkv, D)
        # QK-norm, then rotate (RMS over D is unchanged by the rotation, so the order is free)
        q, k = apply_rotary(norm(q), cos, sin), apply_rotary(norm(k), cos, sin)
        if kv_cache is not None and T == 1:
            y = attention.decode_step(q[:, 0], k[:, 0], v[:, 0], kv_cache.k[self.layer_idx],
                                      kv_cache.v[self.layer_idx], kv_cache.lengths, self.window, self.kernels)
            if y is not None:  # (B, H, D): the decode kernel wrote this step's k/v and attended
                return linear(y.view(B, T, self.n_head * self.head_dim), self.c_proj, self.kernels)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, D)
        if kv_cache is None:
            y = attention.causal(q, k, v, self.window, self.sdpa_backends)
        else:
            y = self._attend_cached(q, k, v, kv_cache, step)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, C)
        return linear(y, self.c_proj, self.kernels)

    def _attend_cached(self, q, k, v, cache: "KVCache", step: "CachedStep"):
        """Write k/v at each row's positions, then attend over the whole static cache with a mask.

        Shapes never depend on the values in `cache.lengths`, so a decode step has no host sync and
        can be captured in a CUDA graph.
        """
        B, H, T, D = q.shape
        k_cache, v_cache = cache.k[self.layer_idx], cache.v[self.layer_idx]  # (B, Hkv, L, D) each
        # index_put_ into a per-layer tensor: torch.compile turns this into an in-place write
        # (a scatter_ into a view of one big cache made it copy the whole layer every step)
        k_cache[step.rows, :, step.positions] = k.transpose(1, 2).to(k_cache.dtype)  # (B, T, Hkv, D) into (B, Hkv, L, D)
        v_cache[step.rows, :, step.positions] = v.transpose(1, 2).to(v_cache.dtype)
        # GQA without copying the cache: fold each kv head's G query heads into the query axis
        G = H // self.n_kv_head
        q = q.reshape(B, self.n_kv_head, G * T, D).to(k_cache.dtype)  # (B, Hkv, G*T, D)
        mask = step.masks[self.window]                                 # (B, 1, G*T, L)
        y = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask)
        return y.reshape(B, H, T, D)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)
        self.kernels: frozenset = frozenset()

    def forward(self, x):
        return linear(linear(x, self.c_fc, self.kernels, relu2=True), self.c_proj, self.kernels)


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int, window: int | None):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx, window)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, kv_cache=None, step=None):
        x = x + self.attn(norm(x), cos, sin, kv_cache, step)
        x = x + self.mlp(norm(x))
        return x


# ---------------------------------------------------------------------------------------------
# the model


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.windows = layer_windows(config)
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(config.vocab_size, config.n_embd),
            "h": nn.ModuleList([Block(config, i, w) for i, w in enumerate(self.windows)]),
        })
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.kernels: frozenset = frozenset()
        # True: training losses go through model/fused_loss.py (no full fp32 logits). Off by default:
        # compiled, the plain path was as fast and 2.6 GiB lighter at depth 20 on an H200 (Inductor
        # already fuses soft-cap and cross-entropy; docs/benchmarks.md). `bench train --loss fused`.
        self.fused_loss = False
        self.loss_chunk_rows: int | None = None
        self.rotary_len = config.sequence_len * ROTARY_MARGIN
        cos, sin = rotary_tables(config.head_dim, self.rotary_len)
        # not saved in checkpoints: recomputed by init_weights() (call it after `to_empty`)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Fresh weights, and the rotary tables recomputed on the model's device.

        Input-side matrices get uniform(-a, a) with std 1/sqrt(fan_in); output projections of each
        residual branch start at zero, so at step 0 every block is the identity and the signal path
        is the embedding straight into the head. The head starts tiny so initial logits are ~uniform.
        """
        cfg = self.config
        bound = math.sqrt(3.0 / cfg.n_embd)
        nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=1.0)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        for block in self.transformer.h:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                nn.init.uniform_(lin.weight, -bound, bound)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
        cos, sin = rotary_tables(cfg.head_dim, self.rotary_len, device=self.cos.device)
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    def fuse_for_inference(self, kernels: str | None = None) -> "GPT":
        """Fewer, larger kernels per decode step (a frozen copy for the engine; not for training).

        kernels: which Triton decode kernels (model/decode_kernels.py) to use on CUDA: "all",
        "gemv", "attn" or "none"; default CHATFORGE_DECODE_KERNELS, else "all" where Triton exists.
        """
        for block in self.transformer.h:
            block.attn.fuse_qkv()
        chosen = attention.decode_kernels_for(self.lm_head.weight.device, kernels)
        self.kernels = chosen
        for block in self.transformer.h:
            block.attn.kernels = block.mlp.kernels = chosen
        return self

    def num_params(self, include_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n if include_embedding else n - self.transformer.wte.weight.numel()

    def estimate_flops(self) -> float:
        """Training FLOPs per token: 6 per matmul weight (forward + backward) plus attention scores.

        Attention per layer per token: 12 * n_head * head_dim * span, where span is the window for
        `S` layers and sequence_len for `L` layers (counted over the full span, as nanochat and
        the PaLM paper's MFU do, not halved for causality). The embedding is a lookup, not a matmul.
        """
        cfg = self.config
        matmul_params = self.num_params(include_embedding=False)
        attn = sum(12 * cfg.n_head * cfg.head_dim * min(w or cfg.sequence_len, cfg.sequence_len) for w in self.windows)
        return 6.0 * matmul_params + attn

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, kv_cache: "KVCache | None" = None,
                loss_reduction: str = "mean", logits_at: torch.Tensor | None = None):
        """idx (B, T) int64. Returns fp32 logits (B, T, V), or with targets the cross-entropy loss:
        a scalar for "mean"/"sum", (B, T) for "none" (0 where targets == -1, which is ignored).
        logits_at (B,) int64: only row b's logits at position logits_at[b], (B, 1, V) (a prefill
        samples from one position per prompt; the head over every position is most of its memory)."""
        B, T = idx.shape
        if kv_cache is None:
            if T > self.rotary_len:
                raise UsageError(f"sequence of {T} tokens is longer than the rotary table ({self.rotary_len}); lower --max-seq-len")
            step = None
            cos, sin = self.cos[None, :T, None, :], self.sin[None, :T, None, :]  # (1, T, 1, D/2)
        else:
            step = CachedStep.build(self.config, self.windows, kv_cache, T)
            cos, sin = self.cos[step.positions][:, :, None, :], self.sin[step.positions][:, :, None, :]  # (B, T, 1, D/2)
        x = self.transformer.wte(idx)  # (B, T, C)
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        x = norm(x)
        for block in self.transformer.h:
            x = block(x, cos, sin, kv_cache, step)
        x = norm(x)
        if logits_at is not None:
            x = x[torch.arange(B, device=x.device), logits_at][:, None]  # (B, 1, C)
        if targets is not None and self._fused_loss_applies(kv_cache, loss_reduction):
            return linear_softcap_cross_entropy(x.reshape(B * T, -1), self.lm_head.weight, targets.reshape(B * T),
                                                self.config.softcap, loss_reduction, self.loss_chunk_rows)
        logits = linear(x, self.lm_head, self.kernels).float()  # (B, T, V)
        if self.config.softcap > 0:
            logits = self.config.softcap * torch.tanh(logits / self.config.softcap)
        if kv_cache is not None:
            kv_cache.lengths += T
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.view(B * T, -1), targets.reshape(B * T), ignore_index=-1,
                               reduction=loss_reduction)
        return loss.view(B, T) if loss_reduction == "none" else loss

    def _fused_loss_applies(self, kv_cache, loss_reduction: str) -> bool:
        """Training only: grad on, a scalar loss, no cache, and a head that is a plain Linear (anything
        else, e.g. a swapped-in kernel, knows its own matmul). Evaluation and per-token losses ("none")
        keep the plain path, so their numbers do not move."""
        return (self.fused_loss and kv_cache is None and loss_reduction in ("mean", "sum")
                and torch.is_grad_enabled() and type(self.lm_head) is nn.Linear and not self.kernels)


@dataclass
class CachedStep:
    """What every layer of one cached forward shares, computed once instead of once per layer:
    the new tokens' positions (B, T), their row indices, and the additive attention mask per window
    size (B, 1, G*T, L), laid out for the GQA-folded query axis."""

    positions: torch.Tensor
    rows: torch.Tensor
    masks: dict

    @staticmethod
    def build(config: GPTConfig, windows: list, cache: "KVCache", T: int) -> "CachedStep":
        device = cache.lengths.device
        B, L = cache.batch_size, cache.max_len
        positions = cache.lengths[:, None] + torch.arange(T, device=device)  # (B, T)
        rows = torch.arange(B, device=device)[:, None].expand(B, T)
        delta = positions[:, :, None] - torch.arange(L, device=device)[None, None, :]  # (B, T, L): query - key
        G = config.n_head // config.n_kv_head
        masks = {}
        for window in set(windows):
            allowed = delta >= 0
            if window is not None:
                allowed = allowed & (delta < window)
            allowed = allowed[:, None].expand(B, G, T, L).reshape(B, 1, G * T, L)
            # additive and in the cache's dtype: SDPA would otherwise convert a boolean mask in every layer
            bias = torch.zeros(allowed.shape, dtype=cache.k[0].dtype, device=device)
            masks[window] = bias.masked_fill_(~allowed, float("-inf"))
        return CachedStep(positions, rows, masks)


class KVCache:
    """Static keys and values for generation: per layer, k[i] and v[i] of (B, n_kv_head, max_len, head_dim).

    Row b's next tokens go at positions lengths[b], lengths[b]+1, ...; the model advances `lengths`
    after each forward. Rows may sit at different lengths during decode; attention always runs over
    the whole max_len with a mask, so no shape depends on the data. Nothing checks (that would be a
    host sync) that lengths + T <= max_len: the engine keeps within the cache it allocated.
    """

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int, device, dtype=torch.float32):
        limit = config.sequence_len * ROTARY_MARGIN
        if max_len > limit:
            raise UsageError(f"KV cache max_len {max_len} exceeds the model's rotary range {limit}; ask for fewer tokens")
        shape = (batch_size, config.n_kv_head, max_len, config.head_dim)
        self.config = config
        self.batch_size, self.max_len = batch_size, max_len
        # one tensor per layer, so each layer's write is in place on its own storage
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.lengths = torch.zeros(batch_size, dtype=torch.int64, device=device)

    def reset(self) -> None:
        self.lengths.zero_()

    def head(self, rows: int) -> "KVCache":
        """The first `rows` rows as a cache sharing this one's storage (a view: writes go through)."""
        view = KVCache.__new__(KVCache)
        view.config, view.batch_size, view.max_len = self.config, rows, self.max_len
        view.k = [t[:rows] for t in self.k]
        view.v = [t[:rows] for t in self.v]
        view.lengths = self.lengths[:rows]
        return view

    def window(self, rows: int, length: int) -> "KVCache":
        """The first `rows` rows' first `length` positions as a cache sharing this one's storage (a
        view: writes go through); for attending over what the rows have written, not the whole cache."""
        view = self.head(rows)
        view.max_len = length
        view.k = [t[:, :, :length] for t in view.k]
        view.v = [t[:, :, :length] for t in view.v]
        return view

    @torch.no_grad()
    def copy_rows(self, src_cache: "KVCache", src_rows, dst_rows) -> None:
        """Copy rows src_rows of src_cache into rows dst_rows of this cache (keys, values, lengths).

        src_cache may be shorter (max_len) than this one; its positions land at the same indices.
        """
        src = torch.as_tensor(src_rows, dtype=torch.int64, device=src_cache.lengths.device)
        dst = torch.as_tensor(dst_rows, dtype=torch.int64, device=self.lengths.device)
        if src.numel() != dst.numel():
            raise ValueError(f"copy_rows got {src.numel()} source rows and {dst.numel()} destination rows")
        n = src_cache.max_len
        if n > self.max_len:
            raise ValueError(f"source cache max_len {n} is longer than this cache's {self.max_len}")
        for mine, theirs in zip(self.k + self.v, src_cache.k + src_cache.v):
            mine[dst, :, :n] = theirs[src].to(mine)
        self.lengths[dst] = src_cache.lengths[src].to(self.lengths.device)
