"""Where the work runs: device and compute dtype (with the reason), torch.distributed, seeds, rank-0 print.

The same code runs under plain `python` on one device and under `torchrun` on many: torchrun sets
RANK, LOCAL_RANK and WORLD_SIZE, and `init_runtime` starts a process group from them (NCCL on CUDA,
gloo on CPU), one process per GPU.
"""

from __future__ import annotations

import argparse
import datetime
import os
import random
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from chatforge.errors import ChatforgeError, UsageError

DEVICE_CHOICES = ("auto", "cuda", "mps", "cpu")
DTYPE_CHOICES = ("auto", "bf16", "fp16", "fp32")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def dist_env() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) as torchrun sets them; (0, 0, 1) under plain python."""
    try:
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ChatforgeError("RANK, LOCAL_RANK and WORLD_SIZE must be integers; launch with torchrun") from None
    return rank, local_rank, world_size


def is_rank0() -> bool:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return dist_env()[0] == 0


def print0(*args, **kwargs) -> None:
    """Print from rank 0 only, flushed, so logs of several processes stay readable."""
    if is_rank0():
        print(*args, **kwargs, flush=True)


def pick_device(requested: str | None = None, local_rank: int = 0) -> tuple[torch.device, str]:
    requested = (requested or "auto").lower()
    if requested not in DEVICE_CHOICES:
        raise UsageError(f"--device {requested!r} is not one of {', '.join(DEVICE_CHOICES)}")
    has_cuda = torch.cuda.is_available()
    has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if requested == "cuda" and not has_cuda:
        raise UsageError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or check nvidia-smi")
    if requested == "mps" and not has_mps:
        raise UsageError("--device mps was asked for but Apple's MPS backend is not available; use --device cpu")
    if requested == "cuda" or (requested == "auto" and has_cuda):
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise UsageError(
                f"LOCAL_RANK {local_rank} has no GPU ({count} visible); start at most {count} processes per node"
            )
        reason = "asked for with --device" if requested == "cuda" else "a CUDA GPU is available"
        return torch.device("cuda", local_rank), reason
    if requested == "mps" or (requested == "auto" and has_mps):
        return torch.device("mps"), "asked for with --device" if requested == "mps" else "Apple MPS is available"
    return torch.device("cpu"), "asked for with --device" if requested == "cpu" else "no GPU was found"


def pick_dtype(device: torch.device, requested: str | None = None) -> tuple[torch.dtype, str]:
    requested = (requested or "auto").lower()
    if requested not in DTYPE_CHOICES:
        raise UsageError(f"--dtype {requested!r} is not one of {', '.join(DTYPE_CHOICES)}")
    if requested != "auto":
        if requested == "fp16" and device.type == "cpu":
            raise UsageError("--dtype fp16 is not supported on CPU; use bf16 or fp32")
        return _DTYPES[requested], "asked for with --dtype"
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if major >= 8:
            return torch.bfloat16, f"CUDA compute capability {major}.{minor} has fast bf16"
        return torch.float32, f"CUDA compute capability {major}.{minor} is older than 8.0 (no fast bf16)"
    return torch.float32, f"{device.type} has no fast low-precision matmul path we rely on"


@dataclass
class Runtime:
    device: torch.device
    dtype: torch.dtype
    rank: int
    local_rank: int
    world_size: int
    device_reason: str
    dtype_reason: str

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        """Autocast to the compute dtype on CUDA; a no-op where we compute in fp32."""
        if self.device.type == "cuda" and self.dtype != torch.float32:
            return torch.autocast(device_type="cuda", dtype=self.dtype)
        return nullcontext()

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def describe(self) -> str:
        where = f"{self.device}" + (f" x{self.world_size} ranks" if self.distributed else "")
        return (
            f"device: {where} ({self.device_reason}); "
            f"compute dtype: {str(self.dtype).replace('torch.', '')} ({self.dtype_reason})"
        )


_announced = False


def init_runtime(device: str | None = None, dtype: str | None = None, seed: int | None = None,
                 announce: bool = True) -> Runtime:
    """Pick device and dtype, start torch.distributed if torchrun launched us, seed, and say so once."""
    global _announced
    rank, local_rank, world_size = dist_env()
    dev, dev_reason = pick_device(device, local_rank)
    dt, dt_reason = pick_dtype(dev, dtype)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs = {"backend": backend, "timeout": datetime.timedelta(minutes=30)}
        if dev.type == "cuda":
            kwargs["device_id"] = dev
        dist.init_process_group(**kwargs)
    rt = Runtime(dev, dt, rank, local_rank, world_size, dev_reason, dt_reason)
    if seed is not None:
        seed_everything(seed)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if announce and not _announced:
        print0(rt.describe())
        _announced = True
    return rt


def shutdown() -> None:
    """Leave the process group cleanly (a missing destroy makes NCCL warn and can hang the exit)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % (2**32))
    except ImportError:
        pass


def available_memory(device: torch.device) -> int | None:
    """Bytes a new allocation on `device` can still get, or None where we cannot tell (MPS).

    CUDA: the driver's free memory on that GPU. CPU: the kernel's MemAvailable (page cache it can
    drop counts as free), capped by a cgroup v2 limit when one is set, since a container's limit,
    not the host's RAM, is what gets a process killed.
    """
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    free = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
    except OSError:
        try:
            free = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read().strip())
        if limit != "max":
            headroom = max(int(limit) - used, 0)
            free = headroom if free is None else min(free, headroom)
    except (OSError, ValueError):
        pass
    return free


def add_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("runtime")
    group.add_argument("--device", default="auto", choices=DEVICE_CHOICES,
                       help="where to compute (default: cuda, then mps, then cpu)")
    group.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                       help="compute dtype (default: bf16 on CUDA sm80+, fp32 elsewhere)")
