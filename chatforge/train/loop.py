"""What every training stage shares: schedules, the accumulated training step, divergence checks,
eval/save cadence, and throughput/MFU/memory bookkeeping.

Small functions rather than a trainer class, so pretrain, midtrain, SFT and RL each keep their own
loop in plain sight and share only the arithmetic that must not drift between them.

Schedule defaults follow nanochat's current pretraining recipe (ARCHITECTURE/REFERENCE.md): no
warmup (Muon is stable from step 0), a constant phase, then a linear warmdown over the last 65% of
the steps to 5% of the peak LR — the warmup-stable-decay ("WSD") shape, which keeps a high LR for
most of the run and gets the annealing gain at the end. Muon's momentum warms from 0.85 to 0.95
over the first 300 steps (modded-nanogpt's recipe: low momentum while the gradients are large and
noisy), and weight decay falls linearly to zero so the final weights are not pulled toward zero
while the LR is already small.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from chatforge.errors import DataError, TrainingDiverged, UsageError

# ---------------------------------------------------------------------------------------------
# Schedules

@dataclass
class Schedule:
    num_iterations: int
    warmup_ratio: float = 0.0
    warmdown_ratio: float = 0.65
    final_lr_frac: float = 0.05
    momentum_start: float = 0.85
    momentum_end: float = 0.95
    momentum_warmup_steps: int = 300
    decay_weight_decay: bool = True

    def lr_multiplier(self, step: int) -> float:
        """1.0 on the plateau; ramps up over warmup, down linearly to final_lr_frac over warmdown."""
        n = self.num_iterations
        warmup = round(self.warmup_ratio * n)
        warmdown = round(self.warmdown_ratio * n)
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        if warmdown <= 0 or step <= n - warmdown:
            return 1.0
        left = max(n - step, 0) / warmdown  # 1 at the start of warmdown, 0 at the last step
        return self.final_lr_frac + (1.0 - self.final_lr_frac) * left

    def muon_momentum(self, step: int) -> float:
        if self.momentum_warmup_steps <= 0:
            return self.momentum_end
        frac = min(step / self.momentum_warmup_steps, 1.0)
        return self.momentum_start + (self.momentum_end - self.momentum_start) * frac

    def weight_decay_multiplier(self, step: int) -> float:
        if not self.decay_weight_decay or self.num_iterations <= 0:
            return 1.0
        return max(1.0 - step / self.num_iterations, 0.0)


def apply_schedules(optimizer: torch.optim.Optimizer, step: int, schedule: Schedule) -> dict:
    """Set every param group's lr (from its `initial_lr`), Muon momentum and weight decay for `step`.

    The first call records each group's starting weight decay as `initial_weight_decay`, which
    then travels inside the optimizer's state_dict, so a resumed run scales the same base value.
    Returns the values set, for logging.
    """
    lrm = schedule.lr_multiplier(step)
    momentum = schedule.muon_momentum(step)
    wdm = schedule.weight_decay_multiplier(step)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lrm
        if group.get("kind") == "muon":
            group["momentum"] = momentum
        if "weight_decay" in group:
            group.setdefault("initial_weight_decay", group["weight_decay"])
            group["weight_decay"] = group["initial_weight_decay"] * wdm
    return {"lr_multiplier": lrm, "muon_momentum": momentum, "weight_decay_multiplier": wdm}


# ---------------------------------------------------------------------------------------------
# One optimizer step's worth of forward/backward

def accumulate_gradients(model: torch.nn.Module, batches, accum_steps: int, runtime) -> torch.Tensor:
    """Forward/backward `accum_steps` micro-batches from `batches`; returns the mean loss (detached).

    Each micro loss is divided by `accum_steps` before backward, so the summed gradient equals the
    gradient of the mean loss over the whole batch — the same update as one big batch, provided
    every micro-batch has the same number of counted targets (true for packed pretraining rows).
    Gradients are not all-reduced here: the optimizer does its own communication across ranks.
    """
    total = None
    for _ in range(accum_steps):
        inputs, targets = next(batches)
        with runtime.autocast():
            loss = model(inputs, targets)
        (loss / accum_steps).backward()
        detached = loss.detach().float()
        total = detached if total is None else total + detached
    return total / accum_steps


def optimizer_step(train_model, model, optimizer, batches, accum_steps: int, runtime, step: int,
                   last_checkpoint, accumulate=accumulate_gradients) -> tuple[float, float]:
    """One training step: accumulate gradients, update, clear them; stop on a non-finite loss.

    `train_model` is what runs forward (maybe compiled), `model` owns the gradients. Returns the loss
    averaged over ranks and the step's wall time in seconds.
    """
    with StepTimer(runtime) as timer:
        loss = accumulate(train_model, batches, accum_steps, runtime)
        optimizer.step()
        model.zero_grad(set_to_none=True)
    mean_loss = global_mean(loss)
    check_finite(mean_loss, step, last_checkpoint)
    return mean_loss, timer.seconds


# What the CPU allocator and MPS say when an allocation fails: they raise a plain RuntimeError
# (CUDA has torch.OutOfMemoryError), so only the message tells it from a bug.
_OOM_MESSAGES = {"DefaultCPUAllocator: can't allocate memory": "CPU", "MPS backend out of memory": "GPU"}


@contextmanager
def out_of_memory_advice(advice: str | Callable[[], str]):
    """Turn running out of memory into one line: "out of <GPU|CPU> memory <advice>".

    `advice` names the run's sizes and the flag to lower; a callable is asked only when memory runs
    out, so it can name sizes settled inside the block (an auto device batch is not known before).
    The kernel's OOM killer ends a process without any exception, so this catches only what the
    allocators themselves report.
    """
    try:
        yield
    except torch.OutOfMemoryError:
        raise UsageError(f"out of GPU memory {_text(advice)}") from None
    except RuntimeError as exc:
        where = next((kind for text, kind in _OOM_MESSAGES.items() if text in str(exc)), None)
        if where is None:
            raise
        raise UsageError(f"out of {where} memory {_text(advice)}") from None


def _text(advice: str | Callable[[], str]) -> str:
    return advice() if callable(advice) else advice


def _global_sum(value: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def accumulate_masked_gradients(model: torch.nn.Module, batches, accum_steps: int, runtime) -> torch.Tensor:
    """Like accumulate_gradients, for micro-batches with different numbers of counted targets (SFT).

    Dividing each micro-batch's mean by accum_steps would weigh a target in a short micro-batch more
    than one in a long one. Instead the step's micro-batches are drawn first, their counted targets
    (targets != -1) summed over every micro-batch and rank, and each summed loss scaled by
    world_size / that count: the optimizer averages gradients over ranks, so the update is the
    gradient of the mean loss per counted target of the whole step. Returns this rank's share times
    world_size, so `global_mean` of it is that exact per-target mean.
    """
    micro = [next(batches) for _ in range(accum_steps)]
    count = sum((targets != -1).sum() for _, targets in micro).to(torch.float32)
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    scale = world / _global_sum(count).clamp(min=1.0)
    total = torch.zeros((), dtype=torch.float32, device=scale.device)
    for inputs, targets in micro:
        with runtime.autocast():
            loss_sum = model(inputs, targets, loss_reduction="sum")
        (loss_sum * scale).backward()
        total += loss_sum.detach().float()
    return total * scale


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, batches, runtime) -> float:
    """Mean cross-entropy per counted target (targets != -1) over `batches` and all ranks.

    No counted target at all is a DataError, raised on every rank alike (after the all-reduce): a
    NaN here once looked like a broken model when the val split had simply given no batch.
    """
    totals = torch.zeros(2, dtype=torch.float64, device=runtime.device)
    for inputs, targets in batches:
        with runtime.autocast():
            totals[0] += model(inputs, targets, loss_reduction="sum").double()
        totals[1] += (targets != -1).sum()
    totals = _global_sum(totals)
    if totals[1] == 0:
        raise DataError("the validation split gave no target to score (no rows, or every row cut off before its "
                        "first trained token); add validation data or raise --max-seq-len")
    return (totals[0] / totals[1]).item()


def global_mean(value: torch.Tensor) -> float:
    """The mean of a scalar over all ranks (one tiny all-reduce), as a Python float.

    Used on the loss every step: a NaN on one rank then stops every rank at the same step instead
    of leaving the others waiting in the next collective.
    """
    value = value.detach().float().clone()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= dist.get_world_size()
    return value.item()


def check_finite(loss: float, step: int, last_checkpoint: str | None) -> None:
    if math.isfinite(loss):
        return
    where = (f"the last good checkpoint is {last_checkpoint} (resume from it with --resume, perhaps "
             "with a lower learning rate)") if last_checkpoint else "no checkpoint was saved yet"
    raise TrainingDiverged(f"loss became {loss} at step {step}; {where}")


# ---------------------------------------------------------------------------------------------
# Cadence

def is_due(step: int, every: int, last_step: int) -> bool:
    """True every `every` steps (never when `every` <= 0) and always at the final step."""
    if every <= 0:
        return False
    return step % every == 0 or step == last_step


# ---------------------------------------------------------------------------------------------
# Throughput, MFU, memory

# Dense bf16 peak of one GPU, from the vendors' datasheets (no sparsity).
_PEAK_BF16_FLOPS = (
    ("H200", 989e12), ("H100", 989e12), ("H800", 989e12),   # GH200 matches "H200"
    ("B200", 2250e12),
    ("A100", 312e12), ("A800", 312e12),
    ("L40S", 362e12),
    ("4090", 165e12),
)


def peak_flops(device: torch.device | str) -> float | None:
    """Peak bf16 FLOP/s of the device, or None where we do not know it (CPU, MPS, other GPUs)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in _PEAK_BF16_FLOPS:
        if key in name:
            return flops
    return None


def memory_stats(device: torch.device | str) -> dict:
    """Peak allocated/reserved GPU memory in GiB; empty off CUDA."""
    device = torch.device(device)
    if device.type != "cuda":
        return {}
    return {
        "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2),
        "reserved_memory_gib": round(torch.cuda.max_memory_reserved(device) / 2**30, 2),
    }


class Throughput:
    """Tokens/s and MFU over the steps timed so far, skipping the first few (compilation, warmup)."""

    def __init__(self, tokens_per_step: int, flops_per_token: float | None, peak_flops_per_device: float | None,
                 world_size: int = 1, skip_steps: int = 3):
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.peak = peak_flops_per_device * world_size if peak_flops_per_device else None
        self.skip_steps = skip_steps
        self.steps_seen = 0
        self.timed_steps = 0
        self.timed_seconds = 0.0
        self.timed_tokens = 0
        self.last_step_seconds = 0.0
        self.last_step_tokens = 0

    def record(self, seconds: float, tokens: int | None = None) -> None:
        """One step's time; `tokens`: what it trained on when steps differ (padded conversation rows)."""
        tokens = self.tokens_per_step if tokens is None else tokens
        self.steps_seen += 1
        self.last_step_seconds, self.last_step_tokens = seconds, tokens
        if self.steps_seen > self.skip_steps:
            self.timed_steps += 1
            self.timed_seconds += seconds
            self.timed_tokens += tokens

    @property
    def step_seconds(self) -> float:
        if self.timed_steps:
            return self.timed_seconds / self.timed_steps
        return self.last_step_seconds

    @property
    def tokens_per_second(self) -> float:
        if self.timed_steps:
            return self.timed_tokens / self.timed_seconds if self.timed_seconds > 0 else 0.0
        s = self.last_step_seconds
        return self.last_step_tokens / s if s > 0 else 0.0

    @property
    def mfu(self) -> float | None:
        """Model FLOPs utilisation as a fraction (0.47 = 47%); None without a known peak."""
        if not self.peak or not self.flops_per_token:
            return None
        return self.flops_per_token * self.tokens_per_second / self.peak

    def eta_seconds(self, steps_left: int) -> float:
        return steps_left * self.step_seconds

    def summary(self) -> dict:
        out = {"tok_per_s": round(self.tokens_per_second, 1), "step_ms": round(1000 * self.step_seconds, 2)}
        if self.mfu is not None:
            out["mfu"] = round(100 * self.mfu, 2)
        return out


def progress_fields(loss: float, throughput: Throughput | None = None) -> dict:
    """What a training progress line shows after the step count: loss, tokens/s and MFU where known."""
    fields = {"loss": f"{loss:.4f}"}
    if throughput is None or throughput.tokens_per_second <= 0:
        return fields
    fields["tok/s"] = f"{throughput.tokens_per_second:,.0f}"
    if throughput.mfu is not None:
        fields["mfu"] = f"{100 * throughput.mfu:.1f}%"
    return fields


class StepTimer:
    """Wall time of one step, synchronising the device so queued GPU work is counted."""

    def __init__(self, runtime):
        self.runtime = runtime
        self.start = 0.0

    def __enter__(self):
        self.runtime.synchronize()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.runtime.synchronize()
        self.seconds = time.perf_counter() - self.start
