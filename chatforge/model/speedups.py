"""Speed applied to a built model from outside: torch.compile and FP8 matmuls. The model knows neither.

Where it sits: a training stage builds `GPT`, calls `prepare_model(model, runtime, compile=..., fp8=...)`,
then builds the optimizer over the same parameters. There is no DDP wrapper: `model/optim.py`
reduce-scatters gradients itself, so the model stays a plain module on every rank.

- compile: `nn.Module.compile(dynamic=False)` compiles the forward in place, so parameter names,
  `state_dict()` keys and the optimizer's parameter objects are all unchanged. CUDA only: on CPU the
  compile time is not repaid and tests must stay eager.
- fp8 (`--fp8`, GPUs with FP8 tensor cores: sm89 and Hopper sm90+): every Linear inside the blocks
  becomes a `Float8Linear` that quantizes its input and weight to float8_e4m3 (gradients to
  float8_e5m2, which trades mantissa for the range gradients need) with one dynamic scale per tensor
  (amax of this call, as in torchao's "tensorwise" recipe) and multiplies with `torch._scaled_mm`,
  forward and both backward matmuls. The weight stays the fp32 master Parameter; only its fp8 copy
  is made per call. The output head keeps bf16: its logits feed the loss directly and are the most
  precision-sensitive matmul, and the embedding is a lookup, not a matmul.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from chatforge.errors import UsageError
from chatforge.runtime import Runtime, print0

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2


def _quantize(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x scaled so its amax lands on the fp8 format's max, cast; returns (x_fp8, dequant scale)."""
    fmax = torch.finfo(dtype).max
    amax = x.detach().abs().amax().float().clamp(min=1e-12)
    scale = fmax / amax
    x8 = (x.float() * scale).clamp(-fmax, fmax).to(dtype)
    return x8, scale.reciprocal()


def _col_major(x8: torch.Tensor) -> torch.Tensor:
    """The same (rows, cols) matrix laid out column-major, as _scaled_mm wants its second operand."""
    return x8.t().contiguous().t()


class _Float8Matmul(torch.autograd.Function):
    """y = x @ w.T with fp8 operands, per-tensor scales; x (M, K), w (N, K)."""

    @staticmethod
    def forward(ctx, x, w, out_dtype):
        x8, sx = _quantize(x, E4M3)
        w8, sw = _quantize(w, E4M3)
        ctx.save_for_backward(x8, sx, w8, sw)
        ctx.out_dtype = out_dtype
        # w8 is (N, K) row-major, so w8.t() is the column-major (K, N) operand _scaled_mm expects
        return torch._scaled_mm(x8, w8.t(), scale_a=sx, scale_b=sw, out_dtype=out_dtype, use_fast_accum=True)

    @staticmethod
    def backward(ctx, grad_out):
        x8, sx, w8, sw = ctx.saved_tensors
        g8, sg = _quantize(grad_out, E5M2)                   # (M, N)
        # dL/dx = g @ w : (M, N) @ (N, K)
        grad_x = torch._scaled_mm(g8, _col_major(w8), scale_a=sg, scale_b=sw, out_dtype=ctx.out_dtype)
        # dL/dw = g.T @ x : (N, M) @ (M, K), in fp32 for the fp32 master weight
        grad_w = torch._scaled_mm(g8.t().contiguous(), _col_major(x8), scale_a=sg, scale_b=sx,
                                  out_dtype=torch.float32)
        return grad_x, grad_w, None


class Float8Linear(nn.Linear):
    """An nn.Linear (no bias) whose matmuls run in fp8; same Parameter, same state_dict key."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out_dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        if out_dtype == torch.float32 and x.dtype != torch.float32:
            out_dtype = x.dtype
        lead = x.shape[:-1]
        with torch.autocast(x.device.type, enabled=False):  # the fp8 operands must reach _scaled_mm as they are
            y = _Float8Matmul.apply(x.reshape(-1, x.shape[-1]), self.weight, out_dtype)
        return y.reshape(*lead, self.out_features)


def convert_to_float8(model: nn.Module) -> int:
    """Turn the Linear layers inside the blocks into Float8Linear in place; returns how many.

    Layers whose dimensions are not multiples of 16 (a _scaled_mm requirement) stay as they are.
    """
    converted = 0
    for name, module in model.named_modules():
        if (type(module) is nn.Linear and name.startswith("transformer.h.") and module.bias is None
                and module.in_features % 16 == 0 and module.out_features % 16 == 0):
            module.__class__ = Float8Linear
            converted += 1
    return converted


def fp8_supported(device: torch.device) -> tuple[bool, str]:
    if device.type != "cuda":
        return False, f"--fp8 needs an NVIDIA GPU with FP8 tensor cores (sm89/sm90+); this run is on {device.type}"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        return False, (f"--fp8 needs FP8 tensor cores (compute capability 8.9 or 9.0+, e.g. H100); "
                       f"this GPU is {major}.{minor}: drop --fp8")
    return True, f"compute capability {major}.{minor}"


def prepare_model(model: nn.Module, runtime: Runtime, compile: bool = True, fp8: bool = False) -> nn.Module:
    """Apply FP8 and compilation for this runtime; returns the same module (changed in place)."""
    if fp8:
        ok, why = fp8_supported(runtime.device)
        if not ok:
            raise UsageError(why)
        n = convert_to_float8(model)
        print0(f"fp8: {n} block Linear layers use float8 matmuls ({why}); lm_head stays {runtime.dtype}")
    if compile:
        if runtime.device.type == "cuda":
            model.compile(dynamic=False)
            print0("torch.compile: on (dynamic=False); the first steps include compilation")
        else:
            print0(f"torch.compile: skipped on {runtime.device.type} (it only pays off on CUDA)")
    return model
