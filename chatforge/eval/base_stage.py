"""`chatforge eval base`: CORE, train/val bits per byte and a few greedy samples of a base model.

    chatforge eval base                                   # latest base checkpoint, every CORE task
    chatforge eval base --max-problems 100 --data-dir DIR    # DIR/eval/core: a local CORE bundle
    torchrun --nproc_per_node=8 -m chatforge eval base    # items and batches split over 8 GPUs

Writes, under <base>/eval/<source>/<tag>/: core.json (per-task accuracy, centered accuracy, CORE,
skipped tasks), bpb.json (train and val bits per byte), samples.json (greedy continuations), each
with the checkpoint step and the run's provenance; prints a table of the CORE tasks.

Bits per byte needs a pretraining corpus. Without --data and without downloaded shards (a machine
that has only the CORE bundle) it is skipped, and said so at the start and in the closing line, in
bpb.json too; CORE and the samples still run. A --data that does not hold a corpus is an error.
"""

from __future__ import annotations

import argparse
import json

from chatforge import paths
from chatforge.errors import DataError, UsageError
from chatforge.eval import core
from chatforge.eval.samples import greedy_samples
from chatforge.model import checkpoint
from chatforge.progress import Progress, provenance
from chatforge.runtime import add_runtime_arguments, init_runtime, print0


def add_checkpoint_arguments(parser: argparse.ArgumentParser, default_source: str) -> None:
    parser.add_argument("--source", default=default_source, choices=("base", "mid", "sft", "rl"),
                        help=f"which stage's checkpoint to evaluate (default {default_source})")
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: the most recently written)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_checkpoint_arguments(parser, "base")
    core.add_core_arguments(parser)
    parser.add_argument("--data", default=None,
                        help="corpus for bits per byte (text file, folder or glob; default the downloaded shards)")
    parser.add_argument("--corpus", default="fineweb-edu", help="downloaded corpus to use when --data is not given")
    parser.add_argument("--eval-tokens", type=int, default=20 * 524288,
                        help="tokens per split for bits per byte (default 20 x 524,288, as nanochat)")
    parser.add_argument("--device-batch-size", type=int, default=None,
                        help="rows per forward for bits per byte (default: the checkpoint's training batch, so "
                             "val bpb equals what pretraining reported; else 32)")
    parser.add_argument("--skip", default="",
                        help="comma-separated parts to leave out: core, bpb, samples")
    add_runtime_arguments(parser)


def load_for_eval(args, runtime):
    """(model, tokenizer, tag, step) of the checkpoint the flags name; a --device-batch-size left out
    becomes the one the checkpoint trained with."""
    loaded = checkpoint.load(args.source, args.tag, args.step, device=runtime.device)
    if getattr(args, "device_batch_size", 0) is None:
        args.device_batch_size = (loaded.meta.get("settings") or {}).get("device_batch_size") or 32
    return loaded.model, loaded.tokenizer, loaded.tag, loaded.step


def write_result(source: str, tag: str, name: str, payload: dict) -> None:
    path = paths.eval_dir(source, tag) / name
    paths.atomic_write_text(path, json.dumps(payload, indent=2, default=str) + "\n")
    print0(f"wrote {path}")


def bpb_corpus(args):
    """(corpus, None), or (None, why) when no --data was given and no downloaded shards are there."""
    from chatforge.data.corpus import open_corpus

    if args.data is not None:  # asked for by name: a bad path is the user's to fix, not to skip
        return open_corpus(args.data, args.corpus), None
    try:
        return open_corpus(None, args.corpus), None
    except DataError as exc:
        return None, f"no pretraining corpus: {exc}"


def bits_per_byte(model, tokenizer, runtime, args, corpus) -> dict:
    from chatforge.data.loader import PackedLoader
    from chatforge.eval.bpb import evaluate_bpb

    seq_len = model.config.sequence_len
    per_step = args.device_batch_size * seq_len * runtime.world_size
    steps = max(1, args.eval_tokens // per_step)
    result = {"eval_tokens": steps * per_step, "seq_len": seq_len, "device_batch_size": args.device_batch_size}
    for split in ("train", "val"):
        # the val split is read once at most, padded like pretraining's evals: the same tokens, the same
        # rows, so the same bits per byte as `chatforge pretrain` printed for this checkpoint and data
        with PackedLoader(corpus, tokenizer, args.device_batch_size, seq_len, split=split, rank=runtime.rank,
                          world_size=runtime.world_size, device=runtime.device, loop=split == "train",
                          pad_last=split == "val") as loader:
            bar = Progress(steps, f"{split} bits per byte", unit="batch")

            def counted(batches):
                for _, batch in zip(range(steps), batches):
                    yield batch
                    bar.update(1)
            result[f"{split}_bpb"] = evaluate_bpb(model, counted(loader), tokenizer.token_bytes(), runtime)
            bar.close()
        print0(f"{split} bits per byte: {result[f'{split}_bpb']:.4f}")
    return result


def parse_skip(value: str) -> set[str]:
    parts = {p.strip() for p in value.split(",") if p.strip()}
    unknown = parts - {"core", "bpb", "samples"}
    if unknown:
        raise UsageError(f"--skip {', '.join(sorted(unknown))} is not a part; choose from core, bpb, samples")
    return parts


def print_core_table(result: dict) -> None:
    print0(f"{'task':<34} {'items':>6} {'accuracy':>9} {'centered':>9}")
    for label, r in result["tasks"].items():
        print0(f"{label:<34} {r['num_items']:>6} {r['accuracy']:>9.4f} {r['centered']:>9.4f}")
    print0(f"{'CORE':<34} {'':>6} {'':>9} {result['core']:>9.4f}  ({result['num_tasks']} tasks)")
    if result["skipped_tasks"]:
        print0(f"skipped (no file in the bundle): {', '.join(result['skipped_tasks'])}")
    if result["note"]:
        print0(result["note"])


def main(args) -> int:
    skip = parse_skip(args.skip)
    if args.max_problems is not None and args.max_problems < 1:
        raise UsageError("--max-problems must be at least 1")
    runtime = init_runtime(args.device, args.dtype)
    model, tokenizer, tag, step = load_for_eval(args, runtime)
    common = {"source": args.source, "tag": tag, "step": step, "args": vars(args), **provenance()}
    corpus, no_bpb = bpb_corpus(args) if "bpb" not in skip else (None, None)
    if no_bpb:
        print0(f"bits per byte: skipped ({no_bpb}); CORE and samples still run")
    core_result = None
    if "core" not in skip:
        bundle = core.resolve_bundle(args.data_dir)
        labels = [s.strip() for s in args.tasks.split(",")] if args.tasks else None
        with runtime.autocast():
            result = core.evaluate_core(model, tokenizer, bundle, runtime.device, args.max_problems,
                                        model.config.sequence_len, args.batch_tokens, runtime.rank,
                                        runtime.world_size, labels)
        print_core_table(result)
        core_result = result
        if runtime.is_main:
            write_result(args.source, tag, "core.json", {**result, **common})
    if corpus is not None:
        result = bits_per_byte(model, tokenizer, runtime, args, corpus)
        if runtime.is_main:
            write_result(args.source, tag, "bpb.json", {**result, **common})
    elif no_bpb and runtime.is_main:
        write_result(args.source, tag, "bpb.json", {"train_bpb": None, "val_bpb": None,
                                                    "not_measured": {"train_bpb": no_bpb, "val_bpb": no_bpb},
                                                    **common})
    if "samples" not in skip and runtime.is_main:
        samples = greedy_samples(model, tokenizer, runtime)
        for s in samples:
            print0(f"{s['prompt']!r} -> {s['completion']!r}")
        write_result(args.source, tag, "samples.json", {"samples": samples, **common})
    if core_result is not None:
        print0(f"eval base: CORE {core_result['core']:.4f} over {core_result['num_tasks']} task(s)"
               + (f"; bits per byte not measured ({no_bpb})" if no_bpb else ""))
    return 0
