"""`--device-batch-size auto`: the largest micro-batch that fits the GPU, found by trying real steps.

Where it sits: pretrain, midtrain, sft and rl (and `bench train`) build their model as the run will
use it (compiled when the run compiles), then call `find_device_batch` before the first step. The
total batch is fixed first; the micro-batch is then the largest power of two that divides the rows
one step needs on one rank (`power_of_two_sizes`), so gradient accumulation keeps the total batch
exactly. Off CUDA `auto` keeps each stage's old default: there is no memory to measure worth the time.

How the search spends its time. Under `torch.compile(dynamic=False)` every new batch shape is a new
compile (tens of seconds at depth 20), so trying sizes one by one upwards would cost a compile per
size. Instead:
1. two eager steps at 1 and 2 rows (`torch.compiler.set_stance("force_eager")`, well under a second)
   give a straight line: peak bytes = fixed + per_row x rows. Eager keeps more activations alive than
   the compiled graph, so the line over-predicts and the first real trial is a size that fits;
2. real trials with the run's model (compiled), starting at the largest size the line allows: after a
   fit, the line is re-fitted through that measurement and the next size up is tried only if the new
   line says it fits; after an out-of-memory error, the size is halved. Typically one or two compiles,
   and the last successful one is the graph the run then reuses.
A trial is two forward/backward passes at the run's sequence length (the second accumulates into the
gradients the first allocated, as accumulation does) with the optimizer's not-yet-allocated state held
by a placeholder of its size. A size "fits" when its peak stays under the budget less HEADROOM (the run
also allocates eval batches, samples and allocator fragments the trial does not see).

The budget is what this process may hold: the free memory plus what its caching allocator already
reserved, or `--memory-limit-gb` (which caps the whole run via
`torch.cuda.set_per_process_memory_fraction`, so a big card can stand in for a 24 GB one). Under
torchrun every rank searches, then all take the smallest choice (an all-reduce MIN).

The decision is the pure function `search(try_rows, sizes, budget, probe)`; the tests drive it with a
fake trial that raises torch.OutOfMemoryError above some number of rows.
"""

from __future__ import annotations

import argparse
import gc
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist

from chatforge.errors import UsageError
from chatforge.runtime import print0

AUTO = "auto"
HEADROOM = 0.08  # of the budget kept free for what the trials do not allocate
GIB = 2 ** 30


# ---------------------------------------------------------------------------------------------
# flags


def batch_size_arg(text: str):
    """argparse type for --device-batch-size: a positive integer or "auto"."""
    if text == AUTO:
        return AUTO
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer or 'auto'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be a positive integer (or 'auto')")
    return value


def add_arguments(parser, default_help: str) -> None:
    """--device-batch-size (int or auto; default auto) and --memory-limit-gb."""
    parser.add_argument("--device-batch-size", type=batch_size_arg, default=None,
                        help=f"rows per micro-batch per device, or 'auto' (default): on CUDA the largest power "
                             f"of two that fits, found by trying real steps; {default_help}")
    add_memory_limit_argument(parser)


def add_memory_limit_argument(parser) -> None:
    parser.add_argument("--memory-limit-gb", type=float, default=None, metavar="GB",
                        help="cap this process's GPU memory at GB GiB for the whole run (as on a smaller card); "
                             "the auto device batch searches within it")


def apply_memory_limit(limit_gb: float | None, device: torch.device) -> int | None:
    """Cap the caching allocator at `limit_gb` GiB on `device`; returns the cap in bytes (None: no cap)."""
    if limit_gb is None:
        return None
    if device.type != "cuda":
        raise UsageError(f"--memory-limit-gb caps GPU memory; this run is on {device.type}: drop the flag")
    total = torch.cuda.get_device_properties(device).total_memory
    if not 0 < limit_gb * GIB <= total:
        raise UsageError(f"--memory-limit-gb {limit_gb:g} must be above 0 and at most this GPU's "
                         f"{total / GIB:.1f} GiB")
    torch.cuda.set_per_process_memory_fraction(limit_gb * GIB / total, device)
    print0(f"GPU memory capped at {limit_gb:g} GiB of {total / GIB:.1f} GiB (--memory-limit-gb)")
    return int(limit_gb * GIB)


def memory_budget(device: torch.device, cap: int | None) -> int:
    """Bytes this process may hold on `device`: free plus already reserved by us, at most `cap`."""
    free, _ = torch.cuda.mem_get_info(device)
    budget = free + torch.cuda.memory_reserved(device)
    return min(budget, cap) if cap is not None else budget


# ---------------------------------------------------------------------------------------------
# the decision (pure: no GPU)


def power_of_two_sizes(rows_per_step: int, cap: int | None = None) -> list[int]:
    """Powers of two that divide `rows_per_step` (at most `cap`), ascending: the micro-batches that
    keep a step's rows an exact number of micro-steps."""
    if rows_per_step < 1:
        raise ValueError(f"rows_per_step must be positive, got {rows_per_step}")
    sizes, size = [], 1
    while rows_per_step % size == 0 and size <= rows_per_step and (cap is None or size <= cap):
        sizes.append(size)
        size *= 2
    return sizes


@dataclass
class Line:
    """peak bytes ~ fixed + per_row x rows."""
    fixed: float
    per_row: float

    def predict(self, rows: int) -> float:
        return self.fixed + self.per_row * rows

    @classmethod
    def through(cls, a: tuple[int, int], b: tuple[int, int]) -> "Line":
        (r1, p1), (r2, p2) = a, b
        per_row = max((p2 - p1) / (r2 - r1), 1.0)
        return cls(p1 - per_row * r1, per_row)

    def refit(self, rows: int, peak: int) -> "Line":
        """Same fixed part, per-row cost from a real measurement."""
        return Line(self.fixed, max((peak - self.fixed) / rows, 1.0))


@dataclass
class Choice:
    rows: int
    peak: int | None                 # bytes at the chosen size (None: not measured)
    budget: int
    capped: bool = False             # the budget is --memory-limit-gb
    tried: list[tuple[int, int | None]] = field(default_factory=list)  # (rows, peak; None = OOM)
    skipped: tuple[int, float] | None = None  # the next size up and the peak predicted for it
    largest: bool = False            # the chosen size is all the rows a step has
    seconds: float = 0.0
    note: str = ""
    agreed_down: bool = False  # torchrun: another rank's smaller choice was taken

    def reason(self) -> str:
        """One line for the derivation table, e.g. "auto: 32 OOM at a 24 GiB cap; peak 21.3 GiB"."""
        where = f"a {self.budget / GIB:.0f} GiB cap" if self.capped else f"{self.budget / GIB:.1f} GiB free"
        if self.agreed_down:
            return f"auto: {self.note}" + (f"; {len(self.tried)} trial(s) in {self.seconds:.0f}s" if self.seconds else "")
        why = []
        failed = [r for r, p in self.tried if r > self.rows]
        if failed:
            r = min(failed)
            why.append(f"{r} OOM at {where}" if dict(self.tried)[r] is None else
                       f"{r} peaks {dict(self.tried)[r] / GIB:.1f} GiB, over {where} less {HEADROOM:.0%}")
        elif self.skipped:
            why.append(f"{self.skipped[0]} predicted {self.skipped[1] / GIB:.1f} GiB of {where}")
        elif self.largest:
            why.append(f"fits {where}; the whole step's rows")
        if self.peak is not None:
            why.append(f"peak {self.peak / GIB:.1f} GiB")
        if self.seconds:
            why.append(f"{len(self.tried)} trial(s) in {self.seconds:.0f}s")
        return "auto: " + "; ".join(why)


def search(try_rows: Callable[[int], int], sizes: list[int], budget: int, probe: Line | None = None,
           headroom: float = HEADROOM) -> Choice:
    """The largest of `sizes` (ascending) whose trial fits `budget` less `headroom`.

    try_rows(rows) runs a real step and returns its peak bytes, or raises torch.OutOfMemoryError.
    `probe` (a line from cheap eager steps, which over-predicts) picks the first size to try; without
    it the search starts at the largest size and halves. Raises UsageError when not even the smallest
    size fits.
    """
    if not sizes:
        raise ValueError("no sizes to search")
    usable = budget * (1.0 - headroom)
    line = probe
    i = len(sizes) - 1
    if line is not None:
        fitting = [k for k, rows in enumerate(sizes) if line.predict(rows) <= usable]
        i = fitting[-1] if fitting else 0
    tried: dict[int, int | None] = {}
    best: tuple[int, int] | None = None
    skipped = None
    while True:
        rows = sizes[i]
        try:
            peak = try_rows(rows)
        except torch.OutOfMemoryError:
            peak = None
        tried[rows] = peak
        if peak is not None and peak <= usable:
            best = (rows, peak)
            if i + 1 == len(sizes) or sizes[i + 1] in tried:
                break
            if line is not None:
                line = line.refit(rows, peak)
                if line.predict(sizes[i + 1]) > usable:
                    skipped = (sizes[i + 1], line.predict(sizes[i + 1]))
                    break
            i += 1
        elif best is not None:
            break
        elif i == 0:
            shown = "out of memory" if peak is None else f"peaks {peak / GIB:.1f} GiB"
            raise UsageError(f"even a micro-batch of {rows} row(s) {shown} within {budget / GIB:.1f} GiB; "
                             "lower --max-seq-len or --depth, or free the GPU")
        else:
            i -= 1
    return Choice(rows=best[0], peak=best[1], budget=budget, tried=list(tried.items()), skipped=skipped,
                  largest=best[0] == sizes[-1])


# ---------------------------------------------------------------------------------------------
# on the GPU


def measure(run: Callable[[], None], rt, reserve_bytes: int = 0) -> int:
    """Peak bytes allocated while run() runs with `reserve_bytes` held aside (state still to come);
    everything it allocated is released after, also when it runs out of memory."""
    reserve = None
    release()  # what a previous trial's out-of-memory error held
    torch.cuda.reset_peak_memory_stats(rt.device)
    try:
        reserve = torch.empty(reserve_bytes, dtype=torch.uint8, device=rt.device) if reserve_bytes else None
        run()
        rt.synchronize()
        return torch.cuda.max_memory_allocated(rt.device)
    finally:
        del reserve
        release()


def training_trial(train_model, model, rt, seq_len: int, vocab_size: int, reserve_bytes: int = 0
                   ) -> Callable[[int], int]:
    """try_rows for a training step: two forward/backward passes of random tokens at `seq_len` through
    `train_model` (as the run calls it; the second accumulates into the gradients the first made),
    `reserve_bytes` held aside (the optimizer state to come). Leaves no gradients behind."""

    def steps(rows: int) -> None:
        # contiguous int64 (rows, seq_len), as the loader yields: a compiled graph guards on strides,
        # so the run's first step reuses the graph of the size chosen here
        inputs = torch.randint(0, vocab_size, (rows, seq_len), device=rt.device)
        targets = torch.randint(0, vocab_size, (rows, seq_len), device=rt.device)
        try:
            for _ in range(2):
                with rt.autocast():
                    loss = train_model(inputs, targets)
                loss.backward()
                del loss
        finally:
            model.zero_grad(set_to_none=True)

    return lambda rows: measure(lambda: steps(rows), rt, reserve_bytes)


def eager_probe(trial: Callable[[int], int]) -> Line | None:
    """The line through eager trials at 1 and 2 rows; None when even those do not fit."""
    try:
        with torch.compiler.set_stance("force_eager"):
            return Line.through((1, trial(1)), (2, trial(2)))
    except torch.OutOfMemoryError:
        return None


def find_device_batch(trial: Callable[[int], int], sizes: list[int], rt, cap: int | None = None,
                      probe: bool = True) -> Choice:
    """search() on this GPU, agreed across ranks (the smallest choice wins); memory freed after."""
    started = time.time()
    budget = memory_budget(rt.device, cap)
    line = eager_probe(trial) if probe and len(sizes) > 1 else None
    choice = search(trial, sizes, budget, line)
    choice.capped = cap is not None and budget == cap
    choice.seconds = time.time() - started
    if rt.distributed:
        rows = torch.tensor([choice.rows], device=rt.device)
        dist.all_reduce(rows, op=dist.ReduceOp.MIN)
        if int(rows.item()) != choice.rows:
            # this rank's trials say nothing about why the smaller size won: say what happened instead
            choice.note = (f"{choice.rows} fit on this rank; {int(rows.item())} is the smallest of "
                           f"{rt.world_size} ranks' choices")
            choice.rows, choice.peak, choice.agreed_down = int(rows.item()), None, True
    release()
    torch.cuda.reset_peak_memory_stats(rt.device)
    return choice


def release() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def resolve(requested, rows_per_step: int, rt, make_trial: Callable[[], Callable[[int], int]], fallback: int,
            cap: int | None = None, what: str = "device batch") -> tuple[int, str]:
    """(rows, why) for a stage's --device-batch-size: as given; off CUDA the stage's old default
    `fallback`; else the search over the powers of two dividing rows_per_step. make_trial() is called
    only when a search runs (it may allocate)."""
    if requested != AUTO:
        return requested, "given"
    if rt.device.type != "cuda":
        return fallback, f"auto: off CUDA the default {fallback}"
    sizes = power_of_two_sizes(rows_per_step)
    print0(f"{what} auto: trying micro-batches of up to {sizes[-1]} rows (powers of two dividing the "
           f"{rows_per_step} a step needs per rank)")
    choice = find_device_batch(make_trial(), sizes, rt, cap)
    print0(f"{what}: {choice.rows} ({choice.reason()})")
    return choice.rows, choice.reason()
