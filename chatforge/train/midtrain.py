"""`chatforge midtrain`: continue the base model on conversations, so it learns the chat format.

    chatforge midtrain                                     # latest base checkpoint, one epoch of the mixture
    chatforge midtrain --data-dir ../shared/data --num-iterations 500
    torchrun --nproc_per_node=8 -m chatforge midtrain --extra me.jsonl

The mixture (each task in tasks/): SmolTalk (general chat), MMLU's auxiliary train set (multiple
choice; with a local --data-dir that lacks it, MMLU dev + validation instead), GSM8K train (its
calculator notes as python tool calls), SpellingBee with and without the tool, identity conversations
about this very model (twice), and any `--extra` JSONL files (twice). `--mixture extra` trains on the
--extra files alone.

Conversations are rendered with `render_conversation` and packed like pretraining (best fit, bos-led,
`data/conversations.ConversationCorpus` through the pretraining loader). Every token is a target, as
in nanochat's midtraining, not only the assistant's (mask 1) tokens: midtraining is still mostly
language modelling on a new kind of text — the user turns are good text and teach the model the
special-token layout from both sides; every packed row then has exactly seq_len targets, so gradient
accumulation stays the plain mean (`loop.accumulate_gradients`); and SFT afterwards trains on the
assistant's tokens only, which is where the masking matters. The engine never lets the model write
a user turn or a tool output, so learning to predict them costs nothing at inference.

Learning rates are the base run's (stored in its checkpoint) times --init-lr-frac (default 1.0),
constant, then a linear warmdown over the last 20% of the steps to zero. The total batch defaults to
the base run's. Checkpoints go to checkpoints/mid/<tag>/ (tag: the source's by default), with the
loader's exact position for `--resume`; eval/mid/<tag>/midtrain.json summarises the run.

`train/sft.py` uses this file's stage scaffolding (source loading, optimizer, the step loop).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from pathlib import Path

import torch

from chatforge import paths
from chatforge.errors import CheckpointError, UsageError
from chatforge.progress import MetricsLogger, Progress, format_duration, provenance
from chatforge.runtime import add_runtime_arguments, init_runtime, print0
from chatforge.train import loop

STAGE = "mid"
LR_KEYS = ("matrix_lr", "embedding_lr", "unembedding_lr", "scalar_lr", "weight_decay")


# ---------------------------------------------------------------------------------------------
# Arguments shared by midtrain and SFT

def add_stage_arguments(parser: argparse.ArgumentParser, source: str, init_lr_frac: float,
                        warmdown_ratio: float, eval_every: int) -> None:
    parser.add_argument("--source", default=source, choices=("base", "mid", "sft", "rl"),
                        help=f"stage to start from (default {source})")
    parser.add_argument("--tag", default=None, help="checkpoint tag to start from and to write (default: the "
                                                    "source's most recently written tag)")
    parser.add_argument("--step", type=int, default=None, help="source checkpoint step (default: the latest)")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--num-iterations", type=int, default=None, help="optimizer steps (default: --epochs 1)")
    length.add_argument("--epochs", type=float, default=None, help="passes over the mixture (default 1)")
    parser.add_argument("--device-batch-size", type=int, default=None, help="rows per micro-batch per device")
    parser.add_argument("--max-seq-len", type=int, default=None, help="row length (default: the model's context)")
    data = parser.add_argument_group("data")
    data.add_argument("--extra", action="append", default=[], metavar="PATH",
                      help="a JSONL file of conversations to add (repeatable); see chatforge/tasks/custom.py")
    data.add_argument("--mixture", choices=("full", "extra"), default="full",
                      help="full: the stage's task mixture plus --extra; extra: the --extra files alone")
    data.add_argument("--data-dir", default=None,
                      help="local folder with the task files (default $CHATFORGE_DATA_DIR, else download)")
    sched = parser.add_argument_group("schedule")
    sched.add_argument("--init-lr-frac", type=float, default=init_lr_frac,
                       help=f"learning rates as a fraction of the base run's (default {init_lr_frac})")
    sched.add_argument("--warmdown-ratio", type=float, default=warmdown_ratio,
                       help=f"fraction of steps of the final linear LR decay to 0 (default {warmdown_ratio})")
    run = parser.add_argument_group("evaluation, checkpoints, logging")
    run.add_argument("--eval-every", type=int, default=eval_every,
                     help=f"steps between validation losses (default {eval_every}; 0: only at the end)")
    run.add_argument("--eval-steps", type=int, default=20, help="micro-batches per validation loss")
    run.add_argument("--save-every", type=int, default=-1, help="steps between checkpoints (default: only the last)")
    run.add_argument("--keep-last", type=int, default=None, help="keep only the newest K checkpoints")
    run.add_argument("--resume", action="store_true", help="continue from the latest checkpoint of this stage and tag")
    run.add_argument("--seed", type=int, default=42, help="seed of the mixture order and of the run")
    run.add_argument("--wandb", default=None, metavar="RUN", help="also log to wandb under this run name")
    run.add_argument("--run-id", default=None, help="name of runs/<run-id>/ (default <stage>-<time>)")
    add_runtime_arguments(parser)


def check_stage_arguments(args: argparse.Namespace) -> None:
    for flag in ("num_iterations", "device_batch_size", "max_seq_len", "eval_steps", "keep_last"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be a positive integer, got {value}")
    if args.epochs is not None and args.epochs <= 0:
        raise UsageError(f"--epochs must be positive, got {args.epochs}")
    if not 0 < args.init_lr_frac <= 10:
        raise UsageError(f"--init-lr-frac must be in (0, 10], got {args.init_lr_frac}")
    if not 0 <= args.warmdown_ratio <= 1:
        raise UsageError(f"--warmdown-ratio must be between 0 and 1, got {args.warmdown_ratio}")
    if args.mixture == "extra" and not args.extra:
        raise UsageError("--mixture extra trains on the --extra files alone: give at least one --extra PATH")


# ---------------------------------------------------------------------------------------------
# Mixture pieces shared by midtrain and SFT

def extra_tasks(args) -> list:
    from chatforge.tasks.custom import CustomJSON

    return [CustomJSON(path) for path in args.extra]


def identity_task(model, size: int, seed: int):
    from chatforge.tasks.identity import Identity, facts_from_model

    return Identity(size, facts_from_model(model.config.to_dict(), model.num_params()), seed=seed)


def mmlu_train(data_dir):
    """MMLU auxiliary_train; a local folder (--data-dir / $CHATFORGE_DATA_DIR) without it gives dev + validation."""
    from chatforge.tasks.base import DATA_DIR_ENV, TaskSequence, _split_files
    from chatforge.tasks.mmlu import MMLU

    roots = [Path(d).expanduser() for d in (data_dir, os.environ.get(DATA_DIR_ENV)) if d]
    roots.append(paths.base_dir() / "tasks")  # the download cache
    local = any(_split_files(root, "mmlu", "cais/mmlu", "auxiliary_train", "train", ("auxiliary_train",))
                for root in roots)
    if local or len(roots) == 1:  # present, or no local folder at all: the hub has it
        return MMLU("auxiliary_train", data_dir)
    print0(f"MMLU auxiliary_train is not in {', '.join(str(r) for r in roots[:-1])}; using MMLU dev + validation")
    return TaskSequence([MMLU("dev", data_dir), MMLU("validation", data_dir)])


def mid_mixture(args, model):
    """(train mixture, validation conversations)."""
    from chatforge.tasks.base import TaskMixture
    from chatforge.tasks.gsm8k import GSM8K
    from chatforge.tasks.smoltalk import SmolTalk
    from chatforge.tasks.spelling import SpellingBee

    extras = extra_tasks(args)
    if args.mixture == "extra":
        return TaskMixture(extras, seed=args.seed), TaskMixture(extras, seed=args.seed)
    tasks = [SmolTalk("train", args.data_dir), mmlu_train(args.data_dir), GSM8K("train", args.data_dir),
             SpellingBee(size=40_000, use_tool=True, stop=20_000),
             SpellingBee(size=40_000, use_tool=False, start=20_000),
             identity_task(model, 1000, args.seed)] + extras
    weights = [1.0] * 5 + [2.0] + [2.0] * len(extras)
    return TaskMixture(tasks, weights, seed=args.seed), SmolTalk("test", args.data_dir)


# ---------------------------------------------------------------------------------------------
# The starting point: a previous stage's weights, or this stage's own checkpoint to resume

def start_model(stage: str, args: argparse.Namespace, rt) -> dict:
    """Model (weights loaded), its config, the tokenizer, LRs and, when resuming, this stage's checkpoint."""
    from chatforge.model import checkpoint
    from chatforge.model.gpt import GPT, GPTConfig
    from chatforge.tokenizer import load_tokenizer

    tag, source_step, source_folder = checkpoint.resolve(args.source, args.tag, args.step)
    args.tag = tag
    source_meta = checkpoint.read_meta(source_folder)
    existing = checkpoint.latest_step(stage, tag)
    resume = None
    if args.resume and existing is not None:
        resume = checkpoint.load_checkpoint(stage, tag, existing, device=rt.device, rank=rt.rank)
        print0(f"resuming from {resume['path']} (step {resume['meta']['step']})")
    elif args.resume:
        print0(f"--resume: no {stage} checkpoint with tag {tag} yet; starting from {source_folder}")
    elif existing is not None:
        raise UsageError(f"checkpoints/{stage}/{tag} already holds step {existing}; pass --resume to continue it, "
                         f"or delete that folder to start over")
    config_dict = dict(source_meta["model_config"])
    if args.max_seq_len:
        config_dict["sequence_len"] = args.max_seq_len
    config = GPTConfig(**config_dict)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=rt.device)
    model.init_weights()  # the buffers; the weights come from the checkpoint
    if resume is not None:
        checkpoint.check_config(resume["meta"], config.to_dict(), resume["path"])
        checkpoint.load_model_state(model, resume["model"], resume["path"])
    else:
        state = checkpoint.load_checkpoint(args.source, tag, source_step, device=rt.device, load_optimizer=False)
        checkpoint.load_model_state(model, state["model"], source_folder)
        del state
    tokenizer = load_tokenizer()
    if source_meta.get("vocab_size") not in (None, tokenizer.vocab_size):
        raise CheckpointError(f"{source_folder} was trained with a {source_meta['vocab_size']}-token tokenizer but "
                              f"{paths.tokenizer_dir()} holds a {tokenizer.vocab_size}-token one; restore the matching one")
    settings = source_meta.get("settings") or {}
    base_lrs = {k: settings[k] for k in LR_KEYS if settings.get(k) is not None}
    print0(f"start: {args.source}/{tag} step {source_step} | {model.num_params():,} parameters | context "
           f"{config.sequence_len} | base LRs {base_lrs or 'build_optimizer defaults'} x {args.init_lr_frac}")
    return {"model": model, "config": config, "tokenizer": tokenizer, "tag": tag, "resume": resume,
            "source": f"{args.source}/{tag}/step {source_step}", "source_settings": settings, "base_lrs": base_lrs}


def make_optimizer(model, base_lrs: dict, init_lr_frac: float):
    from chatforge.model.optim import build_optimizer

    kwargs = {k: v * (init_lr_frac if k.endswith("_lr") else 1.0) for k, v in base_lrs.items()}
    if not any(k.endswith("_lr") for k in base_lrs):  # a checkpoint without settings: the defaults, scaled
        import inspect

        defaults = inspect.signature(build_optimizer).parameters
        kwargs.update({k: defaults[k].default * init_lr_frac for k in LR_KEYS if k.endswith("_lr")})
    return build_optimizer(model, **kwargs)


# ---------------------------------------------------------------------------------------------
# The step loop shared by midtrain and SFT

def train_steps(stage: str, args, rt, start: dict, optimizer, train_model, *, num_iterations: int,
                batches, accumulate, accum_steps: int, tokens_per_step: int | None, val_loss,
                loader_state, schedule) -> dict:
    """Run steps until num_iterations, with validation, checkpoints, metrics, progress; returns the facts."""
    from chatforge.model import checkpoint

    model, config, tokenizer = start["model"], start["config"], start["tokenizer"]
    step, last_checkpoint, meta = 0, None, {}
    if start["resume"] is not None:
        resume = start["resume"]
        meta = resume["meta"]
        if meta.get("num_iterations", num_iterations) != num_iterations:
            raise CheckpointError(f"{resume['path']} belongs to a run of {meta['num_iterations']} steps but this one "
                                  f"has {num_iterations}; resume with --num-iterations {meta['num_iterations']}")
        optimizer.load_state_dict(resume["optimizer"])
        checkpoint.restore_rng_state(meta["rng"][rt.rank], rt.device)
        step, last_checkpoint = meta["step"], str(resume["path"])
    start_step = step
    logger = MetricsLogger(stage, args=vars(args), run_id=args.run_id or meta.get("run_id"), wandb_run=args.wandb)
    flops = model.estimate_flops()
    throughput = loop.Throughput(tokens_per_step or 0, flops, loop.peak_flops(rt.device), rt.world_size)
    val_history = [tuple(p) for p in meta.get("val_loss_history", [])]
    last_loss = meta.get("metrics", {}).get("train_loss")

    def save() -> str:
        folder = checkpoint.save_checkpoint(
            stage, start["tag"], step, model, optimizer, model_config=config.to_dict(),
            vocab_size=tokenizer.vocab_size, loader_state=loader_state(),
            metrics={"train_loss": last_loss, **({"val_loss": val_history[-1][1]} if val_history else {})},
            args=vars(args), keep_last=args.keep_last,
            extra={"num_iterations": num_iterations, "run_id": logger.run_id, "val_loss_history": val_history,
                   "source": start["source"], "settings": start["source_settings"]})
        print0(f"step {step}: saved {folder}")
        return str(folder)

    progress = Progress(num_iterations - start_step, stage, unit="step")
    while True:
        last = step == num_iterations
        if (step > start_step or start_step == 0) and (last or loop.is_due(step, args.eval_every, num_iterations)):
            train_model.eval()
            loss = val_loss()
            train_model.train()
            val_history.append((step, loss))
            logger.log(step, val_loss=loss)
            print0(f"step {step}: val loss {loss:.4f}")
        if step > start_step and (last or loop.is_due(step, args.save_every, num_iterations)):
            last_checkpoint = save()
        if last:
            break
        sched = loop.apply_schedules(optimizer, step, schedule)
        last_loss, seconds = loop.optimizer_step(train_model, model, optimizer, batches, accum_steps, rt, step,
                                                 last_checkpoint, accumulate=accumulate)
        step += 1
        throughput.record(seconds)
        speed = throughput.summary() if tokens_per_step else {"step_ms": throughput.summary()["step_ms"]}
        logger.log(step, train_loss=last_loss, lr_multiplier=sched["lr_multiplier"], **speed,
                   eta_s=round(throughput.eta_seconds(num_iterations - step)), **loop.memory_stats(rt.device))
        progress.update(1, loss=f"{last_loss:.4f}", **{k: v for k, v in speed.items() if k != "step_ms"})
    progress.close()
    logger.close()
    return {"stage": stage, "tag": start["tag"], "source": start["source"], "parameters": model.num_params(),
            "num_iterations": num_iterations, "world_size": rt.world_size, "final_train_loss": last_loss,
            "final_val_loss": val_history[-1][1] if val_history else None, "val_loss_history": val_history,
            **(throughput.summary() if tokens_per_step else {"step_ms": throughput.summary()["step_ms"]}),
            **loop.memory_stats(rt.device), "resumed_from_step": start_step or None, "checkpoint": last_checkpoint,
            "run_id": logger.run_id}


def write_summary(stage: str, tag: str, name: str, summary: dict, rt) -> Path:
    path = paths.eval_dir(stage, tag, create=False) / name
    if rt.is_main:
        paths.atomic_write_text(path, json.dumps({**summary, **provenance()}, indent=2, default=str))
        print0(f"done in {format_duration(summary['wall_time_s'])}: final val loss {summary['final_val_loss']}; "
               f"summary in {path}")
    return path


# ---------------------------------------------------------------------------------------------
# Midtraining

def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_stage_arguments(parser, source="base", init_lr_frac=1.0, warmdown_ratio=0.2, eval_every=150)
    parser.add_argument("--total-batch-size", type=int, default=None,
                        help="tokens per optimizer step over all ranks (default: the base run's, if it divides)")
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                        help="torch.compile the model (auto/on: on CUDA; CPU always runs eager)")


def main(args: argparse.Namespace) -> dict:
    check_stage_arguments(args)
    rt = init_runtime(args.device, args.dtype, seed=args.seed)
    with loop.out_of_memory_advice(f"with --device-batch-size {args.device_batch_size}; "
                                   "lower it (gradient accumulation keeps the total batch)"):
        return _midtrain(args, rt)


def _midtrain(args: argparse.Namespace, rt) -> dict:
    from chatforge.data.conversations import ConversationCorpus, estimate_tokens
    from chatforge.data.loader import PackedLoader
    from chatforge.model.parallel import prepare_model

    started = time.time()
    start = start_model(STAGE, args, rt)
    model, config, tokenizer = start["model"], start["config"], start["tokenizer"]
    seq_len = config.sequence_len
    device_batch = args.device_batch_size or start["source_settings"].get("device_batch_size") or 32
    per_micro = device_batch * seq_len * rt.world_size
    total = args.total_batch_size or start["source_settings"].get("total_batch_size") or per_micro
    if args.total_batch_size is None and total % per_micro:
        total = per_micro
    if total % per_micro:
        raise UsageError(f"--total-batch-size {total} is not a multiple of device batch x seq len x ranks "
                         f"({device_batch} x {seq_len} x {rt.world_size} = {per_micro})")
    accum = total // per_micro

    train_set, val_set = mid_mixture(args, model)
    corpus = ConversationCorpus({"train": train_set, "val": val_set}, tokenizer, f"midtraining mixture ({len(train_set):,} "
                                                                            "conversations)")
    if args.num_iterations is None:
        tokens = estimate_tokens(train_set, tokenizer, seed=args.seed)
        args.num_iterations = max(1, round((args.epochs or 1.0) * tokens / total))
        print0(f"the mixture holds ~{tokens:,} tokens (estimated from a sample) -> {args.num_iterations:,} steps "
               f"for {args.epochs or 1.0:g} epoch(s)")
    print0(f"midtraining: {len(train_set):,} conversations | {accum} micro-step(s) of {device_batch}x{seq_len} per "
           f"rank | {total:,} tokens per step | {args.num_iterations:,} steps")

    optimizer = make_optimizer(model, start["base_lrs"], args.init_lr_frac)
    resume = start["resume"]
    state = resume["meta"]["loader_state"][rt.rank] if resume else None
    train_loader = PackedLoader(corpus, tokenizer, device_batch, seq_len, rank=rt.rank, world_size=rt.world_size,
                                device=rt.device, state=state)
    train_model = prepare_model(model, rt, compile=args.compile != "off")

    def val_loss() -> float:
        val_loader = PackedLoader(corpus, tokenizer, device_batch, seq_len, split="val", rank=rt.rank,
                                  world_size=rt.world_size, device=rt.device, loop=False)
        try:
            return loop.evaluate_loss(train_model, itertools.islice(iter(val_loader), args.eval_steps), rt)
        finally:
            val_loader.close()

    schedule = loop.Schedule(args.num_iterations, warmdown_ratio=args.warmdown_ratio, final_lr_frac=0.0)
    try:
        summary = train_steps(STAGE, args, rt, start, optimizer, train_model, num_iterations=args.num_iterations,
                              batches=iter(train_loader), accumulate=loop.accumulate_gradients, accum_steps=accum,
                              tokens_per_step=total, val_loss=val_loss, loader_state=train_loader.state_dict,
                              schedule=schedule)
    finally:
        train_loader.close()
    summary.update(total_batch_size=total, training_tokens=total * args.num_iterations,
                   conversations=len(train_set), mixture=args.mixture, extra=args.extra,
                   wall_time_s=round(time.time() - started, 1), args=vars(args))
    write_summary(STAGE, start["tag"], "midtrain.json", summary, rt)
    return summary
