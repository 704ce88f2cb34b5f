"""Atomic checkpoints: model weights, per-rank optimizer shards, loader state, RNG and step.

Layout under the base directory (see ARCHITECTURE.md):

    checkpoints/<stage>/<tag>/step_000123/
        model.pt          the model's state dict (written by rank 0)
        optim_rank{r}.pt  rank r's optimizer state (the sharded optimizer keeps one shard per rank)
        meta.json         model_config, step, vocab_size, tokenizer (the name of the one it was
                          trained with; absent: the unnamed one of the old layout), world_size,
                          per-rank loader state and RNG, metrics, args

Every rank writes into a hidden temporary folder `.tmp-step_000123`; after a barrier rank 0 renames
it to `step_000123`. The rename is the commit: a folder named `step_*` is complete by construction,
so a run killed during a save leaves only a hidden temp folder that is never picked as the latest
(and is cleaned up by the next save). nanochat writes straight into the final folder, where a kill
mid-write leaves a corrupt latest step; this is the fix for that.

Multi-node runs assume the base directory is on a file system that every node sees.
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from chatforge import paths
from chatforge.errors import CheckpointError
from chatforge.model.gpt import GPT, GPTConfig
from chatforge.tokenizer import TOKENIZER_FILE, load_tokenizer

STAGES = ("base", "mid", "sft", "rl")
_STEP_DIR = re.compile(r"^step_(\d{6,})$")
_TMP_PREFIX = ".tmp-"
_TRASH_PREFIX = ".old-"


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def _dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _barrier() -> None:
    if _dist_ready():
        dist.barrier()


# ---------------------------------------------------------------------------------------------
# RNG state, in a JSON-friendly form (so meta.json says everything about where a run stood)

def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def rng_state(device: torch.device | str | None = None) -> dict:
    """This process's Python, torch CPU and (when on CUDA) CUDA generator states."""
    state = {"python": _py_rng_to_json(random.getstate()), "torch": _b64(torch.get_rng_state()), "cuda": None}
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        state["cuda"] = _b64(torch.cuda.get_rng_state(device))
    return state


def restore_rng_state(state: dict, device: torch.device | str | None = None) -> None:
    random.setstate(_py_rng_from_json(state["python"]))
    torch.set_rng_state(_unb64(state["torch"]))
    device = torch.device(device) if device is not None else None
    if state.get("cuda") is not None and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(_unb64(state["cuda"]), device)


def _py_rng_to_json(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _py_rng_from_json(state: list) -> tuple:
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


# ---------------------------------------------------------------------------------------------
# Saving

def _gather(obj):
    """Every rank's `obj` as a list indexed by rank (just [obj] on one process)."""
    if not _dist_ready():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _clean_state_dict(state: dict) -> dict:
    """Drop torch.compile's `_orig_mod.` prefix so a checkpoint loads into a plain model."""
    return {k.replace("_orig_mod.", ""): v for k, v in state.items()}


def save_checkpoint(stage: str, tag: str, step: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None, *, model_config: dict, vocab_size: int,
                    loader_state=None, metrics: dict | None = None, args: dict | None = None,
                    extra: dict | None = None, keep_last: int | None = None,
                    tokenizer_name: str | None = None) -> Path:
    """Write one complete checkpoint; every rank must call this (it gathers and synchronises).

    `loader_state` is this rank's loader state; meta.json keeps all ranks' states as a list.
    `keep_last` deletes all but the newest K complete steps of this stage/tag after the save.
    `tokenizer_name` is the tokenizer the model was trained with (None: the old layout's unnamed one).
    Returns the final folder.
    """
    rank = dist.get_rank() if _dist_ready() else 0
    world_size = dist.get_world_size() if _dist_ready() else 1
    device = next(model.parameters(), torch.empty(0)).device
    tag_dir = paths.checkpoint_dir(stage, tag)
    final = tag_dir / step_dir_name(step)
    tmp = tag_dir / f"{_TMP_PREFIX}{step_dir_name(step)}"

    loader_states = _gather(loader_state)
    rng_states = _gather(rng_state(device))
    if rank == 0:
        # leftovers of a save that was killed part-way are garbage: start from an empty temp folder
        for stale in tag_dir.iterdir():
            if stale.name.startswith((_TMP_PREFIX, _TRASH_PREFIX)):
                shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()

    if optimizer is not None:
        _torch_save(optimizer.state_dict(), tmp / f"optim_rank{rank}.pt")
    if rank == 0:
        _torch_save(_clean_state_dict(model.state_dict()), tmp / "model.pt")
        meta = {
            "stage": stage,
            "tag": tag,
            "step": step,
            "model_config": model_config,
            "vocab_size": vocab_size,
            "tokenizer": tokenizer_name,
            "world_size": world_size,
            "has_optimizer": optimizer is not None,
            "loader_state": loader_states,
            "rng": rng_states,
            "metrics": metrics or {},
            "args": args or {},
            **(extra or {}),
        }
        paths.atomic_write_text(tmp / "meta.json", json.dumps(meta, indent=2, default=str))
    _barrier()

    if rank == 0:
        if final.exists():  # re-saving a step (e.g. a resumed run ending where it started): replace it
            trash = tag_dir / f"{_TRASH_PREFIX}{final.name}"
            os.replace(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_dir(tag_dir)
        if keep_last:
            prune_checkpoints(stage, tag, keep_last)
    _barrier()
    return final


def _torch_save(obj, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def prune_checkpoints(stage: str, tag: str, keep_last: int) -> list[int]:
    """Delete all but the newest `keep_last` complete steps; returns the steps deleted."""
    tag_dir = paths.checkpoint_dir(stage, tag, create=False)
    steps = list_steps(stage, tag)
    doomed = steps[:-keep_last] if keep_last > 0 else []
    for step in doomed:
        # rename first, so a kill during the delete never leaves a half-deleted `step_*` behind
        trash = tag_dir / f"{_TRASH_PREFIX}{step_dir_name(step)}"
        os.replace(tag_dir / step_dir_name(step), trash)
        shutil.rmtree(trash, ignore_errors=True)
    return doomed


# ---------------------------------------------------------------------------------------------
# Finding checkpoints

def list_steps(stage: str, tag: str) -> list[int]:
    """The complete steps of stage/tag, ascending (hidden temp folders are never listed)."""
    tag_dir = paths.stage_checkpoints_dir(stage) / tag
    if not tag_dir.is_dir():
        return []
    steps = []
    for child in tag_dir.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / "meta.json").is_file():
            steps.append(int(match.group(1)))
    return sorted(steps)


def list_tags(stage: str) -> list[str]:
    """Tags of a stage that hold at least one complete checkpoint, sorted by name."""
    stage_dir = paths.stage_checkpoints_dir(stage)
    if not stage_dir.is_dir():
        return []
    return sorted(c.name for c in stage_dir.iterdir() if c.is_dir() and list_steps(stage, c.name))


def latest_step(stage: str, tag: str) -> int | None:
    steps = list_steps(stage, tag)
    return steps[-1] if steps else None


def resolve(stage: str, tag: str | None = None, step: int | None = None) -> tuple[str, int, Path]:
    """(tag, step, folder) of the checkpoint asked for, or a CheckpointError saying what exists."""
    if stage not in STAGES:
        raise CheckpointError(f"unknown checkpoint stage {stage!r}; use one of {', '.join(STAGES)}")
    tags = list_tags(stage)
    if not tags:
        command = {"base": "pretrain", "mid": "midtrain"}.get(stage, stage)
        hint = f"run `chatforge {command}` first"
        raise CheckpointError(f"no {stage} checkpoints under {paths.stage_checkpoints_dir(stage)}; {hint}")
    if tag is None:
        # the most recently written tag: what a user who just trained one expects to get
        def written(t: str) -> float:
            return (paths.stage_checkpoints_dir(stage) / t / step_dir_name(latest_step(stage, t)) / "meta.json").stat().st_mtime
        tag = max(tags, key=written)
    elif tag not in tags:
        raise CheckpointError(
            f"no {stage} checkpoint with tag {tag!r} under {paths.stage_checkpoints_dir(stage)}; available tags: {', '.join(tags)}"
        )
    steps = list_steps(stage, tag)
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise CheckpointError(
            f"{stage}/{tag} has no complete step {step}; available steps: {', '.join(map(str, steps))}"
        )
    return tag, step, paths.stage_checkpoints_dir(stage) / tag / step_dir_name(step)


def read_meta(folder: Path) -> dict:
    try:
        return json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {folder / 'meta.json'} ({exc}); pick another --step or retrain") from None


def parse_source(source) -> tuple[str, str, int | None] | None:
    """(stage, tag, step) of the checkpoint a run started from, as its meta.json records it: midtrain
    and sft write 'mid/d4/step 120', rl {'stage': ..., 'tag': ..., 'step': ...}; None if neither."""
    if isinstance(source, dict) and source.get("stage") and source.get("tag"):
        return source["stage"], source["tag"], source.get("step")
    if isinstance(source, str) and source.count("/") >= 2:
        stage, tag, step = source.split("/", 2)
        return stage, tag, int(step.split()[-1]) if step.split() and step.split()[-1].isdigit() else None
    return None


def checkpoints_using_tokenizer(name: str) -> list[str]:
    """'stage/tag' of every checkpoint on disk trained with the tokenizer called `name`."""
    users = []
    for stage in STAGES:
        for tag in list_tags(stage):
            folders = [paths.stage_checkpoints_dir(stage) / tag / step_dir_name(s) for s in list_steps(stage, tag)]
            if any(_recorded_tokenizer(folder) == name for folder in folders):
                users.append(f"{stage}/{tag}")
    return users


def free_tokenizer_name(stem: str, taken: frozenset | set = frozenset()) -> str:
    """`stem`, or the first of stem-2, stem-3 ... that is not in `taken` and that no checkpoint was
    trained with: a name under which a new tokenizer can be saved without breaking a checkpoint."""
    name, n = stem, 1
    while name in taken or checkpoints_using_tokenizer(name):
        n += 1
        name = f"{stem}-{n}"
    return name


def _recorded_tokenizer(folder: Path) -> str | None:
    try:
        return json.loads((folder / "meta.json").read_text(encoding="utf-8")).get("tokenizer")
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------
# Loading

def load_checkpoint(stage: str, tag: str | None = None, step: int | None = None, *,
                    device: torch.device | str = "cpu", rank: int = 0, load_optimizer: bool = True) -> dict:
    """Read a checkpoint: {"model": state dict, "optimizer": rank's shard or None, "meta", "path"}.

    The optimizer shard is only meaningful for the same number of ranks it was saved with, so a
    world-size mismatch is an error when the shard is asked for.
    """
    tag, step, folder = resolve(stage, tag, step)
    meta = read_meta(folder)
    model_state = _torch_load(folder / "model.pt", device)
    optim_state = None
    if load_optimizer and meta.get("has_optimizer", True):
        saved_world = meta.get("world_size", 1)
        world = dist.get_world_size() if _dist_ready() else 1
        if saved_world != world:
            raise CheckpointError(
                f"{folder} was saved by {saved_world} rank(s) but this run has {world}; resume with the same "
                f"number of processes (torchrun --nproc_per_node={saved_world})"
            )
        optim_state = _torch_load(folder / f"optim_rank{rank}.pt", device)
    return {"model": model_state, "optimizer": optim_state, "meta": meta, "path": folder}


def _torch_load(path: Path, device) -> dict:
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing; the checkpoint is incomplete, pick another --step") from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(f"{path} is unreadable ({exc}); pick another --step or retrain") from None


def check_config(meta: dict, model_config: dict, where: Path | str) -> None:
    """CheckpointError naming each config field where the checkpoint and the model differ."""
    saved = meta.get("model_config", {})
    diffs = [f"{k}={saved.get(k)!r} vs {model_config.get(k)!r}"
             for k in sorted(set(saved) | set(model_config)) if saved.get(k) != model_config.get(k)]
    if diffs:
        raise CheckpointError(
            f"checkpoint {where} has another model shape (checkpoint vs now: {'; '.join(diffs)}); "
            "use the same --depth/shape flags, or another --tag"
        )


def load_model_state(model: torch.nn.Module, state: dict, where: Path | str) -> None:
    """load_state_dict with a shape mismatch turned into a CheckpointError."""
    try:
        model.load_state_dict(_clean_state_dict(state), strict=True, assign=False)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = next((line.strip() for line in first if "size mismatch" in line or "Missing" in line
                       or "Unexpected" in line), first[0] if first else "")
        raise CheckpointError(f"checkpoint {where} does not fit this model ({detail}); use a matching --tag") from None


def checkpoint_tokenizer(meta: dict, folder: Path):
    """The tokenizer a checkpoint was trained with: the one its meta names, or for a checkpoint that
    names none (written before tokenizers had names) the unnamed one of the old layout, else the
    current one. Its vocabulary must match the checkpoint's (a CheckpointError otherwise)."""
    name = meta.get("tokenizer")
    directory = paths.tokenizer_dir(name, create=False)
    if name and not (directory / TOKENIZER_FILE).is_file():
        raise CheckpointError(f"checkpoint {folder} was trained with tokenizer {name!r} but {directory} is gone; "
                              "restore that folder or retrain the model")
    if name or (directory / TOKENIZER_FILE).is_file():
        tokenizer = load_tokenizer(directory, name)
    else:
        tokenizer = load_tokenizer()
        directory = paths.tokenizer_dir(tokenizer.name, create=False)
    saved_vocab = meta.get("vocab_size")
    if saved_vocab not in (None, tokenizer.vocab_size):
        raise CheckpointError(
            f"checkpoint {folder} was trained with a {saved_vocab}-token tokenizer but {directory} "
            f"holds a {tokenizer.vocab_size}-token one; restore the matching tokenizer or retrain the model")
    return tokenizer


@dataclass
class Loaded:
    """What `load` returns: a model with the checkpoint's weights, the tokenizer it was trained with,
    the checkpoint's meta, and this rank's optimizer shard when asked for."""
    model: torch.nn.Module
    tokenizer: object
    meta: dict
    path: Path
    tag: str
    step: int
    optimizer: dict | None = None


def load(stage: str, tag: str | None = None, step: int | None = None, *, device: torch.device | str = "cpu",
         dtype: torch.dtype | None = None, optimizer: bool = False, rank: int = 0,
         max_seq_len: int | None = None) -> Loaded:
    """The one way from a checkpoint to a model, for every stage, the engine, eval and serve.

    Rebuilds the GPT from the checkpoint's config (`max_seq_len` overrides its context, e.g. to
    fine-tune on longer rows), loads the weights and the tokenizer the checkpoint was trained with
    (`checkpoint_tokenizer`), and reads this rank's
    optimizer shard when `optimizer` is set (training resumes). `dtype` None keeps the weights as
    trained (fp32 masters); a float dtype casts the parameters, e.g. bf16 for inference on a GPU.
    The model is in eval mode.
    """
    tag, step, folder = resolve(stage, tag, step)
    ckpt = load_checkpoint(stage, tag, step, device=device, rank=rank, load_optimizer=optimizer)
    meta = ckpt["meta"]
    tokenizer = checkpoint_tokenizer(meta, folder)
    try:
        config = GPTConfig(**{**meta["model_config"], **({"sequence_len": max_seq_len} if max_seq_len else {})})
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"{folder / 'meta.json'} has an unusable model_config ({exc})") from None
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()  # buffers (e.g. rotary tables) are not in the state dict
    load_model_state(model, ckpt["model"], folder)
    if dtype is not None:  # parameters only: the rotary tables stay fp32 (they are cast per use)
        for param in model.parameters():
            param.data = param.data.to(dtype)
    model.eval()
    meta["path"] = str(folder)
    return Loaded(model, tokenizer, meta, folder, tag, step, ckpt["optimizer"])
