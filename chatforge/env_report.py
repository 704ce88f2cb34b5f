"""`chatforge env`: what this machine offers, what is already on disk, and what chatforge will use.

For bug reports and for a first run: the device and dtype chatforge picks (with why), RAM, the
tokenizers, checkpoints (per stage and tag, with the last step), task data, CORE bundle and corpus
shards already under the base directory, and a --depth that suits this machine, with the reason.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil

from chatforge import __version__, paths
from chatforge.runtime import add_runtime_arguments, available_memory, dist_env, pick_device, pick_dtype

GiB = 2**30
MICRO_BATCH = 8  # rows per micro-batch the GPU suggestion assumes (the dial's default of 32 is for 80 GiB)
# The memory floor counts ~8 x n_embd block activations per layer and token; a real step also keeps the
# MLP's 4x-wide hidden layer and attention's projections, so a suggestion leaves room for 3x that.
ACTIVATIONS_OVER_FLOOR = 3


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
    total_ram, free_ram = total_memory(), available_memory(torch.device("cpu"))
    info["RAM"] = (f"{total_ram / GiB:.1f} GiB total" if total_ram else "total unknown") + \
        (f", {free_ram / GiB:.1f} GiB available" if free_ram is not None else "")
    gpu_memory = torch.cuda.get_device_properties(dev).total_memory if dev.type == "cuda" else None
    depth, why = suggest_depth(dev.type, gpu_memory, os.cpu_count() or 1)
    info["suggested depth"] = f"--depth {depth} ({why})"
    info.update(on_disk())
    from chatforge.infer.sandbox import sandbox_status
    info["python tool"] = sandbox_status()[1]
    return info


def total_memory() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def suggest_depth(device_type: str, gpu_memory: int | None, cpu_cores: int) -> tuple[int, str]:
    """A --depth for this machine and the reason, in one line. On a CPU, time is the limit (a step
    of depth d costs ~d^3): a toy. On a GPU, the deepest model whose memory floor (weights, gradients,
    optimizer state, one micro-batch at the dial's defaults: model/scaling.py) fits in 85% of it."""
    if device_type != "cuda" or not gpu_memory:
        depth = 6 if cpu_cores >= 8 else 4
        return depth, (f"no GPU: compute, not memory, is the limit on {cpu_cores} CPU core(s), and a step costs "
                       f"~depth^3; depth {depth} trains a toy on a text file in minutes")
    from chatforge.model.scaling import derive

    fits = 2
    for depth in range(2, 27, 2):  # up to the gpt2 preset's 26
        settings = derive(depth, device="cuda", vocab_size=65536, world_size=1, device_batch_size=MICRO_BATCH)
        floor = settings.memory_floor(activation_bytes=2)
        logits = MICRO_BATCH * settings.sequence_len * settings.vocab_size * 4
        blocks = floor["activations"] - logits
        if floor["state"] + ACTIVATIONS_OVER_FLOOR * blocks + logits > 0.85 * gpu_memory:
            break
        fits = depth
    return fits, (f"the deepest model whose weights, optimizer state and a {MICRO_BATCH}x2048 micro-batch fit in 85% "
                  f"of the GPU's {gpu_memory / GiB:.0f} GiB (--device-batch-size auto, the default, finds the "
                  "micro-batch that fits; accumulation keeps the total batch); time grows ~depth^3, the d20 speedrun is ~4 h on 8 H100s")


def on_disk() -> dict[str, str]:
    """What earlier runs left under the base directory, one line per kind of artifact."""
    from chatforge.model.checkpoint import STAGES, list_steps, list_tags
    from chatforge.tokenizer import TOKENIZER_FILE, current_tokenizer_name, tokenizer_names

    current = current_tokenizer_name()
    tokenizers = [f"{n}{' (current)' if n == current else ''}" for n in tokenizer_names()]
    if (paths.tokenizer_dir(create=False) / TOKENIZER_FILE).is_file():
        tokenizers.append(f"tokenizer/ (unnamed, old layout{', current' if current is None else ''})")
    checkpoints = [f"{stage}/{tag} step {list_steps(stage, tag)[-1]}" for stage in STAGES for tag in list_tags(stage)]
    data_root = paths.base_dir() / "data"
    shards = [f"{d.name}: {len(list(d.glob('*.parquet')))} shard(s)"
              for d in sorted(data_root.iterdir()) if d.is_dir()] if data_root.is_dir() else []
    tasks_root = paths.task_cache_dir()
    tasks = sorted(d.name for d in tasks_root.iterdir() if not d.name.startswith(".")) if tasks_root.is_dir() else []
    bundle = paths.eval_bundle_dir()
    has_bundle = bundle.is_dir() and any(bundle.iterdir())
    return {
        "tokenizers": ", ".join(tokenizers) or "none (chatforge tokenizer train)",
        "checkpoints": ", ".join(checkpoints) or "none",
        "corpus shards": ", ".join(shards) or "none (chatforge data download, or --data PATH)",
        "task data": ", ".join(tasks) or "none downloaded (--data-dir DIR, or fetched on first use)",
        "CORE bundle": str(bundle) if has_bundle else "not downloaded (--data-dir DIR, or fetched by eval base)",
    }


def main(args: argparse.Namespace) -> None:
    info = collect(args.device, args.dtype)
    if args.json:
        print(json.dumps(info, indent=2))
        return
    width = max(len(k) for k in info)
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")
