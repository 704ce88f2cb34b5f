"""`chatforge eval chat`: the chat task suite on a mid/sft/rl checkpoint, and ChatCORE.

    chatforge eval chat --source sft                        # all tasks
    chatforge eval chat --source sft -a ARC-Easy,GSM8K --max-problems 100
    chatforge eval chat --data-dir DIR                      # task files from your data folder
    torchrun --nproc_per_node=8 -m chatforge eval chat --source rl -a GSM8K

Tasks: ARC-Easy, ARC-Challenge, MMLU (categorical: the answer letter with the highest logit),
GSM8K, HumanEval, SpellingBee (generative: sample, run tools, check). Prints each task's accuracy
and ChatCORE (mean accuracy centered by random guessing; over fewer than all six tasks it says so),
then the model's greedy replies to four fixed questions (one batched call, at most 64 tokens each, the
report card shows them), and writes all of it to <base>/eval/<source>/<tag>/chat.json.
"""

from __future__ import annotations

import argparse

from chatforge.errors import UsageError
from chatforge.eval import chat
from chatforge.eval.base_stage import (
    add_checkpoint_arguments,
    load_for_eval,
    write_result,
)
from chatforge.eval.samples import chat_samples
from chatforge.infer.engine import Engine
from chatforge.progress import provenance
from chatforge.runtime import add_runtime_arguments, init_runtime, print0
from chatforge.tasks import EVAL_TASKS, eval_task, parse_eval_tasks


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_checkpoint_arguments(parser, "sft")
    parser.add_argument("-a", "--tasks", default=",".join(EVAL_TASKS),
                        help=f"comma-separated tasks (default all: {','.join(EVAL_TASKS)})")
    parser.add_argument("--max-problems", type=int, default=None, help="at most N problems per task")
    parser.add_argument("--num-samples", type=int, default=1, help="samples per generative problem (pass@k)")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0 = greedy)")
    parser.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="longest generated answer")
    parser.add_argument("--batch-size", type=int, default=8, help="problems per forward / generate call")
    parser.add_argument("--data-dir", default=None,
                        help="local folder with the task files (shared-copy or hub layout); default "
                             "$CHATFORGE_DATA_DIR, else download from the Hugging Face hub (or the mirror in "
                             "$CHATFORGE_HUB_URL)")
    add_runtime_arguments(parser)


def main(args) -> int:
    names = parse_eval_tasks(args.tasks)
    for flag, value in (("--max-problems", args.max_problems), ("--num-samples", args.num_samples),
                        ("--max-new-tokens", args.max_new_tokens), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be at least 1, got {value}")
    if args.temperature < 0:
        raise UsageError(f"--temperature must be >= 0, got {args.temperature}")
    runtime = init_runtime(args.device, args.dtype)
    model, tokenizer, tag, step = load_for_eval(args, runtime)
    engine = Engine(model, tokenizer, runtime.device, runtime.dtype)
    results = {}
    for name in names:
        task = eval_task(name, args.data_dir)
        results[name] = chat.evaluate_task(
            model, tokenizer, task, runtime, engine, args.max_problems, args.num_samples, args.max_new_tokens,
            args.temperature, args.top_k, args.batch_size, model.config.sequence_len)
        r = results[name]
        print0(f"{name}: {r['accuracy']:.4f} ({r['num_correct']}/{r['num_problems']})")
    score = chat.chatcore(results)
    note = None
    if set(results) != set(EVAL_TASKS) or args.max_problems is not None:
        note = (f"ChatCORE here is over {len(results)} task(s)"
                + (f" with at most {args.max_problems} problems each" if args.max_problems else "")
                + "; the standard ChatCORE runs all six tasks in full")
    print0(f"{'task':<15} {'problems':>8} {'accuracy':>9} {'centered':>9}")
    for name, r in results.items():
        print0(f"{name:<15} {r['num_problems']:>8} {r['accuracy']:>9.4f} {r['centered']:>9.4f}")
    print0(f"{'ChatCORE':<15} {'':>8} {'':>9} {score:>9.4f}")
    if note:
        print0(note)
    if runtime.is_main:
        samples = chat_samples(engine)
        for s in samples:
            print0(f"{s['prompt']!r} -> {s['reply']!r}")
        write_result(args.source, tag, "chat.json",
                     {"chatcore": score, "note": note, "tasks": results, "samples": samples, "source": args.source,
                      "tag": tag, "step": step, "args": vars(args), **provenance()})
    return 0
