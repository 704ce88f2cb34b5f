"""`chatforge pretrain`: train a base model from the tokenized corpus; `--depth` sets its size.

    chatforge pretrain --depth 12                                  # one device
    torchrun --nproc_per_node=8 -m chatforge pretrain --depth 20   # one node, 8 GPUs
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-endpoint=HOST:29500 -m chatforge pretrain --depth 26
    chatforge pretrain --preset smoke --data notes.txt             # a depth-2 toy on CPU, ~1 minute
    chatforge pretrain --data input.txt --depth 4 --max-seq-len 256 --device-batch-size 16  # README's recipe

What happens, in order:
1. The depth dial (`model/scaling.py`) derives width, heads, learning rates, the total batch and the
   number of steps (from a tokens:params ratio); every value is printed, and every flag overrides.
   It is told the device and the train split's size (counted for a small corpus, estimated from
   its size on disk for a big one): on a CPU a step is one micro-batch, a small corpus caps the
   batch and the steps (at 4 passes), and the table says how many passes the run makes. A shape
   whose memory floor exceeds the device's free memory is refused here, before any allocation.
2. The tokenizer (the last `chatforge tokenizer train`, or `--tokenizer-name`), the corpus (`--data` or the downloaded shards) and a
   rank-sharded, BOS-aligned packed loader are opened; the model is built and initialised and the
   Muon+AdamW optimizer created (it shards itself across ranks, so there is no DDP wrapper). On CUDA
   `--device-batch-size auto` (the default) then tries real steps of the compiled model to pick the
   largest power-of-two micro-batch that fits (`train/autobatch.py`); the total batch was fixed
   before it, so only the accumulation steps change. The table is printed once that is known.
3. Each step runs `accum` micro-batches per rank so that all ranks together fill the total batch
   (`train/loop.py`), then one optimizer step under the warmup/constant/warmdown schedule.
4. Every --eval-every steps: validation bits per byte (`eval/bpb.py`); every --sample-every steps:
   greedy continuations of a few prompts; every step: loss, tokens/s, MFU, memory, ETA into the
   run's metrics.jsonl (and wandb with --wandb).
5. Every few minutes (--save-minutes, keeping the newest three), or every --save-every steps, and at
   the end: an atomic checkpoint under checkpoints/base/<tag>/ with the loader's position, RNG
   states and the optimizer shards. `--resume` continues from the latest
   complete one and, on CPU, reproduces the uninterrupted run's losses bit for bit. It appends to
   the original run's metrics.jsonl, so steps replayed after a kill appear twice: the later line wins.
6. At the end (optionally) CORE on a few items per task (--max-problems N), and
   eval/base/<tag>/pretrain.json summarises the run for the report.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from dataclasses import fields

import torch

from chatforge import paths, runtime
from chatforge.data.corpus import open_corpus
from chatforge.data.loader import PackedLoader
from chatforge.errors import DownloadError, UsageError
from chatforge.eval import core
from chatforge.eval.bpb import evaluate_bpb
from chatforge.eval.samples import greedy_samples
from chatforge.flags import add_compile_flag, add_flag
from chatforge.model import checkpoint
from chatforge.model.gpt import GPT
from chatforge.model.optim import build_optimizer
from chatforge.model.scaling import add_scaling_arguments, derive, overrides_from_args
from chatforge.model.speedups import prepare_model
from chatforge.progress import MetricsLogger, Progress, format_figure
from chatforge.runtime import add_runtime_arguments, print0
from chatforge.tokenizer import load_tokenizer, tokenizer_name
from chatforge.train import autobatch, loop, stage

STAGE = "base"

# A depth-2 model on short rows: learns visibly on two CPU cores in about a minute.
PRESETS = {
    "smoke": dict(depth=2, sequence_len=128, device_batch_size=8, total_batch_size=1024, num_iterations=300,
                  eval_every=100, eval_tokens=8192, sample_every=300, compile="off"),
}

# the vocabulary comes from the tokenizer and the world size from torchrun, never from flags; the
# derivation table credits them there, not to a flag pretrain does not have
FACT_SOURCES = {"vocab_size": "the tokenizer's vocabulary", "world_size": "ranks started by torchrun"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--depth", type=int, default=None, help="number of layers; sets everything else (default 20)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="smoke: a depth-2 model on short rows that learns on CPU in about a minute")
    add_scaling_arguments(parser, skip=(*FACT_SOURCES, "device_batch_size"))  # autobatch declares the last
    data = parser.add_argument_group("data")
    data.add_argument("--data", default=None, help="a text file, a folder of txt/jsonl/parquet, or a glob")
    data.add_argument("--corpus", default="fineweb-edu", help="downloaded corpus to read when --data is not given")
    data.add_argument("--tokenizer-name", default=None, metavar="NAME",
                      help="the tokenizer under tokenizer/NAME/ (default: the current one, the last trained)")
    data.add_argument("--epochs", type=float, default=None,
                      help="train for this many passes over the train split (counts its tokens first; "
                           "replaces --num-iterations, for corpora small enough to tokenize once up front)")
    sched = parser.add_argument_group("schedule")
    sched.add_argument("--warmup-ratio", type=float, default=0.0, help="fraction of steps of LR warmup")
    sched.add_argument("--warmdown-ratio", type=float, default=0.65, help="fraction of steps of final LR warmdown")
    sched.add_argument("--final-lr-frac", type=float, default=0.05, help="LR at the last step, as a fraction of peak")
    run = parser.add_argument_group("evaluation, checkpoints, logging")
    run.add_argument("--eval-every", type=int, default=None, help="steps between validation bpb evals (default 250)")
    run.add_argument("--eval-tokens", type=int, default=None, help="validation tokens per eval, at most one pass over the val split (default 10M)")
    run.add_argument("--sample-every", type=int, default=None, help="steps between sample generations (default 2000)")
    add_flag(run, "--max-problems", "--core-max-per-task", type=int, default=0,
             help="after the last step, CORE with at most N items per task (default 0: skip it; "
                  "`chatforge eval base` runs the full CORE)")
    add_flag(run, "--data-dir", "--eval-bundle", default=None,
             help="CORE bundle for --max-problems: its folder, or a data folder holding eval/core "
                  "(default: $CHATFORGE_EVAL_BUNDLE, else download)")
    run.add_argument("--tag", default=None, help="checkpoint tag (default d<depth>)")
    stage.add_run_arguments(run, "pretrain", save_every=None,
                            save_help="steps between checkpoints (default: every --save-minutes); the last step "
                                      "always saves",
                            seed_help="seed for initialisation",
                            resume_help="continue from the latest complete checkpoint of --tag")
    speed = parser.add_argument_group("speed")
    add_compile_flag(speed, "the model", "on; CPU always runs eager", default=None)
    speed.add_argument("--fp8", action="store_true", help="FP8 matmuls in the blocks (Hopper GPUs)")
    autobatch.add_arguments(speed, "off CUDA 32")
    add_runtime_arguments(parser)


_DEFAULTS = dict(depth=20, eval_every=250, eval_tokens=10 * 2**20, sample_every=2000,
                 compile="auto", device_batch_size=autobatch.AUTO)


def resolve_arguments(args: argparse.Namespace) -> argparse.Namespace:
    """Fill flags left unset from the preset, then from the defaults; check the ones derive() does not."""
    if args.epochs is not None and (args.epochs <= 0 or args.num_iterations is not None):
        raise UsageError("--epochs must be positive and cannot be combined with --num-iterations")
    preset = PRESETS.get(args.preset or "", {})
    if args.epochs is not None:  # the step count will come from the corpus, not from a preset
        preset = {k: v for k, v in preset.items() if k != "num_iterations"}
    for name, value in {**_DEFAULTS, **preset}.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    for name in ("depth", "eval_tokens", "keep_last"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    if args.max_problems < 0:
        raise UsageError(f"--max-problems must be 0 (skip CORE) or positive, got {args.max_problems}")
    if not 0 <= args.warmup_ratio + args.warmdown_ratio <= 1:
        raise UsageError("--warmup-ratio plus --warmdown-ratio must lie between 0 and 1")
    args.tag = paths.safe_name(args.tag or f"d{args.depth}")
    return args


def main(args: argparse.Namespace) -> dict:
    args = resolve_arguments(args)
    return stage.run_main(args, _train, f"with --depth {args.depth}, --device-batch-size {args.device_batch_size} "
                                        f"at --max-seq-len {args.sequence_len}; lower --device-batch-size "
                                        "(accumulation keeps a given --total-batch-size), --max-seq-len or --depth")


def _train(args: argparse.Namespace, rt) -> dict:
    started = time.time()
    tokenizer = run_tokenizer(args)
    token_bytes = tokenizer.token_bytes()
    corpus = open_corpus(args.data, args.corpus)
    # the run's facts that size a toy: the device, and the corpus (counted exactly for --epochs)
    facts = dict(vocab_size=tokenizer.vocab_size, world_size=rt.world_size, device=rt.device.type)
    if args.epochs is not None:
        facts["data_tokens"] = count_train_tokens(corpus, tokenizer, rt)
    else:
        facts["data_tokens"] = estimate_train_tokens(corpus, tokenizer)
    existing = stage.resume_or_refuse(STAGE, args.tag, args.resume, "step 0")
    memory_cap = autobatch.apply_memory_limit(args.memory_limit_gb, rt.device)
    overrides, search = device_batch_overrides(args, rt, existing)
    settings = derive(args.depth, **facts, given_by=FACT_SOURCES, **overrides)
    if args.epochs is not None:
        tokens = facts["data_tokens"]
        args.num_iterations = max(1, int(args.epochs * tokens) // settings.total_batch_size)
        overrides["num_iterations"] = args.num_iterations
        print0(f"--epochs {args.epochs:g}: the train split holds {tokens:,} tokens -> {args.num_iterations:,} "
               f"steps of {settings.total_batch_size:,}")
        settings = derive(args.depth, **facts, given_by=FACT_SOURCES, **overrides)
    check_fits(settings, rt, fp8=args.fp8)
    config = settings.model_config()
    num_iterations = settings.num_iterations

    # --- model and optimizer (fresh, or from the checkpoint we resume)
    start_step, loader_state, last_checkpoint, resumed_meta = 0, None, None, {}
    if existing is not None:  # weights and optimizer shard in one read
        loaded = checkpoint.load(STAGE, args.tag, existing, device=rt.device, optimizer=True, rank=rt.rank)
        checkpoint.check_config(loaded.meta, config.to_dict(), loaded.path)
        model = loaded.model.train()
        optimizer = build_optimizer(model, **settings.optimizer_kwargs())
        start_step, last_checkpoint = stage.restore(loaded, optimizer, rt, {"num_iterations": num_iterations})
        loader_state, resumed_meta = loaded.meta["loader_state"][rt.rank], loaded.meta
    else:
        with torch.device("meta"):
            model = GPT(config)
        model.to_empty(device=rt.device)
        model.init_weights()
        optimizer = build_optimizer(model, **settings.optimizer_kwargs())
    summary_path = paths.eval_dir(STAGE, args.tag, create=False) / "pretrain.json"
    if start_step >= num_iterations:
        print0(f"{args.tag} already finished its {num_iterations} steps; nothing to do (summary: {summary_path})")
        return json.loads(summary_path.read_text()) if summary_path.is_file() else {"checkpoint": last_checkpoint}
    train_model = prepare_model(model, rt, compile=args.compile != "off", fp8=args.fp8)
    if search:  # the largest micro-batch the compiled model fits, trying real steps (train/autobatch.py)
        rows_per_step = settings.total_batch_size // (config.sequence_len * rt.world_size)
        rows, why = autobatch.resolve(autobatch.AUTO, rows_per_step, rt, lambda: autobatch.training_trial(
            train_model, model, rt, config.sequence_len, config.vocab_size, optimizer.pending_state_bytes()),
            fallback=rows_per_step, cap=memory_cap)
        settings = settings.with_device_batch(rows, why)
    print0(settings.describe())
    seq_len, device_batch, accum = config.sequence_len, settings.device_batch_size, settings.grad_accum_steps
    print0(f"corpus: {corpus.description} | vocab {tokenizer.vocab_size:,} | {accum} micro-step(s) of "
           f"{device_batch}x{seq_len} per rank per step | {num_iterations:,} steps | "
           f"{num_iterations * settings.total_batch_size:,} training tokens")

    train_loader = PackedLoader(corpus, tokenizer, device_batch, seq_len, split="train", rank=rt.rank,
                                world_size=rt.world_size, device=rt.device, state=loader_state)
    batches = iter(train_loader)
    eval_steps = max(1, args.eval_tokens // (device_batch * seq_len * rt.world_size))

    def val_bpb() -> float:
        # one pass at most (loop=False): a small val split is measured once, not counted several times
        val_loader = PackedLoader(corpus, tokenizer, device_batch, seq_len, split="val", rank=rt.rank,
                                  world_size=rt.world_size, device=rt.device, loop=False, pad_last=True)
        train_model.eval()
        try:
            return evaluate_bpb(train_model, itertools.islice(iter(val_loader), eval_steps), token_bytes, rt)
        finally:
            val_loader.close()
            train_model.train()

    schedule = loop.Schedule(num_iterations, warmup_ratio=args.warmup_ratio, warmdown_ratio=args.warmdown_ratio,
                             final_lr_frac=args.final_lr_frac)
    flops_per_token = model.estimate_flops()
    throughput = loop.Throughput(settings.total_batch_size, flops_per_token, loop.peak_flops(rt.device),
                                 rt.world_size)
    # a resumed run keeps appending to its original metrics.jsonl unless --run-id says otherwise
    logger = MetricsLogger("pretrain", args=vars(args), run_id=args.run_id or resumed_meta.get("run_id"),
                           wandb_run=args.wandb)
    print0(f"parameters: {model.num_params():,} | FLOPs/token: {flops_per_token:.3e} | metrics: {logger.path}")
    settings_dict = {f.name: getattr(settings, f.name) for f in fields(settings) if f.name != "sources"}

    last_loss = resumed_meta.get("metrics", {}).get("train_loss")
    bpb_history = [tuple(point) for point in resumed_meta.get("val_bpb_history", [])]
    # the ETA leaves out the steps Throughput leaves out: compilation and warmup
    progress = Progress(num_iterations, "pretrain", unit="step", initial=start_step, warmup=throughput.skip_steps)

    def evaluate_bpb_at(step: int) -> None:
        bpb = val_bpb()
        bpb_history.append((step, bpb))
        logger.log(step, val_bpb=bpb)
        print0(f"step {step}: val bpb {bpb:.4f}")
        if step > start_step:
            progress.report()

    def show_samples(step: int) -> None:
        if not rt.is_main:
            return
        samples = greedy_samples(model, tokenizer, rt)
        print0(f"step {step}: greedy samples")
        for sample in samples:
            print0(f"  {sample['prompt']!r} -> {sample['completion']!r}")
        logger.log(step, samples=[sample["prompt"] + sample["completion"] for sample in samples])

    def save_at(step: int) -> None:
        nonlocal last_checkpoint
        last_checkpoint = stage.save(
            STAGE, args.tag, step, model, optimizer, tokenizer, args, loader_state=train_loader.state_dict(),
            metrics={"train_loss": last_loss, **({"val_bpb": bpb_history[-1][1]} if bpb_history else {})},
            extra={"num_iterations": num_iterations, "depth": args.depth, "settings": settings_dict,
                   "run_id": logger.run_id, "val_bpb_history": bpb_history, "data": corpus.description})

    def take_step(step: int) -> None:
        nonlocal last_loss
        sched = loop.apply_schedules(optimizer, step, schedule)
        last_loss, seconds = loop.optimizer_step(train_model, model, optimizer, batches, accum, rt, step,
                                                 last_checkpoint)
        throughput.record(seconds)
        logger.log(step + 1, train_loss=last_loss, lr_multiplier=sched["lr_multiplier"], **throughput.summary(),
                   eta_s=round(throughput.eta_seconds(num_iterations - step - 1)), **loop.memory_stats(rt.device))
        progress.update(1, **loop.progress_fields(last_loss, throughput))

    try:
        # --eval-every / --sample-every 0 mean never, not "at the end"
        stage.run_steps(start_step, num_iterations, take_step, save_every=args.save_every, save_at=save_at,
                        save_minutes=args.save_minutes,
                        evals=[(args.eval_every, evaluate_bpb_at, False), (args.sample_every, show_samples, False)])
    finally:
        # its threads must be gone before interpreter exit (see data/loader.py), and now, not at exit
        train_loader.close()
    progress.close()

    summary = {
        "stage": STAGE, "tag": args.tag, "depth": args.depth, "parameters": model.num_params(),
        "num_iterations": num_iterations, "total_batch_size": settings.total_batch_size,
        "training_tokens": num_iterations * settings.total_batch_size, "world_size": rt.world_size,
        "final_train_loss": last_loss,
        "final_val_bpb": bpb_history[-1][1] if bpb_history else None,
        "min_val_bpb": min(b for _, b in bpb_history) if bpb_history else None,
        "val_bpb_history": bpb_history, "core": None, "core_tasks": None,
        "flops_per_token": flops_per_token, **throughput.summary(),
        **loop.memory_stats(rt.device), "wall_time_s": round(time.time() - started, 1),
        "resumed_from_step": start_step or None, "checkpoint": last_checkpoint,
        "settings": settings_dict, "args": vars(args),
    }
    reasons = {"final_val_bpb": "--eval-every 0" if args.eval_every <= 0 else "no eval step ran in this run",
               "min_val_bpb": "--eval-every 0" if args.eval_every <= 0 else "no eval step ran in this run",
               "core": "--max-problems 0; `chatforge eval base` runs CORE"}
    # the checkpoint is saved; the summary too, before the optional CORE eval that may take long or fail
    path = stage.write_summary(STAGE, args.tag, "pretrain.json", summary, rt, reasons,
                               f"final train loss {format_figure(last_loss, 'no step ran')}, val bpb "
                               f"{format_figure(summary['final_val_bpb'], reasons['final_val_bpb'])}")
    if args.max_problems:
        try:
            core_result = final_core(args, rt, tokenizer)
        except DownloadError as exc:  # offline without a local bundle: the run stands without CORE
            reasons["core"] = f"the CORE bundle is not here and cannot be downloaded ({exc})"
            print0(f"CORE skipped: {reasons['core']}")
        else:
            logger.log(num_iterations, core=core_result["core"])
            summary.update(core=core_result["core"],
                           core_tasks={k: v["centered"] for k, v in core_result["tasks"].items()})
        stage.write_summary(STAGE, args.tag, "pretrain.json", summary, rt, reasons, "", quiet=True)
        print0(f"CORE {format_figure(summary['core'], 'skipped')}: {path} updated")
    logger.close()
    return summary


def device_batch_overrides(args: argparse.Namespace, rt, existing: int | None) -> tuple[dict, bool]:
    """derive()'s overrides with --device-batch-size auto settled as far as it can be before the model
    exists, and whether the search must still run: on CUDA the total batch is derived from one row per
    micro-step (a power-of-two number of rows, so any power of two up to it divides it) and the search
    picks the micro-batch later; a resumed run keeps its own; off CUDA the default stays."""
    overrides = overrides_from_args(args)
    if args.device_batch_size != autobatch.AUTO:
        return overrides, False
    overrides["device_batch_size"] = None  # derive's default (32) off CUDA
    if existing is not None:
        folder = checkpoint.resolve(STAGE, args.tag, existing)[2]
        overrides["device_batch_size"] = checkpoint.read_meta(folder)["settings"]["device_batch_size"]
        print0(f"--device-batch-size auto: {overrides['device_batch_size']}, the resumed run's")
        return overrides, False
    if rt.device.type != "cuda":
        return overrides, False
    overrides["device_batch_size"] = 1
    return overrides, True


def run_tokenizer(args: argparse.Namespace):
    """--tokenizer-name, else the tokenizer of the run being resumed (a tokenizer trained since does
    not change it), else the current one."""
    step = checkpoint.latest_step(STAGE, args.tag) if args.resume else None
    meta = folder = None
    if step is not None:
        folder = checkpoint.resolve(STAGE, args.tag, step)[2]
        meta = checkpoint.read_meta(folder)
    if args.tokenizer_name:
        name = tokenizer_name(args.tokenizer_name)
        if meta is not None and meta.get("tokenizer") not in (None, name):
            raise UsageError(f"--resume: base/{args.tag} was trained with tokenizer {meta['tokenizer']!r}, not "
                             f"{name!r}; drop --tokenizer-name, or pass a new --tag to start another run")
        return load_tokenizer(name=name)
    if meta is None:
        return load_tokenizer()
    return checkpoint.checkpoint_tokenizer(meta, folder)


def final_core(args: argparse.Namespace, rt, tokenizer) -> dict:
    """CORE of the final checkpoint, rebuilt without compile/FP8 (it scores prompts of every length)."""
    bundle = core.resolve_bundle(args.data_dir)
    loaded = checkpoint.load(STAGE, args.tag, device=rt.device)
    model, meta = loaded.model, loaded.meta
    with rt.autocast():
        result = core.evaluate_core(model, tokenizer, bundle, rt.device, args.max_problems,
                                    model.config.sequence_len, rank=rt.rank, world_size=rt.world_size)
    print0(f"step {meta['step']}: CORE {result['core']:.4f} over {result['num_tasks']} task(s), "
           f"at most {args.max_problems} items each")
    return result


def check_fits(settings, rt, fp8: bool = False) -> None:
    """Refuse, before anything is allocated, a shape whose memory floor exceeds what the device has free.

    Without this an absurd --depth prints its table, then spends a minute allocating before the
    allocator (or the kernel's OOM killer, which leaves no message at all) stops it.
    """

    available = runtime.available_memory(rt.device)
    if available is None:
        return
    if rt.device.type == "cpu":  # the ranks torchrun starts on one CPU host share its RAM
        available //= max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    autocast = rt.device.type == "cuda" and rt.dtype != torch.float32
    floor = settings.memory_floor(activation_bytes=(1 if fp8 else rt.dtype.itemsize) if autocast else 4)
    needed = floor["state"] + floor["activations"]
    if needed <= available:
        return
    change = ("lower --depth" if floor["state"] > available else
              "lower --device-batch-size or --max-seq-len (activations grow with both), or --depth")
    raise UsageError(
        f"--depth {settings.depth} needs at least {format_bytes(needed)} to train (weights, gradients and "
        f"optimizer state {format_bytes(floor['state'])}, activations of a {settings.device_batch_size}x"
        f"{settings.sequence_len} micro-batch {format_bytes(floor['activations'])}) but {rt.device} has "
        f"{format_bytes(available)} free; {change}")


def format_bytes(n: float) -> str:
    if n < 1024:
        return f"{n:,.0f} bytes"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024:
            return f"{n:,.1f} {unit}"
    return f"{n / 1024:,.1f} TiB"


def estimate_train_tokens(corpus, tokenizer, sample_bytes: int = 2**20) -> int | None:
    """About how many tokens one pass over the train split gives, without tokenizing a big corpus.

    A split smaller than `sample_bytes` is counted exactly (the text-file toys the estimate is for);
    a larger one is its size on disk (Corpus.approx_bytes) times the tokens per byte of its first
    `sample_bytes`. Every rank computes the same number from the same documents.
    """
    texts, size = [], 0
    for text in corpus.iter_documents("train"):
        texts.append(text)
        size += len(text.encode("utf-8"))
        if size >= sample_bytes:
            break
    else:
        return _tokens_with_bos(tokenizer, texts) or None  # None: an empty split, which the loader reports
    return max(1, round(_tokens_with_bos(tokenizer, texts) * corpus.approx_bytes("train") / size))


def _tokens_with_bos(tokenizer, texts: list[str]) -> int:
    return sum(len(ids) for ids in tokenizer.encode_batch(texts, prepend=tokenizer.bos_id)) if texts else 0


def count_train_tokens(corpus, tokenizer, rt, chunk: int = 256) -> int:
    """Tokens the loader will draw from one pass over the train split (each document plus its bos).

    Each rank counts its own documents; the packed loader crops nothing while looping, so this is
    exactly the number of targets one epoch provides (give or take the last partial batch).
    """
    import torch.distributed as dist

    total, texts = 0, []
    for text in corpus.iter_documents("train", rt.rank, rt.world_size):
        texts.append(text)
        if len(texts) == chunk:
            total += sum(len(ids) for ids in tokenizer.encode_batch(texts, prepend=tokenizer.bos_id))
            texts = []
    if texts:
        total += sum(len(ids) for ids in tokenizer.encode_batch(texts, prepend=tokenizer.bos_id))
    if rt.distributed:
        count = torch.tensor(total, dtype=torch.int64, device=rt.device)
        dist.all_reduce(count)
        total = int(count.item())
    return total
