"""`chatforge midtrain`: continue the base model on conversations, so it learns the chat format.

    chatforge midtrain                                     # latest base checkpoint, one epoch of the mixture
    chatforge midtrain --data-dir DIR --num-iterations 500
    torchrun --nproc_per_node=8 -m chatforge midtrain --extra me.jsonl

The mixture (each task in tasks/): SmolTalk (general chat), MMLU's auxiliary train set (multiple
choice; with a local --data-dir that lacks it, MMLU dev + validation instead), GSM8K train (its
calculator notes as python tool calls), SpellingBee with and without the tool, identity conversations
about this very model (twice; `--name NAME` is what they call it), and any `--extra` JSONL files
(twice). `--mixture extra` trains on the --extra files alone, validated on lines held out of them.

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
the base run's; the micro-batch to `auto` (on CUDA the largest power of two that fits, found by
trying real steps: `train/autobatch.py`; off CUDA the base run's). Checkpoints go to checkpoints/mid/<tag>/ (tag: the source's by default), with the
loader's exact position for `--resume`; eval/mid/<tag>/midtrain.json summarises the run.

The scaffolding (start or resume, the step loop, checkpoints, the summary) is `train/stage.py`'s.
"""

from __future__ import annotations

import argparse
import itertools
import os
import time
from pathlib import Path

from chatforge import paths
from chatforge.data.conversations import ConversationCorpus, estimate_tokens
from chatforge.data.loader import PackedLoader
from chatforge.errors import UsageError
from chatforge.flags import add_compile_flag
from chatforge.model.speedups import prepare_model
from chatforge.runtime import print0
from chatforge.tasks.base import DATA_DIR_ENV, TaskMixture, TaskSequence, split_files
from chatforge.tasks.gsm8k import GSM8K
from chatforge.tasks.mmlu import MMLU
from chatforge.tasks.smoltalk import SmolTalk
from chatforge.tasks.spelling import SpellingBee
from chatforge.train import autobatch, extra_plan, loop, stage

STAGE = "mid"


# ---------------------------------------------------------------------------------------------
# The mixture

def mmlu_train(data_dir):
    """MMLU auxiliary_train; a local folder (--data-dir / $CHATFORGE_DATA_DIR) without it gives dev + validation."""
    roots = [Path(d).expanduser() for d in (data_dir, os.environ.get(DATA_DIR_ENV)) if d]
    roots.append(paths.task_cache_dir())  # the download cache
    local = any(split_files(root, "mmlu", "cais/mmlu", "auxiliary_train", "train", ("auxiliary_train",))
                for root in roots)
    if local or len(roots) == 1:  # present, or no local folder at all: the hub has it
        return MMLU("auxiliary_train", data_dir)
    print0(f"MMLU auxiliary_train is not in {', '.join(str(r) for r in roots[:-1])}; using MMLU dev + validation")
    return TaskSequence([MMLU("dev", data_dir), MMLU("validation", data_dir)])


def mid_mixture(args, model):
    """(train mixture, validation conversations or None)."""
    extras = stage.extra_tasks(args)
    if args.mixture == "extra":  # validated on held-out lines, never on training lines
        train, val = extra_plan.hold_out(extras, args.seed)
        return TaskMixture(train, seed=args.seed), TaskMixture(val, seed=args.seed) if val else None
    tasks = [SmolTalk("train", args.data_dir), mmlu_train(args.data_dir), GSM8K("train", args.data_dir),
             SpellingBee(size=40_000, use_tool=True, stop=20_000),
             SpellingBee(size=40_000, use_tool=False, start=20_000),
             stage.identity_task(model, 1000, args.seed, args.name)] + extras
    weights = [1.0] * 5 + [2.0] + [2.0] * len(extras)
    return TaskMixture(tasks, weights, seed=args.seed), SmolTalk("test", args.data_dir)


# ---------------------------------------------------------------------------------------------
# Midtraining

def add_arguments(parser: argparse.ArgumentParser) -> None:
    stage.add_stage_arguments(parser, STAGE, source="base", init_lr_frac=1.0, warmdown_ratio=0.2, eval_every=150)
    parser.add_argument("--total-batch-size", type=int, default=None,
                        help="tokens per optimizer step over all ranks (default: the base run's, if it divides)")
    add_compile_flag(parser, "the model", "on; CPU always runs eager")


def main(args: argparse.Namespace) -> dict:
    stage.check_stage_arguments(args)
    args.mixture = args.mixture or "full"
    return stage.run_main(args, _midtrain, lambda: f"with --device-batch-size {args.device_batch_size}; "
                                                   "lower it (gradient accumulation keeps the total batch)")


def _midtrain(args: argparse.Namespace, rt) -> dict:
    started = time.time()
    start = stage.start_model(STAGE, args, rt)
    model, config, tokenizer = start["model"], start["config"], start["tokenizer"]
    seq_len = config.sequence_len
    fallback = start["source_settings"].get("device_batch_size") or 32
    optimizer = stage.make_optimizer(model, start["base_lrs"], args.init_lr_frac)
    train_model = prepare_model(model, rt, compile=args.compile != "off")
    row_tokens = seq_len * rt.world_size  # a micro-batch's tokens over all ranks, per row
    wanted = args.total_batch_size or start["source_settings"].get("total_batch_size") or fallback * row_tokens
    device_batch = stage.device_batch(
        args, rt, start, wanted // row_tokens if wanted % row_tokens == 0 else fallback, fallback,
        lambda: autobatch.training_trial(train_model, model, rt, seq_len, config.vocab_size,
                                         optimizer.pending_state_bytes()))
    per_micro = device_batch * row_tokens
    total = args.total_batch_size or start["source_settings"].get("total_batch_size") or per_micro
    if args.total_batch_size is None and total % per_micro:
        total = per_micro
    if total % per_micro:
        raise UsageError(f"--total-batch-size {total} is not a multiple of device batch x seq len x ranks "
                         f"({device_batch} x {seq_len} x {rt.world_size} = {per_micro})")
    accum = total // per_micro

    train_set, val_set = mid_mixture(args, model)
    splits = {"train": train_set, **({"val": val_set} if val_set is not None else {})}
    corpus = ConversationCorpus(splits, tokenizer, f"midtraining mixture ({len(train_set):,} conversations)")
    if args.num_iterations is None:
        tokens = estimate_tokens(train_set, tokenizer, seed=args.seed)
        args.num_iterations = max(1, round((args.epochs or 1.0) * tokens / total))
        print0(f"the mixture holds ~{tokens:,} tokens (estimated from a sample) -> {args.num_iterations:,} steps "
               f"for {args.epochs or 1.0:g} epoch(s)")
    print0(f"midtraining: {len(train_set):,} conversations | {accum} micro-step(s) of {device_batch}x{seq_len} per "
           f"rank | {total:,} tokens per step | {args.num_iterations:,} steps")

    resume = start["resume"]
    state = resume.meta["loader_state"][rt.rank] if resume else None
    train_loader = PackedLoader(corpus, tokenizer, device_batch, seq_len, rank=rt.rank, world_size=rt.world_size,
                                device=rt.device, state=state)

    def val_loss() -> float:
        # pad_last: the val split may not fill one batch per rank (399 conversations of the shared
        # stand-in over 8 ranks of 32 x 2048 tokens did not), and an empty pass measures nothing
        val_loader = PackedLoader(corpus, tokenizer, device_batch, seq_len, split="val", rank=rt.rank,
                                  world_size=rt.world_size, device=rt.device, loop=False, pad_last=True)
        try:
            return loop.evaluate_loss(train_model, itertools.islice(iter(val_loader), args.eval_steps), rt)
        finally:
            val_loader.close()

    schedule = loop.Schedule(args.num_iterations, warmdown_ratio=args.warmdown_ratio, final_lr_frac=0.0)
    plan = stage.StepPlan(args.num_iterations, iter(train_loader), loop.accumulate_gradients, accum, total,
                          val_loss if val_set is not None else None, train_loader.state_dict, schedule)
    try:
        summary = stage.train_steps(STAGE, args, rt, start, optimizer, train_model, plan)
    finally:
        train_loader.close()
    summary.update(total_batch_size=total, training_tokens=total * args.num_iterations,
                   conversations=len(train_set), mixture=args.mixture, extra=args.extra,
                   wall_time_s=round(time.time() - started, 1), args=vars(args))
    stage.write_loss_summary(STAGE, start["tag"], "midtrain.json", summary, rt)
    return summary
