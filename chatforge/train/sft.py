"""`chatforge sft`: supervised fine-tuning on whole conversations; then a quick chat eval.

    chatforge sft                                          # latest mid checkpoint, one epoch
    chatforge sft --source base --extra me.jsonl --name Quill   # teach a base model your conversations
    chatforge sft --extra me.jsonl --max-problems 100
    torchrun --nproc_per_node=8 -m chatforge sft

Unlike midtraining, each conversation gets its own row (`data/conversations.SFTBatches`): cut to the
context, padded on the right to the longest row of the micro-batch, and trained only where the
render mask is 1 — the assistant's text, its tool calls and `<|assistant_end|>`; never bos, user
turns, tool output or padding (targets -1). Micro-batches then hold different numbers of targets,
so the step uses `loop.accumulate_masked_gradients`: the mean loss per trained token of the whole
step over all ranks, not a mean of per-micro-batch means.

The mixture is smaller and cleaner than midtraining's (nanochat's recipe): ARC-Easy and
ARC-Challenge train, GSM8K train with tool calls, 10k SmolTalk conversations, SpellingBee (other
examples than midtraining's), identity conversations (the model called --name), and `--extra` files
(twice); `--mixture extra` trains on the --extra files alone. A step is --examples-per-step
conversations (default 32), in micro-batches of --device-batch-size rows: `auto` (the default) tries
real steps of full-context rows on CUDA and keeps the largest power of two that fits
(`train/autobatch.py`); off CUDA 4. Learning rates start at 2% of the base run's and decay linearly
to zero (nanochat's SFT schedule). A small --extra file (your model's name and manner) would be lost
in that recipe, so it sizes the run instead (train/extra_plan.py: its weight, the steps, the learning
rate), and the validation loss is measured on lines held out of it.

The final checkpoint and eval/sft/<tag>/sft.json are written first; then, unless --max-problems is 0,
the checkpoint answers at most N problems of each --tasks task (eval/chat.py), into
eval/sft/<tag>/chat.json (with a few greedy replies for the report card) and sft.json. A task whose
data is neither local nor downloadable is skipped with a note. `chatforge eval chat` runs the full suite.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

from chatforge import paths
from chatforge.data.conversations import SFTBatches
from chatforge.errors import DownloadError, UsageError
from chatforge.eval import chat
from chatforge.eval.samples import chat_samples
from chatforge.flags import add_compile_flag, add_flag
from chatforge.infer.engine import Engine
from chatforge.model import checkpoint
from chatforge.model.speedups import prepare_model
from chatforge.progress import format_figure, provenance
from chatforge.runtime import print0
from chatforge.tasks import EVAL_TASKS as SUITE
from chatforge.tasks import eval_task, parse_eval_tasks
from chatforge.tasks.arc import ARC
from chatforge.tasks.base import TaskMixture
from chatforge.tasks.gsm8k import GSM8K
from chatforge.tasks.smoltalk import SmolTalk
from chatforge.tasks.spelling import SpellingBee
from chatforge.train import autobatch, extra_plan, loop, stage

STAGE = "sft"
INIT_LR_FRAC = 0.02  # nanochat's SFT: a polish of the mid model
EVAL_TASKS = ",".join(t for t in SUITE if t != "HumanEval")  # the suite less its slowest task


def add_arguments(parser: argparse.ArgumentParser) -> None:
    stage.add_stage_arguments(parser, STAGE, source="mid", init_lr_frac=None, warmdown_ratio=1.0, eval_every=100,
                              init_lr_help=f"learning rates as a fraction of the base run's (default {INIT_LR_FRAC}; "
                                           f"{extra_plan.SMALL_FILE_LR_FRAC} with a small --extra file)")
    parser.add_argument("--examples-per-step", type=int, default=32,
                        help="conversations per optimizer step over all ranks (default 32)")
    add_compile_flag(parser, "the model", "off: rows vary in length (on pads every row to --max-seq-len)")
    ev = parser.add_argument_group("chat eval of the final checkpoint")
    add_flag(ev, "--tasks", "--eval-tasks", dest="eval_tasks", default=EVAL_TASKS,
             help=f"comma-separated tasks (default {EVAL_TASKS})")
    add_flag(ev, "--max-problems", "--eval-max-problems", dest="eval_max_problems", type=int, default=100,
             help="at most N problems per task (default 100; 0 skips the eval)")
    add_flag(ev, "--max-new-tokens", "--eval-max-new-tokens", dest="eval_max_new_tokens", type=int, default=256,
             help="longest generated answer (default 256)")


def sft_mixture(args, model, extras: list, sized: bool):
    """(train mixture, validation conversations or None). `sized`: a small --extra file sizes the run
    (train/extra_plan.py): it dominates, and tasks whose data cannot be had offline are left out."""
    train_extras, val_extras = extra_plan.hold_out(extras, args.seed)
    lines = sum(len(t) for t in train_extras)
    if args.mixture == "extra":
        weight = extra_plan.extra_weight(lines, args.examples_per_step, 1.0) if sized else 1.0
        train = TaskMixture(train_extras, [weight] * len(train_extras), seed=args.seed)
        others, scale = [], 1.0
    else:
        def load(make, what):
            return extra_plan.optional(make, what) if sized else make()

        others = [load(lambda: ARC("ARC-Easy", "train", args.data_dir), "ARC-Easy train"),
                  load(lambda: ARC("ARC-Challenge", "train", args.data_dir), "ARC-Challenge train"),
                  load(lambda: GSM8K("train", args.data_dir), "GSM8K train"),
                  load(lambda: SmolTalk("train", args.data_dir, stop=10_000), "SmolTalk train"),
                  SpellingBee(size=41_000, use_tool=True, start=40_000, stop=40_300),
                  SpellingBee(size=41_000, use_tool=False, start=40_300, stop=40_600),
                  stage.identity_task(model, 500, args.seed + 1, args.name)]
        others = [t for t in others if t is not None]
        weight, scale = 2.0, 1.0
        if sized:
            weight = extra_plan.extra_weight(lines, args.examples_per_step, extra_plan.EXTRA_SHARE)
            scale = extra_plan.others_scale(weight * lines, sum(len(t) for t in others))
        train = TaskMixture(others + train_extras, [scale] * len(others) + [weight] * len(train_extras),
                            seed=args.seed)
    if sized:
        print0(f"--extra: {lines} training line(s), a small file (<= {extra_plan.SMALL_FILE}), so it sizes the "
               f"run: each seen {weight:g} times"
               + (f", {len(train) - weight * lines:,} conversations of the other tasks (x{scale:.3g}) "
                  "beside them" if others else ""))
    if val_extras:
        return train, TaskMixture(val_extras, seed=args.seed)
    if args.mixture == "extra":
        print0("no validation loss: no line of the --extra files is held out, and it is never measured on "
               "training lines")
        return train, None
    if sized:
        return train, extra_plan.optional(lambda: SmolTalk("test", args.data_dir), "validation on SmolTalk test")
    return train, SmolTalk("test", args.data_dir)


def main(args: argparse.Namespace) -> dict:
    stage.check_stage_arguments(args)
    if args.examples_per_step < 1 or args.eval_max_problems < 0 or args.eval_max_new_tokens < 1:
        raise UsageError("--examples-per-step and --max-new-tokens must be positive, --max-problems >= 0")
    if args.eval_max_problems:
        args.eval_tasks = ",".join(parse_eval_tasks(args.eval_tasks))
    return stage.run_main(args, _sft, lambda: f"with --device-batch-size {args.device_batch_size}; "
                                              "lower it (gradient accumulation keeps --examples-per-step)")


def _sft(args: argparse.Namespace, rt) -> dict:
    started = time.time()
    extras = stage.extra_tasks(args)  # read before the model: a small file sizes the run
    sized = extra_plan.is_small(extras) and args.mixture != "full"  # --mixture full: SFT's usual recipe
    args.mixture = args.mixture or "full"
    if args.init_lr_frac is None:
        args.init_lr_frac = extra_plan.SMALL_FILE_LR_FRAC if sized else INIT_LR_FRAC
    start = stage.start_model(STAGE, args, rt)
    model, config, tokenizer = start["model"], start["config"], start["tokenizer"]
    seq_len = config.sequence_len
    optimizer = stage.make_optimizer(model, start["base_lrs"], args.init_lr_frac)
    train_model = prepare_model(model, rt, compile=args.compile == "on")
    # the trial's rows are full length: the longest a conversation is cut to
    device_batch = stage.device_batch(
        args, rt, start, max(1, args.examples_per_step // rt.world_size), 4,
        lambda: autobatch.training_trial(train_model, model, rt, seq_len, config.vocab_size,
                                         optimizer.pending_state_bytes()))
    per_micro = device_batch * rt.world_size
    if args.examples_per_step % per_micro:
        raise UsageError(f"--examples-per-step {args.examples_per_step} is not a multiple of --device-batch-size x "
                         f"ranks ({device_batch} x {rt.world_size})")
    accum = args.examples_per_step // per_micro
    train_set, val_set = sft_mixture(args, model, extras, sized)
    if args.num_iterations is None:
        args.num_iterations = max(1, round((args.epochs or 1.0) * len(train_set) / args.examples_per_step))
    if sized:
        print0(f"--extra: {args.num_iterations:,} steps at learning rates x{args.init_lr_frac:g} of the base run's "
               "(a short run needs full-size steps; --num-iterations, --init-lr-frac or --mixture full "
               "override these)")
    print0(f"sft: {len(train_set):,} conversations | {accum} micro-step(s) of {device_batch} rows per rank | "
           f"{args.examples_per_step} conversations per step | {args.num_iterations:,} steps")

    resume = start["resume"]
    pad_to = seq_len if args.compile == "on" else None
    batches = SFTBatches(train_set, tokenizer, device_batch, seq_len, rt.rank, rt.world_size, rt.device,
                         state=resume.meta["loader_state"][rt.rank] if resume else None, pad_to=pad_to)

    def val_loss() -> float:
        val = SFTBatches(val_set, tokenizer, device_batch, seq_len, rt.rank, rt.world_size, rt.device, pad_to=pad_to)
        steps = min(args.eval_steps, -(-val.per_rank // device_batch))  # at most one pass
        return loop.evaluate_loss(train_model, itertools.islice(val, steps), rt)

    schedule = loop.Schedule(args.num_iterations, warmdown_ratio=args.warmdown_ratio, final_lr_frac=0.0)
    plan = stage.StepPlan(args.num_iterations, batches, loop.accumulate_masked_gradients, accum, None,
                          val_loss if val_set is not None else None, batches.state_dict, schedule)
    summary = stage.train_steps(STAGE, args, rt, start, optimizer, train_model, plan)
    summary.update(examples_per_step=args.examples_per_step, conversations=len(train_set), mixture=args.mixture,
                   extra=args.extra, epochs_done=round(batches.epoch, 3))
    summary.update(chat_eval=None, wall_time_s=round(time.time() - started, 1), args=vars(args))
    # the checkpoint is saved; the summary too, before the optional eval that may take long or fail
    path = stage.write_loss_summary(STAGE, start["tag"], "sft.json", summary, rt)
    if args.eval_max_problems:
        summary["chat_eval"] = final_chat_eval(args, rt, tokenizer, start["tag"])
        stage.write_loss_summary(STAGE, start["tag"], "sft.json", summary, rt, quiet=True)
        print0(f"chat eval added to {path}")
    return summary


def final_chat_eval(args, rt, tokenizer, tag: str) -> dict:
    """The chat tasks on the final checkpoint (rebuilt plain: no compile), into eval/sft/<tag>/chat.json."""
    loaded = checkpoint.load(STAGE, tag, device=rt.device)
    model, meta = loaded.model, loaded.meta
    engine = Engine(model, tokenizer, rt.device, rt.dtype)
    results, skipped = {}, {}
    for name in args.eval_tasks.split(","):
        try:
            task = eval_task(name, args.data_dir)
        except DownloadError as exc:  # offline, and not in --data-dir: the run stands without this score
            skipped[name] = f"its data is not here and cannot be downloaded ({exc})"
            print0(f"{name}: skipped, {skipped[name]}")
            continue
        results[name] = chat.evaluate_task(model, tokenizer, task, rt, engine, args.eval_max_problems,
                                           max_new_tokens=args.eval_max_new_tokens,
                                           max_seq_len=model.config.sequence_len)
        r = results[name]
        print0(f"{name}: {r['accuracy']:.4f} ({r['num_correct']}/{r['num_problems']})")
    score = chat.chatcore(results) if results else None
    note = (f"ChatCORE over {len(results)} task(s) with at most {args.eval_max_problems} problems each"
            + (f", without {', '.join(skipped)} (data unavailable)" if skipped else "")
            + "; `chatforge eval chat` runs the standard suite")
    print0(f"ChatCORE {format_figure(score, 'no task could run')} ({note})")
    payload = {"chatcore": score, "note": note, "tasks": results, "skipped": skipped, "source": STAGE, "tag": tag,
               "step": meta["step"], "args": vars(args), **provenance()}
    if rt.is_main:  # a few replies for the report card, as `chatforge eval chat` records them
        payload["samples"] = chat_samples(engine)
        paths.atomic_write_text(paths.eval_dir(STAGE, tag) / "chat.json", json.dumps(payload, indent=2, default=str))
    return {"chatcore": score, "note": note, "tasks": results, "skipped": skipped}
