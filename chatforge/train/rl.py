"""`chatforge rl`: reinforcement learning on GSM8K with a simplified GRPO (on-policy policy gradient).

    chatforge rl                                       # from the latest sft checkpoint, one device
    torchrun --nproc_per_node=8 -m chatforge rl        # 8 GPUs: the ranks split each step's questions
    chatforge rl --num-iterations 20 --eval-every 10 --examples-per-step 4 --num-samples 8   # a quick look

Each step:
1. Questions. The training split is walked in a shuffled order (a fresh permutation each epoch,
   seeded by --seed); step s takes questions s*E ... s*E+E-1 of that stream (E = --examples-per-step,
   over all ranks; rank r takes every W-th of them). The position in the stream is therefore a
   function of the step, which is what makes --resume land on the same next batch of questions.
2. Rollouts. For each question the inference engine samples k = --num-samples replies with the
   python tool on (temperature, top-k as given). Tokens the engine forced in (tool outputs) are
   marked as not sampled.
3. Rewards. The task's reward function (`train/rewards.py`; GSM8K: 1 for the right final answer,
   else 0) scores each decoded reply.
4. Advantages. Within each question's group of k replies: advantage = reward - mean reward of the
   group. That is the group-relative baseline of GRPO (Shao et al. 2024) without a critic. Choices,
   as in nanochat's simplified variant:
   - no division by the group's standard deviation. Dividing makes a question where 1 of 16 replies
     is right push as hard as one where 8 are, and blows up tiny differences in near-uniform groups;
     the mean baseline alone is unbiased, and the "Dr. GRPO" analysis (Liu et al. 2025) shows the std
     term is one of the biases in GRPO's objective;
   - no KL penalty to a reference model and no ratio clipping: one gradient step per batch of fresh
     samples (strictly on-policy), so the importance ratio is 1 and there is nothing to clip;
   - groups where every reply got the same reward have zero advantage and contribute nothing; their
     rows are skipped in the training forward (the gradient is unchanged).
5. Loss. One training forward over prompt + reply, padded into micro-batches of
   --device-batch-size rows: loss = -sum(advantage * log p(sampled token)) / (number of sampled
   tokens over all ranks). Prompt tokens and forced tool-output tokens are masked out; log p is under
   the model's own distribution (temperature 1, no top-k). Dividing by the global count of sampled
   tokens (each rank divides by count/W; the optimizer averages over the W ranks) weights every
   sampled token alike, however the rows are split over ranks and micro-batches.
6. Update. Muon + AdamW, freshly created, at --init-lr-frac of the depth dial's learning rates,
   decaying linearly to zero over the run.

Every --eval-every steps (and at the end): pass@1..k (`eval/passk.py`, the unbiased estimator) on the
first --max-problems questions of the test split, k from --pass-k. Every step a line with the mean
reward and samples/s (all ranks' sampled replies per second of the whole step, rollout + update),
the tool calls the rollouts made and the share of rollout time in which every row waited on one,
plus a metrics.jsonl record. Checkpoints go to checkpoints/rl/<tag>/ every few minutes (or --save-every
steps) and at the end (with the stream position); --resume continues the latest one, with the batch
sizes the run settled on (recorded in its checkpoint; no search again). The summary is
eval/rl/<tag>/rl.json.

On CUDA the rollouts use a copy of the weights in the compute dtype (bf16), refreshed after every
update: decoding reads all weights once per token, so half the bytes is nearly twice the speed.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time

import torch

from chatforge import paths
from chatforge.conversation import render_for_completion
from chatforge.errors import UsageError
from chatforge.eval import passk
from chatforge.flags import add_flag
from chatforge.infer.engine import Engine
from chatforge.infer.reply import response_text
from chatforge.model import checkpoint
from chatforge.model.optim import build_optimizer
from chatforge.progress import MetricsLogger, Progress, format_duration, provenance
from chatforge.runtime import add_runtime_arguments, print0
from chatforge.train import autobatch, loop, rewards, stage

STAGE = "rl"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_argument_group("source")
    stage.add_source_arguments(src, "sft", STAGE)
    src.add_argument("--task", default="gsm8k", help="reward task from train/rewards.py (default gsm8k)")
    src.add_argument("--data-dir", default=None, help="local copy of the task data (default: download)")
    roll = parser.add_argument_group("rollouts")
    roll.add_argument("--examples-per-step", type=int, default=16, help="questions per step over all ranks")
    roll.add_argument("--num-samples", type=int, default=16, help="replies sampled per question (the group)")
    roll.add_argument("--max-new-tokens", type=int, default=256, help="longest reply sampled")
    roll.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    roll.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens (0: all)")
    roll.add_argument("--rollout-batch-size", type=autobatch.batch_size_arg, default=autobatch.AUTO,
                      help="replies generated together per engine call (whole groups), or 'auto' (default): on "
                           "CUDA the most whole groups that fit, found by trying a real rollout; off CUDA 256")
    opt = parser.add_argument_group("optimization")
    opt.add_argument("--num-iterations", type=int, default=None, help="number of steps (default: from --epochs)")
    opt.add_argument("--epochs", type=float, default=None, help="passes over the training questions (default 1)")
    opt.add_argument("--device-batch-size", type=autobatch.batch_size_arg, default=autobatch.AUTO,
                     help="rows per training forward/backward, or 'auto' (default): on CUDA the largest power of "
                          "two that fits the longest row, found by trying real steps; off CUDA 32")
    autobatch.add_memory_limit_argument(opt)
    opt.add_argument("--init-lr-frac", type=float, default=0.05,
                     help="learning rates as a fraction of the depth dial's (default 0.05, as nanochat)")
    run = parser.add_argument_group("evaluation, checkpoints, logging")
    run.add_argument("--eval-every", type=int, default=60, help="steps between pass@k evaluations (0: only at the end)")
    add_flag(run, "--max-problems", "--eval-examples", type=int, default=400,
             help="test questions per pass@k evaluation (default 400)")
    run.add_argument("--pass-k", default=None, help="comma-separated k values (default 1,...,--num-samples)")
    stage.add_run_arguments(run, "rl", save_help="steps between checkpoints (default: every --save-minutes; the last "
                                                 "step always saves)",
                            seed_help="seed for the question order and the samples",
                            resume_help="continue from the latest rl checkpoint of --tag")
    add_runtime_arguments(parser)


def check_arguments(args: argparse.Namespace, world_size: int) -> list[int]:
    """Reject inconsistent flags; returns the pass@k values to report."""
    positive = ("examples_per_step", "num_samples", "max_new_tokens", "max_problems")
    for name in positive + ("num_iterations",):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    if args.num_iterations is not None and args.epochs is not None:
        raise UsageError("give --num-iterations or --epochs, not both")
    if args.epochs is not None and args.epochs <= 0:
        raise UsageError(f"--epochs must be positive, got {args.epochs}")
    if args.examples_per_step % world_size:
        raise UsageError(f"--examples-per-step {args.examples_per_step} must be a multiple of the number of ranks "
                         f"({world_size}) so every rank gets the same number of questions")
    if args.temperature <= 0:
        raise UsageError(f"--temperature {args.temperature} must be positive: RL needs varied samples")
    if args.top_k < 0:
        raise UsageError(f"--top-k {args.top_k} must be >= 0 (0 keeps every token)")
    if not (0 < args.init_lr_frac and math.isfinite(args.init_lr_frac)):
        raise UsageError(f"--init-lr-frac {args.init_lr_frac} must be a positive number")
    try:
        ks = sorted({int(k) for k in args.pass_k.split(",")}) if args.pass_k else list(range(1, args.num_samples + 1))
    except ValueError:
        raise UsageError(f"--pass-k {args.pass_k!r} must be comma-separated integers, e.g. 1,2,4,8") from None
    if ks[0] < 1:
        raise UsageError(f"--pass-k values must be at least 1, got {args.pass_k!r}")
    return ks


# ---------------------------------------------------------------------------------------------
# The pieces of one step (small functions, tested against hand computations)

def step_questions(step: int, examples_per_step: int, num_questions: int, seed: int, rank: int = 0,
                   world_size: int = 1) -> list[int]:
    """Indices of the training questions rank `rank` works on at `step`.

    The stream is epoch after epoch of a shuffled order; position p is question
    order(p // N)[p % N]. Step s covers positions s*E ... s*E+E-1 and rank r takes every W-th one.
    """
    out, orders = [], {}
    for p in range(step * examples_per_step + rank, (step + 1) * examples_per_step, world_size):
        epoch, i = divmod(p, num_questions)
        if epoch not in orders:
            order = list(range(num_questions))
            random.Random(seed * 1_000_003 + epoch).shuffle(order)
            orders[epoch] = order
        out.append(orders[epoch][i])
    return out


def group_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """(Q, k) rewards -> (Q, k) advantages: each reward minus the mean of its question's group."""
    return rewards - rewards.mean(dim=1, keepdim=True)


def training_rows(prompts: list[list[int]], results, num_samples: int, max_len: int | None = None
                  ) -> list[tuple[list[int], list[int]]]:
    """Per generated row (prompt-major): (prompt + reply ids, mask of the reply tokens to train on).

    The mask is 1 exactly for tokens the model sampled; the prompt and forced tool output are 0.
    """
    rows = []
    for r, result in enumerate(results):
        prompt = prompts[r // num_samples]
        ids = list(prompt) + list(result.tokens)
        mask = [0] * len(prompt) + list(result.sampled_mask)
        if max_len is not None:
            ids, mask = ids[:max_len], mask[:max_len]
        rows.append((ids, mask))
    return rows


def pad_batch(rows: list[tuple[list[int], list[int]]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets), both (B, T-1) int64: next-token pairs with targets -1 wherever mask is 0."""
    width = max(len(ids) for ids, _ in rows) - 1
    inputs = torch.full((len(rows), width), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), width), -1, dtype=torch.long)
    for b, (ids, mask) in enumerate(rows):
        ids_t = torch.tensor(ids, dtype=torch.long)
        keep = torch.tensor(mask[1:], dtype=torch.bool)
        n = len(ids) - 1
        inputs[b, :n] = ids_t[:-1]
        targets[b, :n] = torch.where(keep, ids_t[1:], torch.full_like(ids_t[1:], -1))
    return inputs.to(device), targets.to(device)


def policy_gradient_loss(model, inputs: torch.Tensor, targets: torch.Tensor, advantages: torch.Tensor,
                         normalizer: float) -> torch.Tensor:
    """-sum(advantage_row * log p(target)) over the counted targets, divided by `normalizer`.

    `model(inputs, targets, loss_reduction="none")` is -log p per position (0 where target is -1).
    """
    nll = model(inputs, targets, loss_reduction="none")  # (B, T)
    return (nll * advantages.to(nll.dtype)[:, None]).sum() / normalizer


def base_learning_rates(config) -> dict:
    """The depth dial's optimizer settings for this model shape, at the dial's reference batch."""
    from chatforge.model.scaling import REFERENCE_BATCH, derive

    seq = config.sequence_len
    settings = derive(config.n_layer, n_embd=config.n_embd, n_head=config.n_head, n_kv_head=config.n_kv_head,
                      sequence_len=seq, vocab_size=config.vocab_size, window_pattern=config.window_pattern,
                      device_batch_size=1, world_size=1, total_batch_size=seq * max(1, round(REFERENCE_BATCH / seq)),
                      num_iterations=1)
    return settings.optimizer_kwargs()


def auto_batches(args, rt, model, rollout_model, tokenizer, optimizer, prompts: list[list[int]]) -> None:
    """Settle --device-batch-size and --rollout-batch-size "auto" (train/autobatch.py). Both are tried at
    the worst case: the longest training prompt plus --max-new-tokens. The update's micro-batch is a
    power of two up to the rows a rank trains per step; the rollout batch is whole groups, a power of
    two of questions up to a rank's share of a step. Off CUDA: 32 and 256 as before. A resumed run has
    already replaced auto with its own sizes (stage.keep_resumed_batches)."""
    cap = autobatch.apply_memory_limit(args.memory_limit_gb, rt.device)
    k, per_rank = args.num_samples, args.examples_per_step // rt.world_size
    longest = max(prompts, key=len) if prompts else []
    row_len = min(len(longest) + args.max_new_tokens, model.config.sequence_len)
    reserve = optimizer.pending_state_bytes()

    def rollout_trial(questions: int) -> int:  # a fresh engine: an out-of-memory one is simply dropped
        return autobatch.measure(lambda: Engine(rollout_model, tokenizer).generate_batch(
            [longest] * questions, num_samples=k, max_tokens=args.max_new_tokens, temperature=args.temperature,
            top_k=args.top_k or None, seed=0), rt, reserve)

    model.train()
    args.device_batch_size, _ = autobatch.resolve(
        args.device_batch_size, per_rank * k, rt, lambda: autobatch.training_trial(
            model, model, rt, row_len - 1, model.config.vocab_size, reserve), 32, cap, "rl update micro-batch")
    if args.rollout_batch_size == autobatch.AUTO:
        questions, _ = autobatch.resolve(autobatch.AUTO, per_rank, rt, lambda: rollout_trial, max(1, 256 // k), cap,
                                         f"rl rollout questions per engine call (x{k} samples)")
        args.rollout_batch_size = questions * k if rt.device.type == "cuda" else 256


def _rollout_model(model, rt):
    """The model the engine samples from: the training model itself, or a compute-dtype copy on CUDA."""
    if rt.device.type != "cuda" or rt.dtype == torch.float32:
        return model
    import copy

    twin = copy.deepcopy(model)
    for p in twin.parameters():
        p.requires_grad_(False)
        p.data = p.data.to(rt.dtype)
    return twin.eval()


@torch.no_grad()
def _refresh_rollout_model(twin, model) -> None:
    if twin is model:
        return
    for dst, src in zip(twin.parameters(), model.parameters()):
        dst.copy_(src)  # in place: a captured CUDA graph keeps reading the same storage


# ---------------------------------------------------------------------------------------------
# The stage

def main(args: argparse.Namespace) -> dict:
    return stage.run_main(args, _train, lambda: f"with --rollout-batch-size {args.rollout_batch_size} and "
                                                f"--device-batch-size {args.device_batch_size}; lower them (the "
                                                "update is the same, only split finer)")


def _train(args: argparse.Namespace, rt) -> dict:

    started = time.time()
    ks = check_arguments(args, rt.world_size)
    reward_task = rewards.get(args.task)
    source_tag, source_step, _ = stage.pick_source(STAGE, args)
    tag = args.tag
    existing = stage.resume_or_refuse(STAGE, tag, args.resume, f"{args.source}/{source_tag}")
    resuming = existing is not None
    if resuming:  # the weights and this rank's optimizer shard in one read
        loaded = checkpoint.load(STAGE, tag, existing, device=rt.device, optimizer=True, rank=rt.rank)
    else:
        loaded = checkpoint.load(args.source, source_tag, source_step, device=rt.device)
    model, meta, tokenizer = loaded.model, loaded.meta, loaded.tokenizer
    config = model.config
    if args.max_new_tokens >= config.sequence_len:
        raise UsageError(f"--max-new-tokens {args.max_new_tokens} leaves no room for the question in the model's "
                         f"context of {config.sequence_len} tokens; lower it")

    train_set = reward_task.train(args.data_dir)
    test_set = reward_task.test(args.data_dir)
    num_questions = len(train_set)
    if num_questions == 0:
        raise UsageError(f"--task {args.task}: the training split is empty")
    E, k, W = args.examples_per_step, args.num_samples, rt.world_size
    num_iterations = args.num_iterations or max(1, int((args.epochs or 1.0) * num_questions) // E)

    lrs = base_learning_rates(config)
    lrs = {name: (value * args.init_lr_frac if name.endswith("_lr") else value) for name, value in lrs.items()}
    optimizer = build_optimizer(model, **lrs)
    start_step, last_checkpoint, eval_history, reward_history = 0, None, [], []
    if resuming:
        start_step, last_checkpoint = stage.restore(loaded, optimizer, rt, {
            "num_iterations": num_iterations, "examples_per_step": E, "num_samples": k, "seed": args.seed})
        eval_history = meta.get("eval_history", [])
        reward_history = meta.get("reward_history", [])
        source_info = meta.get("source", {})
    else:
        source_info = {"stage": args.source, "tag": meta.get("tag"), "step": meta.get("step"), "path": meta.get("path")}
    summary_path = paths.eval_dir(STAGE, tag, create=False) / "rl.json"
    if start_step >= num_iterations:
        print0(f"{tag} already finished its {num_iterations} steps; nothing to do (summary: {summary_path})")
        return json.loads(summary_path.read_text()) if summary_path.is_file() else {"checkpoint": last_checkpoint}

    print0(f"rl from {source_info.get('path')} | task {args.task}: {num_questions:,} training questions, "
           f"{len(test_set):,} test | {num_iterations:,} steps of {E} questions x {k} samples "
           f"({E // W} question(s) per rank) | learning rates x{args.init_lr_frac:g}: "
           + ", ".join(f"{n} {v:.3g}" for n, v in lrs.items() if n.endswith("_lr")))
    rollout_model = _rollout_model(model, rt)
    top_k = args.top_k or None
    pad_id = tokenizer.special_id("<|assistant_end|>")
    prompt_room = config.sequence_len - args.max_new_tokens  # a longer prompt keeps its last tokens

    def prompt_of(conversation) -> list[int]:
        ids = render_for_completion(tokenizer, conversation)
        return ids[-prompt_room:]

    if resuming:
        stage.keep_resumed_batches(args, meta, "device_batch_size", "rollout_batch_size")
    searching = rt.device.type == "cuda" and autobatch.AUTO in (args.device_batch_size, args.rollout_batch_size)
    auto_batches(args, rt, model, rollout_model, tokenizer, optimizer,
                 [prompt_of(train_set[i]) for i in range(num_questions)] if searching else [])
    engine = Engine(rollout_model, tokenizer)
    questions_per_call = max(1, args.rollout_batch_size // k)

    def evaluate(step: int) -> dict:
        n = max(ks)
        mine = [test_set[i] for i in range(rt.rank, min(args.max_problems, len(test_set)), W)]
        model.eval()
        correct = passk.count_correct(engine, tokenizer, mine, reward_task.reward, n, args.max_new_tokens,
                                      args.temperature, top_k, batch_size=max(1, args.rollout_batch_size // n),
                                      seed=(args.seed * 7919 + rt.rank) * 1_000_003)
        table = passk.pass_at_k_table(correct, n, ks, rt.device, W)
        print0(f"step {step}: " + " | ".join(f"{name} {value:.4f}" for name, value in table.items()))
        return table

    logger = MetricsLogger("rl", args=vars(args), run_id=args.run_id or (meta.get("run_id") if resuming else None),
                           wandb_run=args.wandb)
    print0(f"metrics: {logger.path}")
    schedule = loop.Schedule(num_iterations, warmup_ratio=0.0, warmdown_ratio=1.0, final_lr_frac=0.0,
                             momentum_warmup_steps=0)  # linear decay to zero; a trained model needs no warmup

    record = dict(meta.get("metrics", {})) if resuming else {}
    samples_per_s: list[float] = []
    # the first step captures CUDA graphs (see samples_per_s below): not part of the ETA
    progress = Progress(num_iterations, "rl", unit="step", initial=start_step, warmup=1)

    def evaluate_and_log(step: int) -> None:
        table = evaluate(step)
        eval_history.append({"step": step, **table})
        logger.log(step, **table)
        if step > start_step:
            progress.report()

    def save_at(step: int) -> None:
        nonlocal last_checkpoint
        last_checkpoint = stage.save(
            STAGE, tag, step, model, optimizer, tokenizer, args, loader_state={"questions_seen": step * E},
            metrics={k_: v for k_, v in record.items() if k_ != "rank0_questions"},
            extra={"num_iterations": num_iterations, "examples_per_step": E, "num_samples": k, "seed": args.seed,
                   "source": source_info, "run_id": logger.run_id, "eval_history": eval_history,
                   "reward_history": reward_history, "name": meta.get("name")})  # the name SFT taught

    def take_step(step: int) -> None:
        """Questions, rollouts and rewards, then the policy-gradient update."""
        nonlocal record
        rt.synchronize()
        t0 = time.perf_counter()
        # 1-3. questions, rollouts, rewards
        indices = step_questions(step, E, num_questions, args.seed, rt.rank, W)
        conversations = [train_set[i] for i in indices]
        prompts = [prompt_of(c) for c in conversations]
        model.eval()
        results = []
        tools_before = dict(engine.tool_stats)
        for c0 in range(0, len(prompts), questions_per_call):
            call_seed = ((args.seed * 100_003 + step) * 1_009 + rt.rank) * 10_007 + c0
            results += engine.generate_batch(prompts[c0:c0 + questions_per_call], num_samples=k,
                                             max_tokens=args.max_new_tokens, temperature=args.temperature,
                                             top_k=top_k, seed=call_seed)
        scores = [reward_task.reward(conversations[r // k], response_text(tokenizer, res.tokens))
                  for r, res in enumerate(results)]
        rt.synchronize()
        t1 = time.perf_counter()
        tool_calls = engine.tool_stats["calls"] - tools_before["calls"]
        tool_wait = (engine.tool_stats["blocked_s"] - tools_before["blocked_s"]) / max(t1 - t0, 1e-9)

        # 4-5. advantages and the masked policy-gradient loss, micro-batch by micro-batch
        rewards_t = torch.tensor(scores, dtype=torch.float32).view(len(prompts), k)
        advantages = group_advantages(rewards_t).view(-1)
        rows = training_rows(prompts, results, k)
        counts = torch.tensor([sum(sum(mask) for _, mask in rows), sum(len(r.tokens) for r in results)],
                              dtype=torch.float64, device=rt.device)
        if rt.distributed:
            torch.distributed.all_reduce(counts)
        sampled_tokens, generated_tokens = counts.tolist()
        normalizer = sampled_tokens / W
        active = [r for r in range(len(rows)) if advantages[r] != 0]
        model.train()
        sched = loop.apply_schedules(optimizer, step, schedule)
        loss_sum = torch.zeros((), device=rt.device)
        for b0 in range(0, len(active), args.device_batch_size):
            chunk = active[b0:b0 + args.device_batch_size]
            inputs, targets = pad_batch([rows[r] for r in chunk], pad_id, rt.device)
            with rt.autocast():
                loss = policy_gradient_loss(model, inputs, targets, advantages[chunk].to(rt.device), normalizer)
            loss.backward()
            loss_sum += loss.detach().float()
        optimizer.step()
        model.zero_grad(set_to_none=True)
        _refresh_rollout_model(rollout_model, model)
        rt.synchronize()
        t2 = time.perf_counter()

        pg_loss = loop.global_mean(loss_sum)
        loop.check_finite(pg_loss, step, last_checkpoint)
        stats = torch.tensor([sum(scores), len(scores), sum(s > 0 for s in scores)], dtype=torch.float64,
                             device=rt.device)
        if rt.distributed:
            torch.distributed.all_reduce(stats)
        total_reward, num_rows, num_solved = stats.tolist()
        step += 1
        seconds = t2 - t0
        record = {"reward": total_reward / num_rows, "solved_frac": num_solved / num_rows, "pg_loss": pg_loss,
                  "lr_multiplier": sched["lr_multiplier"], "samples_per_s": round(num_rows / seconds, 2),
                  "sampled_tokens": int(sampled_tokens), "mean_reply_tokens": round(generated_tokens / num_rows, 1),
                  "rollout_s": round(t1 - t0, 3), "update_s": round(t2 - t1, 3), "step_s": round(seconds, 3),
                  "tool_calls": tool_calls, "tool_wait_frac": round(tool_wait, 4),
                  "trained_rows": len(active), "rank0_questions": indices, **loop.memory_stats(rt.device)}
        reward_history.append(record["reward"])
        samples_per_s.append(record["samples_per_s"])
        logger.log(step, **record)
        print0(f"step {step}/{num_iterations} | reward {record['reward']:.3f} | pg loss {pg_loss:+.4f} | "
               f"{record['samples_per_s']:.1f} samples/s | rollout {t1 - t0:.2f}s update {t2 - t1:.2f}s | "
               f"{record['mean_reply_tokens']:.0f} tokens/reply | {tool_calls} tool calls, "
               f"{100 * tool_wait:.0f}% of rollout waiting on them")
        progress.update(1, reward=f"{record['reward']:.3f}", samples_s=f"{record['samples_per_s']:.1f}")

    stage.run_steps(start_step, num_iterations, take_step, evals=[(args.eval_every, evaluate_and_log)],
                    save_every=args.save_every, save_minutes=args.save_minutes, save_at=save_at)
    progress.close()
    logger.close()

    timed = samples_per_s[1:] or samples_per_s  # the first step includes warmup (CUDA graph capture)
    summary = {
        "stage": STAGE, "tag": tag, "task": args.task, "source": source_info, "num_iterations": num_iterations,
        "examples_per_step": E, "num_samples": k, "world_size": W, "reward_history": reward_history,
        "final_reward": reward_history[-1] if reward_history else None,
        "eval_history": eval_history, "final_eval": eval_history[-1] if eval_history else None,
        "samples_per_s": round(sum(timed) / len(timed), 2) if timed else None,
        **loop.memory_stats(rt.device), "wall_time_s": round(time.time() - started, 1),
        "resumed_from_step": start_step or None, "checkpoint": last_checkpoint, "args": vars(args), **provenance(),
    }
    if rt.is_main:
        paths.atomic_write_text(summary_path, json.dumps(summary, indent=2, default=str))
        print0(f"done in {format_duration(summary['wall_time_s'])}; summary in {summary_path}")
    return summary
