"""`chatforge env`: what this machine offers and what chatforge will use, for bug reports."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil

from chatforge import __version__, paths
from chatforge.runtime import add_runtime_arguments, dist_env, pick_device, pick_dtype


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_runtime_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def collect(device: str | None = None, dtype: str | None = None) -> dict:
    import torch

    rank, local_rank, world = dist_env()
    dev, dev_reason = pick_device(device, local_rank)
    dt, dt_reason = pick_dtype(dev, dtype)
    home = paths.base_dir()
    free = shutil.disk_usage(home).free
    info = {
        "chatforge": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda (torch build)": torch.version.cuda or "none (CPU build)",
        "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "device": f"{dev} ({dev_reason})",
        "compute dtype": f"{str(dt).replace('torch.', '')} ({dt_reason})",
        "cpu cores": os.cpu_count(),
        "torch threads": torch.get_num_threads(),
        "distributed": f"rank {rank}/{world}" if world > 1 else "no (single process)",
        "base directory": f"{home}" + (" (from CHATFORGE_HOME)" if os.environ.get("CHATFORGE_HOME") else ""),
        "free space": f"{free / 2**30:.1f} GiB",
    }
    if info["gpus"]:
        info["gpu names"] = ", ".join(torch.cuda.get_device_name(i) for i in range(info["gpus"]))
    from chatforge.infer.sandbox import sandbox_status
    info["python tool"] = sandbox_status()[1]
    return info


def main(args: argparse.Namespace) -> None:
    info = collect(args.device, args.dtype)
    if args.json:
        print(json.dumps(info, indent=2))
        return
    width = max(len(k) for k in info)
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")
