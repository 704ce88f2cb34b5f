"""The scaffold every training stage shares: run arguments, start or resume, save, summary, the loop.

Small functions, not a trainer class: pretrain, midtrain, sft and rl each read top to bottom
(arguments -> data -> model -> loop) and call these for the parts that must not drift between them:

- `add_run_arguments`: --save-every --save-minutes --keep-last --resume --seed --wandb --run-id;
- `resume_or_refuse`: a run already on disk is continued with --resume and never overwritten without;
- `pick_source`: --source/--source-tag/--step name the checkpoint to start from, --tag the one to write,
  so a second variant from the same source is one new --tag; a resumed run keeps the source step its
  checkpoint recorded (and needs only its own checkpoint should that step be gone);
- `start_model`: a stage that starts from another stage's checkpoint (midtrain, sft) loads it, or its
  own checkpoint when resuming, through `checkpoint.load`;
- `restore`: a resumed run must be the same run (same steps, same seed...), then gets its optimizer
  state and this rank's RNG back;
- `save`, `write_summary`: a checkpoint and the stage's summary JSON, each said in one line;
- `run_steps`: the cadence: evaluations at their intervals and at the end, checkpoints at theirs (by
  default every few minutes of wall clock) and at the end, and a step in between; a resumed run
  neither re-evaluates nor re-saves its first step;
- `run_main`: the runtime and the out-of-memory advice around a stage's body.

The arithmetic inside a step (schedules, accumulation, divergence, MFU) is `train/loop.py`.
"""

from __future__ import annotations

import argparse
import inspect
import json
import signal
import threading
from contextlib import contextmanager
from time import monotonic
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from chatforge import paths
from chatforge.errors import CheckpointError, Interrupted, UsageError
from chatforge.model import checkpoint
from chatforge.model.gpt import GPTConfig
from chatforge.model.optim import build_optimizer
from chatforge.progress import (
    MetricsLogger,
    Progress,
    format_duration,
    format_figure,
    not_measured,
    provenance,
)
from chatforge.runtime import add_runtime_arguments, init_runtime, print0
from chatforge.tasks.custom import CustomJSON
from chatforge.tasks.identity import Identity, IdentityFacts, facts_from_model
from chatforge.train import autobatch, loop

LR_KEYS = ("matrix_lr", "embedding_lr", "unembedding_lr", "scalar_lr", "weight_decay")
# Without --save-every a run saves by the clock and keeps its newest checkpoints: two periodic ones
# (should the newest turn out bad) and, once done, the final one; older ones only fill the disk.
SAVE_MINUTES = 5.0
KEEP_PERIODIC = 3


def add_run_arguments(group, stage: str, *, save_help: str, seed_help: str, save_every: int | None = None,
                      resume_help: str = "continue from the latest checkpoint of this stage and tag") -> None:
    group.add_argument("--save-every", type=int, default=save_every, help=save_help)
    group.add_argument("--save-minutes", type=float, default=SAVE_MINUTES,
                       help=f"without --save-every: minutes between checkpoints (default {SAVE_MINUTES:g}, stretched "
                            f"so saving takes at most ~5%% of the run; 0: only the last step), keeping the newest "
                            f"{KEEP_PERIODIC} unless --keep-last says otherwise")
    group.add_argument("--keep-last", type=int, default=None, help="keep only the newest K checkpoints")
    group.add_argument("--resume", action="store_true", help=resume_help)
    group.add_argument("--seed", type=int, default=42, help=seed_help)
    group.add_argument("--wandb", default=None, metavar="RUN", help="also log to wandb under this run name")
    group.add_argument("--run-id", default=None, help=f"name of runs/<run-id>/ (default {stage}-<time>)")


def run_main(args: argparse.Namespace, body: Callable, advice: str | Callable[[], str]):
    """body(args, runtime) inside the runtime and the one-line out-of-memory advice (a callable: read
    when memory runs out, after body has written an auto batch size back into args)."""
    rt = init_runtime(args.device, args.dtype, seed=args.seed)
    with loop.out_of_memory_advice(advice):
        return body(args, rt)


def resume_or_refuse(stage: str, tag: str, resume: bool, fresh_from: str) -> int | None:
    """The step of stage/tag to resume from, or None to start fresh from `fresh_from`; a run already on
    disk without --resume is refused, so nothing is overwritten by accident."""
    existing = checkpoint.latest_step(stage, tag)
    if existing is not None and not resume:
        raise UsageError(f"checkpoints/{stage}/{tag} already holds step {existing}; pass --resume to continue it, "
                         "or a new --tag to start another run beside it")
    if resume and existing is None:
        print0(f"--resume: no {stage} checkpoint with tag {tag} yet; starting from {fresh_from}")
    return existing


def restore(loaded: checkpoint.Loaded, optimizer, rt, same: dict) -> tuple[int, str]:
    """Resume a run: `same` maps the flags that define the run to this invocation's values (e.g.
    {"num_iterations": 500}); each must equal the checkpoint's. Loads the optimizer shard and this
    rank's RNG state; returns (step, checkpoint path)."""
    meta = loaded.meta
    for name, value in same.items():
        if meta.get(name, value) != value:
            flag = "--" + name.replace("_", "-")
            raise CheckpointError(f"{loaded.path} belongs to a run with {flag} {meta[name]} but this one has "
                                  f"{value}; resume with {flag} {meta[name]}")
    optimizer.load_state_dict(loaded.optimizer)
    loaded.optimizer = None  # the optimizer holds its own copy now
    checkpoint.restore_rng_state(meta["rng"][rt.rank], rt.device)
    print0(f"resuming from {loaded.path} (step {meta['step']})")
    return meta["step"], str(loaded.path)


def add_source_arguments(group, source: str, writes: str) -> None:
    """--source, --source-tag, --step (the checkpoint to start from) and --tag (the one to write)."""
    group.add_argument("--source", default=source, choices=("base", "mid", "sft", "rl"),
                       help=f"stage to start from (default {source})")
    group.add_argument("--tag", default=None, help=f"{writes} tag to write (default: the source's tag); a new tag "
                                                   "starts another run beside the ones on disk")
    group.add_argument("--source-tag", default=None, help="tag of the source checkpoint (default: --tag when the "
                                                          "source has it, else its most recently written tag)")
    group.add_argument("--step", type=int, default=None, help="source checkpoint step (default: the latest)")


def pick_source(stage: str, args: argparse.Namespace) -> tuple[str, int, Path | None]:
    """(source tag, step, folder) of the checkpoint to start from; sets args.tag (what this run writes)
    and args.source_tag. A resumed run keeps the source it started from: the stage, tag and step its
    own checkpoint recorded, however many steps that source has gained since; the folder is None when
    that step is gone from disk (a resumed run needs only its own checkpoint)."""
    tag = paths.safe_name(args.tag) if args.tag else None
    source_tag = args.source_tag
    # without --tag a run writes its source's tag: --source-tag, else the most recently written one
    own = tag or source_tag or (checkpoint.resolve(args.source)[0] if checkpoint.list_tags(args.source) else None)
    if own is not None and args.resume and checkpoint.latest_step(stage, own) is not None:
        meta = checkpoint.read_meta(checkpoint.resolve(stage, own)[2])
        recorded = checkpoint.parse_source(meta.get("source"))
        if recorded is not None and recorded[2] is not None:
            return _recorded_source(stage, own, recorded, args)
        if source_tag is None:  # a checkpoint that recorded only the source's tag
            source_tag = (meta.get("args") or {}).get("source_tag")
    if args.source == "mid" and not checkpoint.list_tags("mid"):  # the usual first-hour surprise: base only
        raise CheckpointError(f"no mid checkpoints under {paths.stage_checkpoints_dir('mid')}; run `chatforge "
                              "midtrain` first, or pass --source base to fine-tune the base model directly")
    if source_tag is None and tag in checkpoint.list_tags(args.source):
        source_tag = tag
    latest = source_tag is None  # resolve() picks the most recently written tag
    source_tag, step, folder = checkpoint.resolve(args.source, source_tag, args.step)
    if latest and tag is not None and tag != source_tag:
        print0(f"{stage}/{tag} starts from {args.source}/{source_tag}, the most recently written {args.source} "
               "tag (--source-tag picks another)")
    args.tag, args.source_tag = tag or source_tag, source_tag
    return source_tag, step, folder


def _recorded_source(stage: str, tag: str, recorded: tuple, args: argparse.Namespace) -> tuple[str, int, Path | None]:
    """pick_source for a resumed run whose checkpoint names its source (stage, tag, step)."""
    source_stage, source_tag, step = recorded
    args.tag, args.source, args.source_tag = tag, source_stage, source_tag
    folder = paths.stage_checkpoints_dir(source_stage) / source_tag / checkpoint.step_dir_name(step)
    if step not in checkpoint.list_steps(source_stage, source_tag):
        print0(f"{source_stage}/{source_tag} step {step}, where {stage}/{tag} started, is no longer on disk; "
               f"{stage}/{tag}'s own checkpoint holds all the resumed run needs")
        folder = None
    return source_tag, step, folder


def start_model(stage: str, args: argparse.Namespace, rt) -> dict:
    """For a stage that starts from another stage's checkpoint (--source/--tag/--step): the model with
    its weights (this stage's own checkpoint when resuming), config, tokenizer, tag, the resumed
    checkpoint (or None), and the source's settings and base learning rates."""
    source_tag, source_step, source_folder = pick_source(stage, args)
    tag = args.tag
    source_meta = checkpoint.read_meta(source_folder) if source_folder is not None else {}
    existing = resume_or_refuse(stage, tag, args.resume, str(source_folder))
    resume = None
    if existing is not None:  # weights and optimizer shard in one read
        resume = checkpoint.load(stage, tag, existing, device=rt.device, optimizer=True, rank=rt.rank,
                                 max_seq_len=args.max_seq_len)
        shape = (source_meta or resume.meta)["model_config"]  # the source gone: the run's own shape
        expected = {**shape, **({"sequence_len": args.max_seq_len} if args.max_seq_len else {})}
        checkpoint.check_config(resume.meta, GPTConfig(**expected).to_dict(), resume.path)
        model, tokenizer = resume.model, resume.tokenizer
    else:
        source = checkpoint.load(args.source, source_tag, source_step, device=rt.device, max_seq_len=args.max_seq_len)
        model, tokenizer = source.model, source.tokenizer
    model.train()
    # the name a model was given carries on to the stages after it unless --name says otherwise
    args.name = args.name or (resume.meta.get("name") if resume else None) or source_meta.get("name") \
        or IdentityFacts.name
    # the source's settings as the run started with them (its own record when resuming)
    settings = (resume.meta.get("settings") if resume else None) or source_meta.get("settings") or {}
    base_lrs = {k: settings[k] for k in LR_KEYS if settings.get(k) is not None}
    print0(f"start: {args.source}/{source_tag} step {source_step} -> {stage}/{tag} | {model.num_params():,} parameters | context "
           f"{model.config.sequence_len} | base LRs {base_lrs or 'build_optimizer defaults'} x {args.init_lr_frac}")
    return {"model": model, "config": model.config, "tokenizer": tokenizer, "tag": tag, "resume": resume,
            "source": f"{args.source}/{source_tag}/step {source_step}", "source_settings": settings, "base_lrs": base_lrs}


# ---------------------------------------------------------------------------------------------
# Stages that fine-tune a checkpoint on conversations (midtrain, sft)

def add_stage_arguments(parser: argparse.ArgumentParser, stage: str, source: str, init_lr_frac: float,
                        warmdown_ratio: float, eval_every: int, init_lr_help: str = "") -> None:
    """The flags of a stage that fine-tunes a checkpoint on conversations (midtrain, sft)."""
    add_source_arguments(parser, source, stage)
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--num-iterations", type=int, default=None, help="optimizer steps (default: --epochs 1)")
    length.add_argument("--epochs", type=float, default=None, help="passes over the mixture (default 1)")
    autobatch.add_arguments(parser, f"off CUDA the {'base run' if source == 'base' else 'stage'}'s default")
    parser.add_argument("--max-seq-len", type=int, default=None, help="row length (default: the model's context)")
    data = parser.add_argument_group("data")
    data.add_argument("--extra", action="append", default=[], metavar="PATH",
                      help="a JSONL file of conversations to add (repeatable); see chatforge/tasks/custom.py")
    data.add_argument("--mixture", choices=("full", "extra"), default=None,
                      help="full: the stage's task mixture plus --extra (by default sft sizes the run around a small "
                           "--extra file instead); extra: the --extra files alone")
    data.add_argument("--name", default=None,
                      help="the model's name in the identity conversations (default: the source checkpoint's, "
                           f"else {IdentityFacts.name})")
    data.add_argument("--data-dir", default=None,
                      help="local folder with the task files (default $CHATFORGE_DATA_DIR, else download)")
    sched = parser.add_argument_group("schedule")
    sched.add_argument("--init-lr-frac", type=float, default=init_lr_frac,
                       help=init_lr_help or f"learning rates as a fraction of the base run's (default {init_lr_frac})")
    sched.add_argument("--warmdown-ratio", type=float, default=warmdown_ratio,
                       help=f"fraction of steps of the final linear LR decay to 0 (default {warmdown_ratio})")
    run = parser.add_argument_group("evaluation, checkpoints, logging")
    run.add_argument("--eval-every", type=int, default=eval_every,
                     help=f"steps between validation losses (default {eval_every}; 0: only at the end)")
    run.add_argument("--eval-steps", type=int, default=20, help="micro-batches per validation loss")
    add_run_arguments(run, stage, save_help="steps between checkpoints (default: every --save-minutes; "
                                            "the last step always saves)",
                      seed_help="seed of the mixture order and of the run")
    add_runtime_arguments(parser)


def check_stage_arguments(args: argparse.Namespace) -> None:
    for flag in ("num_iterations", "max_seq_len", "eval_steps", "keep_last"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be a positive integer, got {value}")
    if args.epochs is not None and args.epochs <= 0:
        raise UsageError(f"--epochs must be positive, got {args.epochs}")
    if args.init_lr_frac is not None and not 0 < args.init_lr_frac <= 10:
        raise UsageError(f"--init-lr-frac must be in (0, 10], got {args.init_lr_frac}")
    if not 0 <= args.warmdown_ratio <= 1:
        raise UsageError(f"--warmdown-ratio must be between 0 and 1, got {args.warmdown_ratio}")
    if args.mixture == "extra" and not args.extra:
        raise UsageError("--mixture extra trains on the --extra files alone: give at least one --extra PATH")


def device_batch(args, rt, start: dict, rows_per_step: int, fallback: int, make_trial: Callable) -> int:
    """Rows per micro-batch of a conversation stage: --device-batch-size as given; with auto (the
    default) a resumed run's own, off CUDA `fallback`, else the largest power of two dividing
    `rows_per_step` that fits (train/autobatch.py; make_trial() builds its trial step). The number
    is written back into args, so the checkpoint records what a resume must reuse."""
    if start["resume"] is not None:
        keep_resumed_batches(args, start["resume"].meta, "device_batch_size")
    requested = args.device_batch_size or autobatch.AUTO
    cap = autobatch.apply_memory_limit(args.memory_limit_gb, rt.device)
    args.device_batch_size, _ = autobatch.resolve(requested, rows_per_step, rt, make_trial, fallback, cap)
    return args.device_batch_size


def keep_resumed_batches(args, meta: dict, *names: str) -> None:
    """Each batch-size flag in `names` that says auto (or is unset) takes the size the resumed run's
    checkpoint recorded (what its own search settled), said in one line: a resume searches nothing
    again and splits its steps exactly as before."""
    recorded = meta.get("args") or {}
    for name in names:
        value = recorded.get(name)
        if getattr(args, name) in (None, autobatch.AUTO) and isinstance(value, int):
            setattr(args, name, value)
            print0(f"--{name.replace('_', '-')} auto: {value}, the resumed run's")


def extra_tasks(args) -> list:
    return [CustomJSON(path) for path in args.extra]


def identity_task(model, size: int, seed: int, name: str | None):
    """Conversations about the model itself, which call it `name` (default chatforge)."""
    facts = facts_from_model(model.config.to_dict(), model.num_params(), name=name or IdentityFacts.name)
    return Identity(size, facts, seed=seed)


def make_optimizer(model, base_lrs: dict, init_lr_frac: float):
    kwargs = {k: v * (init_lr_frac if k.endswith("_lr") else 1.0) for k, v in base_lrs.items()}
    if not any(k.endswith("_lr") for k in base_lrs):  # a checkpoint without settings: the defaults, scaled
        defaults = inspect.signature(build_optimizer).parameters
        kwargs.update({k: defaults[k].default * init_lr_frac for k in LR_KEYS if k.endswith("_lr")})
    return build_optimizer(model, **kwargs)


class CountedBatches:
    """An iterator of (inputs, targets, ...) micro-batches that counts the input tokens it hands out."""

    def __init__(self, batches):
        self.batches, self.tokens = iter(batches), 0

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.batches)
        self.tokens += batch[0].numel()
        return batch

    def take(self) -> int:
        """Tokens handed out since the last call."""
        tokens, self.tokens = self.tokens, 0
        return tokens


@dataclass
class StepPlan:
    """What a conversation stage's steps are made of (midtrain, sft)."""
    num_iterations: int
    batches: object                      # iterator of micro-batches
    accumulate: Callable                 # loop.accumulate_gradients or accumulate_masked_gradients
    accum_steps: int
    tokens_per_step: int | None          # None: rows vary in length; the steps' batches are counted
    val_loss: Callable[[], float] | None  # None: no validation set
    loader_state: Callable[[], dict]
    schedule: loop.Schedule


def train_steps(stage: str, args, rt, start: dict, optimizer, train_model, plan: StepPlan) -> dict:
    """Run a conversation stage's steps with validation, checkpoints, metrics and progress; the facts."""
    model, tokenizer, n = start["model"], start["tokenizer"], plan.num_iterations
    step, last_checkpoint, meta = 0, None, {}
    if start["resume"] is not None:
        meta = start["resume"].meta
        step, last_checkpoint = restore(start["resume"], optimizer, rt, {"num_iterations": n})
    start_step = step
    logger = MetricsLogger(stage, args=vars(args), run_id=args.run_id or meta.get("run_id"), wandb_run=args.wandb)
    throughput = loop.Throughput(plan.tokens_per_step or 0, model.estimate_flops(), loop.peak_flops(rt.device),
                                 rt.world_size)
    batches = plan.batches if plan.tokens_per_step else CountedBatches(plan.batches)
    val_history = [tuple(p) for p in meta.get("val_loss_history", [])]
    last_loss = meta.get("metrics", {}).get("train_loss")
    progress = Progress(n, stage, unit="step", initial=start_step, warmup=throughput.skip_steps)

    def speed() -> dict:
        return throughput.summary()

    def validate(at: int) -> None:
        train_model.eval()
        loss = plan.val_loss()
        train_model.train()
        val_history.append((at, loss))
        logger.log(at, val_loss=loss)
        print0(f"step {at}: val loss {loss:.4f}")
        if at > start_step:
            progress.report()

    def save_at(at: int) -> None:
        nonlocal last_checkpoint
        last_checkpoint = save(
            stage, start["tag"], at, model, optimizer, tokenizer, args, loader_state=plan.loader_state(),
            metrics={"train_loss": last_loss, **({"val_loss": val_history[-1][1]} if val_history else {})},
            extra={"num_iterations": n, "run_id": logger.run_id, "val_loss_history": val_history,
                   "source": start["source"], "settings": start["source_settings"], "name": args.name})

    def take_step(at: int) -> None:
        nonlocal last_loss
        sched = loop.apply_schedules(optimizer, at, plan.schedule)
        last_loss, seconds = loop.optimizer_step(train_model, model, optimizer, batches, plan.accum_steps,
                                                 rt, at, last_checkpoint, accumulate=plan.accumulate)
        # rows of conversations vary: count what this step trained on (padded, as the GPU computes it)
        throughput.record(seconds, None if plan.tokens_per_step else batches.take() * rt.world_size)
        logger.log(at + 1, train_loss=last_loss, lr_multiplier=sched["lr_multiplier"], **speed(),
                   eta_s=round(throughput.eta_seconds(n - at - 1)), **loop.memory_stats(rt.device))
        progress.update(1, **loop.progress_fields(last_loss, throughput))

    run_steps(start_step, n, take_step, evals=[(args.eval_every, validate)] if plan.val_loss else [],
              save_every=args.save_every, save_minutes=args.save_minutes, save_at=save_at)
    progress.close()
    logger.close()
    return {"stage": stage, "tag": start["tag"], "source": start["source"], "parameters": model.num_params(),
            "num_iterations": n, "world_size": rt.world_size, "final_train_loss": last_loss,
            "final_val_loss": val_history[-1][1] if val_history else None, "val_loss_history": val_history,
            **speed(), **loop.memory_stats(rt.device), "resumed_from_step": start_step or None,
            "checkpoint": last_checkpoint, "run_id": logger.run_id}


LOSS_REASONS = {"final_train_loss": "no step ran in this run", "final_val_loss": "no validation ran in this run"}


def write_loss_summary(stage: str, tag: str, name: str, summary: dict, rt, quiet: bool = False) -> Path:
    """A conversation stage's summary, closing on its final losses."""
    closing = (f"final train loss {format_figure(summary.get('final_train_loss'), LOSS_REASONS['final_train_loss'])}, "
               f"val loss {format_figure(summary.get('final_val_loss'), LOSS_REASONS['final_val_loss'])}")
    return write_summary(stage, tag, name, summary, rt, LOSS_REASONS, closing, quiet)


# ---------------------------------------------------------------------------------------------
# Checkpoints, summaries, the cadence

def describe_data(args: dict) -> str:
    """What a run trained on, in a few words, from its arguments (a stage that knows better, like
    pretraining with its corpus's description, records its own)."""
    if args.get("task"):
        return f"{args['task']} questions (rewards)"
    if args.get("mixture"):
        extra = ", ".join(args.get("extra") or [])
        if args["mixture"] == "extra":
            return f"--extra {extra}"
        where = f" from {args['data_dir']}" if args.get("data_dir") else ""
        return f"the stage's task mixture{where}" + (f" + --extra {extra}" if extra else "")
    return args.get("data") or (f"downloaded {args['corpus']} shards" if args.get("corpus") else "not recorded")


def save(stage: str, tag: str, step: int, model, optimizer, tokenizer, args: argparse.Namespace, *,
         extra: dict | None = None, **kwargs) -> str:
    """A checkpoint of every rank's state (model, optimizer shard, loader position, meta with the run's
    data); its folder. Saving by the clock (no --save-every) keeps the newest KEEP_PERIODIC unless
    --keep-last is given."""
    extra = {"data": describe_data(vars(args)), **(extra or {})}
    keep_last = args.keep_last
    if keep_last is None and args.save_every is None and args.save_minutes > 0:
        keep_last = KEEP_PERIODIC
    folder = checkpoint.save_checkpoint(stage, tag, step, model, optimizer, model_config=model.config.to_dict(),
                                        vocab_size=tokenizer.vocab_size, tokenizer_name=tokenizer.name, args=vars(args),
                                        keep_last=keep_last, extra=extra, **kwargs)
    print0(f"step {step}: saved {folder}")
    return str(folder)


def write_summary(stage: str, tag: str, name: str, summary: dict, rt, reasons: dict, closing: str,
                  quiet: bool = False) -> Path:
    """eval/<stage>/<tag>/<name>: the run's summary with its provenance; figures it could not measure
    say why (`reasons`) instead of being None. Prints `done in ...: <closing>; summary in <path>`
    unless `quiet` (a summary written again with a final eval's results)."""
    path = paths.eval_dir(stage, tag, create=False) / name
    summary["not_measured"] = not_measured({k: summary.get(k) for k in reasons}, reasons)
    if rt.is_main:
        paths.atomic_write_text(path, json.dumps({**summary, **provenance()}, indent=2, default=str))
        if not quiet:
            print0(f"done in {format_duration(summary['wall_time_s'])}: {closing}; summary in {path}")
    return path


def run_steps(start_step: int, num_iterations: int, take_step: Callable[[int], None], *,
              evals: list[tuple] = (), save_every: int | None = -1, save_at: Callable[[int], None] | None = None,
              save_minutes: float = 0.0) -> None:
    """Steps start_step .. num_iterations - 1, with each (every, evaluate[, at_end]) of `evals` run at
    step 0, every `every` steps and, unless at_end is False, at the end even when `every` is 0; and
    `save_at` at the end and every `save_every` steps, or, when `save_every` is None, once
    `save_minutes` of wall clock have passed since the last save (the interval stretched to 19 times
    the last save's duration, so that saving a big model takes at most ~5% of the run). A resumed run
    starts after the checkpoint it came from: that step is neither evaluated nor saved again.

    Ctrl-C lets the step in flight finish (a step cut in the middle would leave the optimizer half
    updated), then saves and stops with one line that says so and how to continue; a second Ctrl-C
    stops at once. Under torchrun every rank agrees on the step it stops after and on the steps the
    clock saves (one small all-reduce per step)."""
    step, clock_due = start_step, False
    by_clock = save_at is not None and save_every is None and save_minutes > 0
    every = -1 if save_every is None else save_every
    last_save = {"end": monotonic(), "seconds": 0.0}

    def save(at: int) -> None:
        started = monotonic()
        save_at(at)
        last_save.update(end=monotonic(), seconds=monotonic() - started)

    with _interrupt_after_step() as interrupted:
        while True:
            last = step == num_iterations
            for every_eval, evaluate, *at_end in evals:
                due = loop.is_due(step, every_eval, num_iterations) or (last and (at_end or [True])[0])
                if (step > start_step or start_step == 0) and due:
                    evaluate(step)
            if save_at is not None and step > start_step and (last or clock_due or loop.is_due(step, every, num_iterations)):
                save(step)
            if last:
                return
            take_step(step)
            step += 1
            interval = max(save_minutes * 60, 19 * last_save["seconds"])
            stop, clock_due = _on_any_rank(interrupted(), by_clock and monotonic() - last_save["end"] >= interval)
            if stop and step < num_iterations:  # at the last step the run just finishes
                if save_at is not None:
                    save_at(step)
                kept = f"saved step {step}" if save_at is not None else "nothing saved (this stage keeps no checkpoints)"
                raise Interrupted(f"interrupted by Ctrl-C after step {step} of {num_iterations}: {kept}; "
                                  "run the same command with --resume to continue")


def _on_any_rank(*flags: bool) -> tuple[bool, ...]:
    """Each flag, true when it is true on any rank (as it is on one process)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return flags
    t = torch.tensor([1.0 if f else 0.0 for f in flags], device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return tuple(bool(v) for v in t.tolist())


@contextmanager
def _interrupt_after_step():
    """A SIGINT handler that only raises a flag (the main thread's; elsewhere Ctrl-C acts as usual)."""
    flag = {"set": False}
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # started under nohup: Ctrl-C is not ours to take
        yield lambda: False
        return

    def on_sigint(signum, frame):
        flag["set"] = True
        signal.signal(signal.SIGINT, previous)  # the next Ctrl-C is the ordinary KeyboardInterrupt
        print0("Ctrl-C: finishing this step, then saving (press Ctrl-C again to stop at once)")

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield lambda: flag["set"]
    finally:
        signal.signal(signal.SIGINT, previous)


def _collective_device() -> torch.device:
    backend = dist.get_backend()
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
