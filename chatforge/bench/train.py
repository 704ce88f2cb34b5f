"""`chatforge bench train`: training throughput, MFU and peak memory of the real model and optimizer.

Feeds random tokens (no data loading, no tokenizer) through forward, backward and the full
MuonAdamW step, so the figure is the model+optimizer speed alone. MFU = (6 x matmul params +
attention FLOPs) per token x tokens/s per GPU, over the GPU's dense bf16 peak (989 TFLOP/s for
H100/H200 SXM): the same definition nanochat's numbers in REFERENCE.md use.

`--micro-steps N` accumulates N forward/backward passes per optimizer step, as a real run does
(`train/loop.py`); `--loss fused` measures the chunked loss of `model/fused_loss.py` against the
default plain one (full fp32 logits, which Inductor fuses under compile).

    chatforge bench train --depth 20                          # seq 2048, batch 32, vocab 32768
    chatforge bench train --depth 20 --window-pattern SSSL --fp8
    chatforge bench train --depth 2 --max-seq-len 64 --device-batch-size 2 --steps 3 --compile off   # CPU check
    chatforge bench train --depth 20 --device-batch-size auto --memory-limit-gb 24      # as on a 24 GB card
    chatforge bench train --depth 20 --micro-steps 8 --loss fused   # 524,288 tokens per step, chunked loss
    torchrun --nproc_per_node=8 -m chatforge bench train --depth 20                      # sharded optimizer
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch

from chatforge.errors import UsageError
from chatforge.flags import add_compile_flag, add_flag
from chatforge.model.gpt import GPT
from chatforge.model.optim import build_optimizer
from chatforge.model.speedups import prepare_model
from chatforge.model.scaling import derive
from chatforge.runtime import add_runtime_arguments, init_runtime, print0, shutdown
from chatforge.train import autobatch
from chatforge.train.loop import accumulate_gradients, peak_flops

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--depth", type=int, default=20, help="model depth (the scaling dial)")
    add_flag(parser, "--max-seq-len", "--seq-len", type=int, default=2048, help="tokens per row")
    add_flag(parser, "--device-batch-size", "--batch-size", dest="batch_size", type=autobatch.batch_size_arg,
             default=32, help="rows per device per step, or 'auto': the largest power of two that fits "
                              "(as pretraining picks it at this depth; train/autobatch.py)")
    autobatch.add_memory_limit_argument(parser)
    parser.add_argument("--vocab-size", type=int, default=32768)
    parser.add_argument("--head-dim", type=int, default=None, help="attention head size (default 128)")
    parser.add_argument("--n-kv-head", type=int, default=None, help="key/value heads for GQA (default: all)")
    parser.add_argument("--window-pattern", default="L", help="S/L per layer, e.g. SSSL (S = seq_len/4 window)")
    parser.add_argument("--fp8", action="store_true", help="FP8 matmuls in the blocks (sm89/sm90+ GPUs)")
    add_compile_flag(parser, "the model", "on; CPU always runs eager")
    parser.add_argument("--micro-steps", type=int, default=1,
                        help="forward/backward passes per optimizer step (gradient accumulation)")
    parser.add_argument("--loss", choices=("fused", "plain"), default="plain",
                        help="fused: chunked head + soft-cap + cross-entropy; plain: full fp32 logits")
    parser.add_argument("--loss-chunk-rows", type=int, default=None,
                        help="rows per chunk of the fused loss (default: a chunk's fp32 logits fit 256 MB)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    parser.add_argument("--profile", action="store_true",
                        help="also split a step into forward+backward and optimizer time, and list the "
                             "kernels that take the most GPU time")
    add_runtime_arguments(parser)


def main(args: argparse.Namespace) -> dict:
    if args.steps < 1 or args.warmup < 0 or args.micro_steps < 1 or (args.loss_chunk_rows or 1) < 1:
        raise UsageError("--steps, --micro-steps and --loss-chunk-rows must be at least 1 and --warmup at least 0")
    rt = init_runtime(args.device, args.dtype, seed=0)
    cap = autobatch.apply_memory_limit(args.memory_limit_gb, rt.device)
    auto = args.batch_size == autobatch.AUTO
    s = derive(args.depth, sequence_len=args.max_seq_len, vocab_size=args.vocab_size, head_dim=args.head_dim,
               n_kv_head=args.n_kv_head, window_pattern=args.window_pattern,
               device_batch_size=1 if auto else args.batch_size, world_size=rt.world_size)
    with torch.device("meta"):
        model = GPT(s.model_config())
    model.to_empty(device=rt.device)
    model.init_weights()
    model.fused_loss, model.loss_chunk_rows = args.loss == "fused", args.loss_chunk_rows
    prepare_model(model, rt, compile=args.compile != "off", fp8=args.fp8)
    optimizer = build_optimizer(model, **s.optimizer_kwargs())
    why = "given"
    if auto:  # the micro-batch pretraining would pick for this depth's total batch
        args.batch_size, why = autobatch.resolve(
            autobatch.AUTO, s.total_batch_size // (args.max_seq_len * rt.world_size), rt,
            lambda: autobatch.training_trial(model, model, rt, args.max_seq_len, s.vocab_size,
                                             optimizer.pending_state_bytes()), 32, cap)
    gen = torch.Generator(device=rt.device).manual_seed(1234 + rt.rank)
    tokens = torch.randint(0, s.vocab_size, (args.batch_size, args.max_seq_len + 1), device=rt.device, generator=gen)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    batches = itertools.repeat((inputs, targets))

    def train_step() -> torch.Tensor:
        loss = accumulate_gradients(model, batches, args.micro_steps, rt)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    print0(f"bench train: depth {s.depth}, {s.num_params / 1e6:.1f}M params, seq {args.max_seq_len}, "
           f"batch {args.batch_size} x {args.micro_steps} micro-steps ({why}), vocab {s.vocab_size}, "
           f"window {s.window_pattern}, fp8 {args.fp8}, {args.loss} loss, compile {args.compile}; "
           f"{args.warmup} warmup + {args.steps} timed steps")
    try:
        if rt.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(rt.device)
        for _ in range(args.warmup):
            train_step()
        rt.synchronize()
        rt.barrier()
        start = time.perf_counter()
        for _ in range(args.steps):
            loss = train_step()
        rt.synchronize()
        elapsed = time.perf_counter() - start
    except torch.OutOfMemoryError:
        raise UsageError(f"out of GPU memory at depth {s.depth} with --device-batch-size {args.batch_size} x "
                         f"--max-seq-len {args.max_seq_len}; lower --device-batch-size") from None

    step_time = elapsed / args.steps
    tok_per_s = args.micro_steps * args.batch_size * args.max_seq_len / step_time  # per device
    peak = peak_flops(rt.device)
    mfu = s.flops_per_token * tok_per_s / peak if peak else None
    mem = torch.cuda.max_memory_allocated(rt.device) / 2**30 if rt.device.type == "cuda" else None
    result = dict(depth=s.depth, params=s.num_params, window_pattern=s.window_pattern, fp8=args.fp8,
                  device_batch_size=args.batch_size, device_batch_reason=why, memory_limit_gib=args.memory_limit_gb,
                  compile=args.compile, loss_path=args.loss, micro_steps=args.micro_steps, tokens_per_s=tok_per_s,
                  tokens_per_s_total=tok_per_s * rt.world_size, mfu=mfu, peak_memory_gib=mem, step_time_s=step_time,
                  loss=loss.item(),
                  device=torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda" else rt.device.type)
    header = ("| depth | params | attention | fp8 | loss | micro-steps | tokens/s/device | MFU | peak memory "
              "| step time |")
    params = f"{s.num_params / 1e6:.0f}M" if s.num_params >= 1e7 else f"{s.num_params / 1e6:.2f}M"
    row = (f"| {s.depth} | {params} | {s.window_pattern} | {'yes' if args.fp8 else 'no'} | {args.loss} | "
           f"{args.micro_steps} | {tok_per_s:,.0f} | {f'{100 * mfu:.1f}%' if mfu is not None else 'n/a'} | "
           f"{f'{mem:.1f} GiB' if mem is not None else 'n/a'} | {1000 * step_time:.1f} ms |")
    print0(f"{result['device']} x{rt.world_size}, torch {torch.__version__}, dtype {str(rt.dtype).replace('torch.', '')}")
    print0(header)
    print0("|" + "---|" * 10)
    print0(row)
    if rt.world_size > 1:
        print0(f"all {rt.world_size} devices: {tok_per_s * rt.world_size:,.0f} tokens/s")
    if args.profile and rt.device.type == "cuda":
        result.update(profile_step(model, optimizer, inputs, targets, rt))
    shutdown()
    return result


def profile_step(model, optimizer, inputs, targets, rt, steps: int = 3, top: int = 20) -> dict:
    """Where a step's time goes: forward+backward vs optimizer (CUDA events), then the top kernels."""
    from torch.profiler import ProfilerActivity, profile

    fwd_bwd, opt = [], []
    for _ in range(steps):
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
        marks[0].record()
        with rt.autocast():
            loss = model(inputs, targets)
        loss.backward()
        marks[1].record()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        marks[2].record()
        torch.cuda.synchronize()
        fwd_bwd.append(marks[0].elapsed_time(marks[1]))
        opt.append(marks[1].elapsed_time(marks[2]))
    split = {"forward_backward_ms": sorted(fwd_bwd)[steps // 2], "optimizer_ms": sorted(opt)[steps // 2]}
    print0(f"step split: forward+backward {split['forward_backward_ms']:.1f} ms, "
           f"optimizer {split['optimizer_ms']:.1f} ms (median of {steps})")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with rt.autocast():
            loss = model(inputs, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
    print0(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=top, max_name_column_width=70))
    return split
