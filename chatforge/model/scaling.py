"""The --depth dial: one integer derives the model's shape, learning rates, batch size and horizon.

Where it sits: `chatforge pretrain --depth D` calls `derive(D, **flags)`, prints `describe()`, builds
`GPT(s.model_config())` and `build_optimizer(model, **s.optimizer_kwargs())`, and trains for
`s.num_iterations` steps of `s.total_batch_size` tokens. Every value can be overridden by its flag
(`FLAGS` names it); a value given explicitly is shown as such, a derived one with its rule.

The rules (after nanochat, which tuned them on the same architecture):
- width n_embd = 64 x depth, rounded up to a multiple of head_dim (128 by default; toys may use
  less), n_head = n_embd / head_dim, n_kv_head = n_head (plain multi-head attention);
- token budget = ratio x non-embedding parameters (every matmul weight, lm_head included; the
  embedding is a lookup and Chinchilla-style fits work better without it), ratio 10.5;
- total batch: the ideal batch grows with the budget as D^0.383 (the "Power Lines" fit of Bergsma
  et al. 2025), anchored at 2^19 tokens for depth 12's budget; we take the largest power-of-two
  multiple of the tokens one micro-step processes (device batch x seq len x ranks) not above that
  ideal (smaller batches spend tokens more efficiently; at least one micro-step), so gradient
  accumulation always divides evenly. At seq 2048 this gives 0.5M tokens for d12-d20, 1M for d26.
  Two facts about the run lower that ideal for toys (neither touches a GPU run on a real corpus):
  off CUDA the total batch is one micro-step (no accumulation: a depth-6 model on 2 CPU cores
  otherwise derives 32 micro-steps, minutes per step), and a small corpus caps it at 1/100 of its
  train tokens, so one pass over the data is at least ~100 optimizer steps;
- learning rates: Muon 0.02, AdamW 0.2 (embedding), 0.004 (head), 0.5 (scalars) at width 768 and
  batch 2^19. AdamW rates scale as 1/sqrt(n_embd / 768) (muP-like: wider layers take smaller
  per-coordinate steps); all rates scale as sqrt(batch / 2^19) (the square-root rule for adaptive
  optimizers), clamped to [1/4, 2] so CPU toys with 100-token batches keep rates that still learn;
- num_iterations = budget / total batch, rounded up, but at most MANY_PASSES passes over a corpus of
  known size: the budget assumes fresh tokens, and a small model shown the same text many times
  starts to memorise it. The table says how many passes a run makes and warns past MANY_PASSES.

Memory: `memory_floor()` is what training this shape must hold at once on one rank; pretrain
refuses a shape whose floor exceeds the device's free memory before allocating anything.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field, fields, replace

import torch

from chatforge.errors import UsageError
from chatforge.model.gpt import GPT, GPTConfig

ASPECT = 64                 # n_embd per layer of depth
REFERENCE_WIDTH = 768       # the width the base learning rates were tuned at
REFERENCE_BATCH = 2 ** 19   # tokens per step the base learning rates were tuned at
REFERENCE_DEPTH = 12        # whose token budget gets REFERENCE_BATCH
BATCH_EXPONENT = 0.383      # ideal batch ~ budget^0.383
BATCH_LR_CLAMP = (0.25, 2.0)
MIN_STEPS_PER_PASS = 100    # a small corpus caps the total batch at 1/100 of its train tokens
MANY_PASSES = 4             # derived horizons stop here; given ones past it get a warning

# the command-line flag that overrides each derived value (used in messages and by add_arguments)
FLAGS = {
    "head_dim": "--head-dim", "n_embd": "--n-embd", "n_head": "--n-head", "n_kv_head": "--n-kv-head",
    "sequence_len": "--max-seq-len", "vocab_size": "--vocab-size", "window_pattern": "--window-pattern",
    "device_batch_size": "--device-batch-size", "world_size": "--world-size",
    "total_batch_size": "--total-batch-size", "target_param_data_ratio": "--target-param-data-ratio",
    "num_iterations": "--num-iterations", "matrix_lr": "--matrix-lr", "embedding_lr": "--embedding-lr",
    "unembedding_lr": "--unembedding-lr", "scalar_lr": "--scalar-lr", "weight_decay": "--weight-decay",
}


@dataclass
class Scaling:
    depth: int
    head_dim: int
    n_embd: int
    n_head: int
    n_kv_head: int
    sequence_len: int
    vocab_size: int
    window_pattern: str
    num_params: int
    num_scaling_params: int
    flops_per_token: float
    target_param_data_ratio: float
    target_tokens: int
    device_batch_size: int
    world_size: int
    total_batch_size: int
    grad_accum_steps: int
    num_iterations: int
    data_tokens: int | None
    passes: float | None
    matrix_lr: float
    embedding_lr: float
    unembedding_lr: float
    scalar_lr: float
    weight_decay: float
    sources: dict = field(default_factory=dict, repr=False)

    def model_config(self) -> GPTConfig:
        return GPTConfig(sequence_len=self.sequence_len, vocab_size=self.vocab_size, n_layer=self.depth,
                         n_head=self.n_head, n_kv_head=self.n_kv_head, n_embd=self.n_embd,
                         window_pattern=self.window_pattern)

    def optimizer_kwargs(self) -> dict:
        return dict(matrix_lr=self.matrix_lr, embedding_lr=self.embedding_lr, unembedding_lr=self.unembedding_lr,
                    scalar_lr=self.scalar_lr, weight_decay=self.weight_decay)

    def describe(self) -> str:
        """Every value, one per line, with where it came from."""
        lines = []
        for f in fields(self):
            if f.name == "sources":
                continue
            value = getattr(self, f.name)
            if value is None:
                shown = "unknown"
            else:
                shown = f"{value:,}" if isinstance(value, int) else (f"{value:.4g}" if isinstance(value, float) else value)
            lines.append(f"  {f.name:<24} {shown:<16} {self.sources.get(f.name, '')}")
        warning = self.passes_warning()
        return "derived from --depth:\n" + "\n".join(lines) + (f"\n{warning}" if warning else "")

    def with_device_batch(self, rows: int, reason: str) -> "Scaling":
        """The same run with `rows` per micro-batch (chosen after derive(), e.g. by the auto search):
        the total batch stays, the accumulation steps follow."""
        micro = rows * self.sequence_len * self.world_size
        if self.total_batch_size % micro:
            raise UsageError(f"a device batch of {rows} rows x {self.sequence_len} x {self.world_size} rank(s) does not "
                             f"divide the total batch {self.total_batch_size:,}; give --device-batch-size")
        return replace(self, device_batch_size=rows, grad_accum_steps=self.total_batch_size // micro,
                       sources={**self.sources, "device_batch_size": reason})

    def passes_warning(self) -> str | None:
        """One line when the run reads its data more than MANY_PASSES times, with the step count that would not."""
        if self.passes is None or self.passes <= MANY_PASSES:
            return None
        steps = max(1, MANY_PASSES * self.data_tokens // self.total_batch_size)
        return (f"warning: {self.num_iterations:,} steps x {self.total_batch_size:,} tokens read the "
                f"~{self.data_tokens:,}-token train split {self.passes:.1f} times; past {MANY_PASSES} passes a "
                f"model starts to memorise its text (watch val bpb; --num-iterations {steps:,} makes "
                f"{MANY_PASSES}, or give it more data)")

    def memory_floor(self, activation_bytes: int = 4) -> dict[str, int]:
        """Bytes one rank must hold at once to train this shape, counted low on purpose.

        state: fp32 weights and gradients (8 B per parameter) and the optimizer's state, which
        the optimizer shards across ranks: Muon's momentum (4 B) for the blocks' matrices, AdamW's
        two moments (8 B) for the embedding and head. activations: for one micro-batch, the
        inputs every block's matmuls keep for backward (~8 x n_embd values per layer per token,
        at `activation_bytes` each: 2 under bf16 autocast, 4 in fp32) and the fp32 logits. Fused
        kernels and recomputation cannot go below this, so a run refused by it could not fit; one
        that passes may still run out (then the out-of-memory advice names the flag to lower).
        """
        head_and_embedding = 2 * self.vocab_size * self.n_embd
        matrices = self.num_params - head_and_embedding
        optimizer = (4 * matrices + 8 * head_and_embedding) // self.world_size
        tokens = self.device_batch_size * self.sequence_len
        activations = (tokens * self.depth * 8 * self.n_embd * activation_bytes
                       + tokens * self.vocab_size * 4)
        return {"state": 8 * self.num_params + optimizer, "activations": activations}


def _count(config: GPTConfig) -> tuple[int, int, float]:
    """(total params, non-embedding params, FLOPs per token) of a model of this shape, built on meta."""
    with torch.device("meta"):
        model = GPT(config)
    return model.num_params(), model.num_params(include_embedding=False), model.estimate_flops()


def _budget(depth: int, head_dim: int, sequence_len: int, vocab_size: int, ratio: float) -> int:
    n_embd = math.ceil(ASPECT * depth / head_dim) * head_dim
    cfg = GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth,
                    n_head=n_embd // head_dim, n_kv_head=n_embd // head_dim, n_embd=n_embd)
    return int(ratio * _count(cfg)[1])


def derive(depth: int, *, device: str | None = None, data_tokens: int | None = None,
           given_by: dict[str, str] | None = None, **overrides) -> Scaling:
    """All values for a model of `depth` layers; keyword overrides (None = not given) win over the rules.

    `device` is the device type the run trains on ("cuda", "cpu", "mps"; None derives as for CUDA)
    and `data_tokens` the size of the corpus's train split (None: unknown, derived as if unlimited).
    `given_by` names where an override came from when that is not its flag (pretrain's vocabulary
    comes from the tokenizer, its world size from torchrun), so the table credits the right source.
    """
    unknown = set(overrides) - set(FLAGS)
    if unknown:
        raise TypeError(f"derive() got unknown overrides {sorted(unknown)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    src: dict[str, str] = {"depth": "--depth"}

    def pick(name, rule, value):
        if name in given:
            src[name] = (given_by or {}).get(name) or f"{FLAGS[name]} (given)"
            return given[name]
        src[name] = rule
        return value

    if not isinstance(depth, int) or depth < 1:
        raise UsageError(f"--depth {depth} must be a positive integer (e.g. --depth 4 for a CPU toy, 20 for GPU)")
    for name in ("head_dim", "n_embd", "n_head", "n_kv_head", "sequence_len", "vocab_size",
                 "device_batch_size", "world_size", "total_batch_size", "num_iterations"):
        if name in given and (not isinstance(given[name], int) or given[name] < 1):
            raise UsageError(f"{FLAGS[name]} {given[name]} must be a positive integer")

    n_embd_default_head = given.get("head_dim", 128)
    if "n_head" in given and "head_dim" in given:
        raise UsageError("give --n-head or --head-dim, not both (one follows from the other and --n-embd)")
    n_embd = pick("n_embd", f"{ASPECT} x depth rounded up to head_dim",
                  math.ceil(ASPECT * depth / n_embd_default_head) * n_embd_default_head)
    if "n_head" in given:
        n_head = pick("n_head", "", given["n_head"])
        if n_embd % n_head:
            raise UsageError(f"--n-embd {n_embd} is not divisible by --n-head {n_head}; change one of them")
        head_dim = n_embd // n_head
        src["head_dim"] = "n_embd / n_head"
    else:
        head_dim = pick("head_dim", "default", 128)
        if n_embd % head_dim:
            raise UsageError(f"--n-embd {n_embd} is not divisible by --head-dim {head_dim}; change one of them")
        n_head = n_embd // head_dim
        src["n_head"] = "n_embd / head_dim"
    n_kv_head = pick("n_kv_head", "= n_head (no GQA)", n_head)
    if n_head % n_kv_head:
        raise UsageError(f"--n-kv-head {n_kv_head} must divide the number of heads {n_head}")
    sequence_len = pick("sequence_len", "default", 2048)
    vocab_size = pick("vocab_size", "default (the tokenizer's size when training)", 32768)
    window_pattern = pick("window_pattern", "default (full attention)", "L")

    config = GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth, n_head=n_head,
                       n_kv_head=n_kv_head, n_embd=n_embd, window_pattern=window_pattern)
    num_params, num_scaling, flops = _count(config)
    src.update(num_params="counted", num_scaling_params="counted: all but the embedding",
               flops_per_token="6 x matmul params + attention")

    ratio = pick("target_param_data_ratio", "default (tokens per non-embedding param)", 10.5)
    target_tokens = int(ratio * num_scaling)
    src["target_tokens"] = "ratio x non-embedding params"

    device_batch_size = pick("device_batch_size", "default", 32)
    world_size = pick("world_size", "ranks started by torchrun", 1)
    micro_tokens = device_batch_size * sequence_len * world_size
    reference = _budget(REFERENCE_DEPTH, 128, sequence_len, vocab_size, ratio)
    ideal = REFERENCE_BATCH * (target_tokens / reference) ** BATCH_EXPONENT
    cap, rule = ideal, f"up to {ideal:,.0f} (budget^{BATCH_EXPONENT})"
    if data_tokens is not None and data_tokens < 1:
        raise ValueError(f"data_tokens must be positive, got {data_tokens}")
    if device not in (None, "cuda"):
        cap, rule = micro_tokens, f"one micro-step: on {device} more would take minutes a step"
    if data_tokens is not None and data_tokens / MIN_STEPS_PER_PASS < cap:
        cap, rule = data_tokens / MIN_STEPS_PER_PASS, f"up to 1/{MIN_STEPS_PER_PASS} of the train split"
    doublings = max(0, math.floor(math.log2(cap / micro_tokens)))
    total_batch_size = pick("total_batch_size",
                            f"largest power-of-2 multiple of {micro_tokens:,} tokens/micro-step (at least one) {rule}",
                            micro_tokens * 2 ** doublings)
    if total_batch_size % micro_tokens:
        raise UsageError(
            f"--total-batch-size {total_batch_size} is not a multiple of --device-batch-size x --max-seq-len "
            f"x ranks = {device_batch_size} x {sequence_len} x {world_size} = {micro_tokens}; change one of them")
    grad_accum_steps = total_batch_size // micro_tokens
    src["grad_accum_steps"] = "total batch / tokens per micro-step"
    horizon, rule = target_tokens, "target tokens / total batch, rounded up"
    if data_tokens is not None and MANY_PASSES * data_tokens < target_tokens:
        horizon, rule = MANY_PASSES * data_tokens, f"{MANY_PASSES} passes over the train split, rounded down"
    rounded = math.ceil(horizon / total_batch_size) if horizon == target_tokens else horizon // total_batch_size
    num_iterations = pick("num_iterations", rule, max(1, rounded))
    passes = None if data_tokens is None else num_iterations * total_batch_size / data_tokens
    src["data_tokens"] = "the train split, counted or estimated" if data_tokens else "not counted"
    src["passes"] = "num_iterations x total batch / data tokens"

    width_scale = (n_embd / REFERENCE_WIDTH) ** -0.5
    batch_scale = min(max((total_batch_size / REFERENCE_BATCH) ** 0.5, BATCH_LR_CLAMP[0]), BATCH_LR_CLAMP[1])
    why = f"x batch scale {batch_scale:.3g}"
    matrix_lr = pick("matrix_lr", f"0.02 {why}", 0.02 * batch_scale)
    embedding_lr = pick("embedding_lr", f"0.2 x width scale {width_scale:.3g} {why}", 0.2 * width_scale * batch_scale)
    unembedding_lr = pick("unembedding_lr", f"0.004 x width scale {width_scale:.3g} {why}",
                          0.004 * width_scale * batch_scale)
    scalar_lr = pick("scalar_lr", f"0.5 {why}", 0.5 * batch_scale)
    weight_decay = pick("weight_decay", "default (Muon groups only)", 0.0)
    checked = dict(target_param_data_ratio=ratio, matrix_lr=matrix_lr, embedding_lr=embedding_lr,
                   unembedding_lr=unembedding_lr, scalar_lr=scalar_lr, weight_decay=weight_decay)
    for name, value in checked.items():
        if not math.isfinite(value) or value < 0:
            raise UsageError(f"{FLAGS[name]} {value} must be a finite non-negative number")

    return Scaling(depth=depth, head_dim=head_dim, n_embd=n_embd, n_head=n_head, n_kv_head=n_kv_head,
                   sequence_len=sequence_len, vocab_size=vocab_size, window_pattern=config.window_pattern,
                   num_params=num_params, num_scaling_params=num_scaling, flops_per_token=flops,
                   target_param_data_ratio=ratio, target_tokens=target_tokens,
                   device_batch_size=device_batch_size, world_size=world_size, total_batch_size=total_batch_size,
                   grad_accum_steps=grad_accum_steps, num_iterations=num_iterations, data_tokens=data_tokens,
                   passes=passes, matrix_lr=matrix_lr,
                   embedding_lr=embedding_lr, unembedding_lr=unembedding_lr, scalar_lr=scalar_lr,
                   weight_decay=weight_decay, sources=src)


def add_scaling_arguments(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """Add every override flag (default None = derive it); `skip` leaves out fields a stage sets itself."""
    group = parser.add_argument_group("model size and schedule (derived from --depth unless given)")
    types = {"window_pattern": str, "target_param_data_ratio": float, "matrix_lr": float, "embedding_lr": float,
             "unembedding_lr": float, "scalar_lr": float, "weight_decay": float}
    for name, flag in FLAGS.items():
        if name in skip:
            continue
        group.add_argument(flag, dest=name, type=types.get(name, int), default=None,
                           help=f"override the derived {name.replace('_', ' ')}")


def overrides_from_args(args: argparse.Namespace) -> dict:
    """The override keywords for derive() that a parsed namespace carries."""
    return {name: getattr(args, name) for name in FLAGS if hasattr(args, name)}
