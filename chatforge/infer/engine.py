"""The inference engine: prefill once, decode with a static KV cache, stream tokens, run the tool.

Where it sits: the chat CLI, the server, chat evaluation and RL all generate through `Engine`.
The model only knows how to use a cache it is given (`GPT.forward(idx, kv_cache=...)`); this
file owns the cache, the batching, the sampling loop and the python tool.

How a call runs:
1. Prefill. Prompts of equal length are prefilled together (one forward each group) into a
   small cache sized to the prompt, and their last-position logits are kept. Rows are prompt-major:
   row i * num_samples + j is sample j of prompt i; all samples of a prompt share its prefill
   (`KVCache.copy_rows` copies it into each of their rows of the decode cache).
2. Decode. One forward of (R, 1) tokens per step for all rows together; rows sit at different
   lengths and the model masks per row. Shapes never change, so on CUDA the step is captured once
   in a CUDA graph (optionally around a `torch.compile`d step, which fuses the small kernels) and
   replayed. The host runs one step behind the GPU: step k+1 is launched with step k's sampled ids
   still on the device, and only then does Python wait for those ids (streaming and the tool state
   machine need them). A forced token is known a step early, so it is patched into the input; a row
   that ends costs one junk step. Same seed, same tokens as a lock-step loop.
3. Tool use, per row: after `<|python_start|>` the sampled tokens are collected until
   `<|python_end|>`; the code goes to the sandbox (a Future: several rows' calls run at once) and
   the row waits alone: until its result is in, each step feeds it `<|python_end|>` again at the same
   position (rewriting the same key/value, so its cache is untouched) and its output is ignored,
   while the other rows decode on. Then `<|output_start|> result <|output_end|>` is queued as forced
   tokens, fed one per step before sampling resumes. Sampling noise is keyed by (row, position)
   (infer/sampling.py), so the steps a row sat out change none of its tokens: same seed, same tokens,
   however long the tool took. Only when every row waits does the host block on the tools. Forced
   tokens are marked `sampled=False` (RL must not train on them).
4. A row ends at a sampled `<|assistant_end|>` or `<|bos|>` (or a caller's stop id / stop string),
   after max_tokens generated tokens, or when it reaches the model's context (sequence_len).

A prompt longer than the context is an error (UsageError), never silently cut.
"""

from __future__ import annotations

import os
import random
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, wait
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Iterator

import torch

from chatforge.errors import CheckpointError, UsageError
from chatforge.infer.sampling import check_sampling_args, row_keys, sample_next
from chatforge.infer.sandbox import submit_python
from chatforge.model import checkpoint
from chatforge.model.gpt import KVCache
from chatforge.runtime import pick_device, pick_dtype

CACHE_ROUND = 256           # decode cache lengths are rounded up so CUDA graphs are reused across calls
PREFILL_GROUP = 32          # at most this many equal-length prompts per prefill forward
TOOL_OUTPUT_CHARS = 2000    # a tool's output is cut to this many characters before it is tokenized


@dataclass
class StepToken:
    """One token of one row, as streamed by `Engine.generate`."""
    row: int          # i * num_samples + j for sample j of prompt i
    token: int
    sampled: bool     # False for tokens the engine forced in (tool output)
    done: bool        # this row has finished with this token
    finish_reason: str | None = None  # when done: "stop", "length" (max_tokens) or "context"


@dataclass
class GenerationResult:
    """A finished row: generated tokens (the stop token included when one ended it) and their mask."""
    tokens: list[int] = field(default_factory=list)
    sampled_mask: list[int] = field(default_factory=list)  # 1 = sampled by the model, 0 = forced
    finish_reason: str | None = None


@dataclass
class _Row:
    prompt_len: int
    max_tokens: int
    stop_strings: tuple = ()
    generated: int = 0
    done: bool = False
    forced: deque = field(default_factory=deque)
    in_code: bool = False
    code: list = field(default_factory=list)
    recent: list = field(default_factory=list)  # tail of generated ids, for stop strings
    tool: Future | None = None  # the sandbox call this row waits for


class Engine:
    def __init__(self, model, tokenizer, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 compile: bool = False, cuda_graph: bool | None = None):
        """model: a GPT (in eval mode); dtype: the KV cache / compute dtype (default: the weights' dtype;
        when it differs from the weights on CUDA the forward runs under autocast, so a training model
        can be used for RL rollouts without being cast). compile: torch.compile the decode step;
        cuda_graph: capture the decode step in a CUDA graph (default: on for CUDA)."""
        param = next(model.parameters())
        self.model = model
        self.tokenizer = tokenizer
        self.device = torch.device(device) if device is not None else param.device
        self.dtype = dtype or param.dtype
        self.config = model.config
        self.compile = compile
        self.cuda_graph = (self.device.type == "cuda") if cuda_graph is None else cuda_graph
        if self.cuda_graph and self.device.type != "cuda":
            raise UsageError("CUDA graphs need a CUDA device; leave cuda_graph off on CPU")
        if tokenizer.vocab_size > self.config.vocab_size:
            raise CheckpointError(
                f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {self.config.vocab_size}; "
                "use the tokenizer the model was trained with (retrain with `chatforge tokenizer train`?)"
            )
        special = tokenizer.special_id
        self.bos = special("<|bos|>")
        self.assistant_end = special("<|assistant_end|>")
        self.python_start, self.python_end = special("<|python_start|>"), special("<|python_end|>")
        self.output_start, self.output_end = special("<|output_start|>"), special("<|output_end|>")
        self.meta: dict = {}  # the checkpoint's meta.json when loaded with from_checkpoint
        self.prefill_graphs = None  # a DecodeSession's recorded prefills (infer/prefill_graphs.py); False: recording failed
        self._decoder = None  # ((R, max_len), cache, static input, row keys, forward, {sampling: step})
        self.tool_stats = {"calls": 0, "blocked_s": 0.0}  # sandbox calls made; seconds every row waited on one

    # ---- loading -------------------------------------------------------------------------------

    @classmethod
    def from_checkpoint(cls, source: str = "sft", tag: str | None = None, step: int | None = None,
                        device: str | torch.device | None = None, dtype: str | None = None,
                        compile: bool = False) -> "Engine":
        """Load the tokenizer and a checkpoint of stage `source` (latest tag and step by default).

        On CUDA (compute capability 8+) the weights are cast to bf16: decoding reads every weight
        once per step, so half the bytes is nearly twice the speed.
        """
        dev = torch.device(device) if isinstance(device, torch.device) else pick_device(device)[0]
        dt = pick_dtype(dev, dtype)[0]
        loaded = checkpoint.load(source, tag, step, device=dev, dtype=dt)
        engine = cls(loaded.model.fuse_for_inference(), loaded.tokenizer, dev, dt, compile=compile)
        engine.meta = loaded.meta
        return engine

    # ---- the public calls ----------------------------------------------------------------------

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], num_samples: int = 1, max_tokens: int = 256,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = None, stop_ids: list[int] | None = None,
                 stop_strings: list[str] | None = None, use_tools: bool = True,
                 ignore_stops: bool = False) -> Iterator[list[StepToken]]:
        """Yield, once per decode step, the StepToken of every row still running.

        ignore_stops: generate exactly max_tokens per row (benchmarks; random weights stop anywhere)."""
        prompts = self._check_prompts(prompts, num_samples, max_tokens)
        check_sampling_args(temperature, top_k, top_p)
        R = len(prompts) * num_samples
        stop_strings = tuple(s for s in (stop_strings or []) if s)
        rows = [_Row(len(p), max_tokens, stop_strings) for p in prompts for _ in range(num_samples)]
        stop_set = set() if ignore_stops else {self.assistant_end, self.bos, *(stop_ids or [])}
        context = self.config.sequence_len
        max_len = min(max(len(p) for p in prompts) + max_tokens, context) + 1  # +1: a finished row's scratch slot
        max_len = -(-max_len // CACHE_ROUND) * CACHE_ROUND

        cache, step_fn, static_in, keys = self._decode_state(R, max_len, (temperature, top_k, top_p))
        keys.copy_(row_keys(seed if seed is not None else random.getrandbits(63), R, self.device))
        logits = self._prefill(prompts, num_samples, cache)  # (R, V)
        sampled = sample_next(logits, temperature, top_k, top_p, keys=keys, positions=cache.lengths)  # (R,)
        static_in.copy_(sampled)
        cuda = self.device.type == "cuda"
        host_ids = torch.empty(R, dtype=torch.long, pin_memory=cuda)
        arrived = torch.cuda.Event() if cuda else None
        scratch: list[int] = []  # rows that finished: their writes go to a scratch slot from the next launch
        while True:
            host_ids.copy_(sampled, non_blocking=cuda)
            if cuda:
                arrived.record()
            # Launch the next step before this one's ids reach the host, so the GPU never waits on Python.
            # Its input is this step's sampled ids, except for rows whose token this step is forced (known
            # already: the queue was filled by an earlier step's tool call); their sampled id is dropped.
            live = {b: row for b, row in enumerate(rows) if not row.done}
            self._wait_for_tools(live)  # blocks only while every live row waits
            forced = self._feed_forced(live, static_in)
            self._hold_waiting(live, cache, static_in)
            if scratch:
                # a finished row keeps decoding junk (shapes are static) into a scratch slot at 0
                cache.lengths[torch.tensor(scratch, device=self.device)] = 0
                scratch = []
            sampled = step_fn()  # forward + sampling, one step ahead; wasted only after the last row ends
            if cuda:
                arrived.synchronize()
            host = host_ids.tolist()  # the one wait per step, for ids the GPU finished a step ago
            out = self._account(live, host, forced, stop_set, use_tools)
            scratch = [t.row for t in out if t.done]
            if out:
                yield out
            if all(row.done for row in rows):
                return

    def _wait_for_tools(self, live: dict[int, _Row], timeout: float | None = None) -> bool:
        """Queue the output of every finished tool call. When every live row waits on one, first wait
        for a call to finish (up to `timeout`; None: as long as it takes) rather than step the GPU for
        nothing. Whether any live row can take a step now."""
        pending = [row.tool for row in live.values() if row.tool is not None]
        if pending and len(pending) == len(live):
            started = time.perf_counter()
            wait(pending, timeout=timeout, return_when=FIRST_COMPLETED)
            self.tool_stats["blocked_s"] += time.perf_counter() - started
        for row in live.values():
            if row.tool is not None and row.tool.done():
                text = row.tool.result().as_text()[:TOOL_OUTPUT_CHARS]
                row.forced.extend([self.output_start, *self.tokenizer.encode(text), self.output_end])
                row.tool = None
        return any(row.tool is None for row in live.values())

    def _hold_waiting(self, live: dict[int, _Row], cache, static_in: torch.Tensor) -> None:
        """Rows whose tool still runs sit this step out: `<|python_end|>` again at the same position
        (the same key/value rewritten) and, in `_account`, no token."""
        held = [b for b, row in live.items() if row.tool is not None]
        if held:
            idx = torch.tensor(held, device=self.device)
            static_in[idx] = self.python_end
            cache.lengths[idx] -= 1

    def _feed_forced(self, live: dict[int, _Row], static_in: torch.Tensor) -> dict[int, int]:
        """Pop this step's forced token of each live row that has one and patch it into the next
        step's input (its sampled id is dropped); {row: token}."""
        forced = {b: row.forced.popleft() for b, row in live.items() if row.forced}
        if forced:
            idx = torch.tensor(list(forced), device=self.device)
            static_in[idx] = torch.tensor(list(forced.values()), device=self.device, dtype=static_in.dtype)
        return forced

    def _account(self, live: dict[int, _Row], host: list[int], forced: dict[int, int], stop_set: set,
                 use_tools: bool) -> list[StepToken]:
        """Each live row's token of this step (forced, else the sampled id in `host`), in row order;
        rows waiting for a tool have none. Tool calls that closed go to the sandbox now."""
        out, tool_rows = [], []
        for b, row in live.items():
            if row.tool is not None:
                continue
            was_sampled = b not in forced
            token = host[b] if was_sampled else forced[b]
            reason, tool_call = self._advance(row, token, was_sampled, stop_set, use_tools)
            if tool_call:
                tool_rows.append(row)
            out.append(StepToken(b, token, was_sampled, row.done, reason))
        if tool_rows:
            # the step already launched fed python_end; the row waits from the next one on
            self._start_tools(tool_rows)
        return out

    def _advance(self, row: _Row, token: int, was_sampled: bool, stop_set: set, use_tools: bool):
        """Account one emitted token of a row: (finish reason or None, whether it closed a tool call)."""
        row.generated += 1
        reason, tool_call = None, False
        if was_sampled and token in stop_set:
            reason = "stop"
        elif was_sampled and use_tools:
            if token == self.python_start and not row.in_code:
                row.in_code, row.code = True, []
            elif token == self.python_end and row.in_code:
                row.in_code, tool_call = False, True
            elif row.in_code:
                row.code.append(token)
        if reason is None and row.stop_strings and not self.tokenizer.is_special(token):
            tail_len = max(len(s.encode("utf-8")) for s in row.stop_strings) + 1
            row.recent = (row.recent + [token])[-tail_len:]
            tail = self.tokenizer.decode(row.recent)
            if any(s in tail for s in row.stop_strings):
                reason = "stop"
        if reason is None and row.generated >= row.max_tokens:
            reason = "length"
        if reason is None and row.prompt_len + row.generated >= self.config.sequence_len:
            reason = "context"
        if reason is not None:
            row.done = True
        return reason, tool_call

    def generate_batch(self, prompts: list[list[int]], num_samples: int = 1, **kwargs) -> list[GenerationResult]:
        """Run `generate` to the end; one GenerationResult per row (prompt-major), for RL and eval."""
        results = [GenerationResult() for _ in range(len(prompts) * num_samples)]
        for step in self.generate(prompts, num_samples=num_samples, **kwargs):
            for t in step:
                r = results[t.row]
                r.tokens.append(t.token)
                r.sampled_mask.append(1 if t.sampled else 0)
                if t.done:
                    r.finish_reason = t.finish_reason
        return results

    # ---- pieces --------------------------------------------------------------------------------

    def _check_prompts(self, prompts, num_samples: int, max_tokens: int) -> list[list[int]]:
        if not prompts or isinstance(prompts[0], int):
            raise UsageError("generate expects a list of prompts, each a list of token ids")
        if num_samples < 1:
            raise UsageError(f"num_samples {num_samples} must be at least 1")
        if max_tokens < 1:
            raise UsageError(f"--max-new-tokens {max_tokens} must be at least 1")
        context = self.config.sequence_len
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise UsageError(f"prompt {i} is empty; a prompt needs at least one token (e.g. <|bos|>)")
            if len(p) >= context:
                raise UsageError(
                    f"prompt {i} is {len(p)} tokens but the model's context is {context}; shorten it "
                    "(in chat, /clear the history)"
                )
            bad = [t for t in p if not 0 <= t < self.config.vocab_size]
            if bad:
                raise UsageError(f"prompt {i} has token id {bad[0]} outside the vocabulary (size {self.config.vocab_size})")
        return [list(map(int, p)) for p in prompts]

    def _autocast(self):
        if self.device.type == "cuda" and self.dtype != next(self.model.parameters()).dtype:
            return torch.autocast("cuda", dtype=self.dtype)
        return nullcontext()

    def _mask_padding(self, logits: torch.Tensor) -> torch.Tensor:
        """Ids the model has but the tokenizer lacks (a vocabulary padded for speed) are never picked."""
        if self.config.vocab_size > self.tokenizer.vocab_size:
            logits[..., self.tokenizer.vocab_size:] = float("-inf")
        return logits

    def _prefill(self, prompts: list[list[int]], num_samples: int, cache) -> torch.Tensor:
        """Prefill each prompt once and copy it into its samples' rows; (R, V) last-position logits."""
        cache.reset()
        R = len(prompts) * num_samples
        logits = torch.empty(R, self.config.vocab_size, device=self.device, dtype=torch.float32)
        by_length: dict[int, list[int]] = {}
        for i, p in enumerate(prompts):
            by_length.setdefault(len(p), []).append(i)
        for members in by_length.values():
            for start in range(0, len(members), PREFILL_GROUP):
                group = members[start:start + PREFILL_GROUP]
                dst = [i * num_samples + j for i in group for j in range(num_samples)]
                logits[dst] = self._prefill_rows(cache, [prompts[i] for i in group], num_samples, dst)
        return logits

    def _prefill_rows(self, cache, prompts: list[list[int]], num_samples: int, dst: list[int]) -> torch.Tensor:
        """One forward over equal-length prompts; prompt i's K/V go to cache rows
        dst[i * num_samples : (i + 1) * num_samples]. Returns those rows' last-position logits (fp32)."""
        ids = torch.tensor(prompts, dtype=torch.long, device=self.device)
        small = KVCache(self.config, len(prompts), ids.shape[1], self.device, self.dtype)
        at = torch.full((len(prompts),), ids.shape[1] - 1, dtype=torch.long, device=self.device)
        with self._autocast():  # the head at the last position only: (G, V), not (G, T, V) of fp32
            last = self.model(ids, kv_cache=small, logits_at=at)[:, 0]
        src = [g for g in range(len(prompts)) for _ in range(num_samples)]
        cache.copy_rows(small, src, dst)
        return self._mask_padding(last[src].float())

    def _decode_state(self, R: int, max_len: int, sampling: tuple):
        """The decode cache, step function, input buffer and row keys for R rows.

        A step feeds `static_in`, samples with `sampling` = (temperature, top_k, top_p) and the rows'
        keys (noise keyed by row and position), and leaves the sampled ids both in `static_in` (the
        next step's input) and in the returned tensor. The cache and the (compiled) forward are built
        once per (R, max_len); on CUDA each sampling setting gets its own graph of forward + sampling,
        so a step is a single launch. Keys and lengths are device tensors the graph reads, so new
        seeds need no new graph.
        """
        key = (R, max_len)
        if self._decoder is None or self._decoder[0] != key:
            self._decoder = None
            if self.device.type == "cuda":
                torch.cuda.empty_cache()  # the previous shape's cache and graph pools
            cache = KVCache(self.config, R, max_len, self.device, self.dtype)
            static_in = torch.zeros(R, dtype=torch.long, device=self.device)
            keys = torch.zeros(R, dtype=torch.long, device=self.device)
            self._decoder = (key, cache, static_in, keys, self._forward_fn(cache, static_in), {})
        _, cache, static_in, keys, forward, steps = self._decoder
        if sampling not in steps:
            sample = self._sampler(sampling)

            def step():
                sampled = sample(forward(), keys, cache.lengths)
                static_in.copy_(sampled)
                return sampled

            if self.cuda_graph:
                step = self._capture(step, cache, static_in)
            steps.clear()  # one sampling setting at a time keeps at most one graph's memory around
            steps[sampling] = step
        return cache, steps[sampling], static_in, keys

    def _sampler(self, sampling: tuple):
        """sample(logits, keys, positions) -> ids for one sampling setting. Compiled on CUDA even when
        the forward is not: the keyed noise is some twenty element-wise passes over (R, V) int64 that
        fuse into one kernel (eager, they cost ~10% of a batch-128 step); never on the CPU test path."""
        temperature, top_k, top_p = sampling

        def sample(logits, keys, positions):
            return sample_next(logits, temperature, top_k, top_p, keys=keys, positions=positions)

        fuse = self.compile or (self.device.type == "cuda" and temperature > 0)
        return torch.compile(sample, dynamic=False) if fuse else sample

    def _forward_fn(self, cache, static_in):
        """The decode forward of `static_in` (R,) over `cache`: (R, V) fp32 logits, compiled if asked."""
        model = self.model

        def forward_step():
            with self._autocast():
                return self._mask_padding(model(static_in[:, None], kv_cache=cache)[:, -1])  # (R, V)

        # CHATFORGE_DECODE_COMPILE_MODE=max-autotune-no-cudagraphs lets Inductor tune its own kernels
        # at the price of minutes of autotuning
        mode = os.environ.get("CHATFORGE_DECODE_COMPILE_MODE") or None
        return torch.compile(forward_step, dynamic=False, mode=mode) if self.compile else forward_step

    def _session_step(self, cache, static_in, out, keys, sampling: tuple):
        """A decode step for a DecodeSession's first R rows (cache, static_in, out and keys are views):
        forward, sample, and leave the ids in static_in and out; graph-captured on CUDA."""
        forward = self._forward_fn(cache, static_in)
        sample = self._sampler(sampling)

        def step():
            sampled = sample(forward(), keys, cache.lengths)
            static_in.copy_(sampled)
            out.copy_(sampled)
            return out

        return self._capture(step, cache, static_in) if self.cuda_graph else step

    def _capture(self, step, cache, static_in):
        """Record one decode step in a CUDA graph; replaying it costs one launch instead of hundreds."""
        saved_lengths, saved_in = cache.lengths.clone(), static_in.clone()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(3):  # warm up: compile, autotune and allocate outside the capture
                step()
                cache.lengths.copy_(saved_lengths)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = step()
        cache.lengths.copy_(saved_lengths)
        static_in.copy_(saved_in)

        def replay():
            graph.replay()
            return static_out

        return replay

    def _start_tools(self, rows: list[_Row]) -> None:
        """Send each row's collected code to the sandbox; the row waits until its Future is done."""
        for row in rows:
            row.tool = submit_python(self.tokenizer.decode(row.code))
        self.tool_stats["calls"] += len(rows)


class IncrementalDecoder:
    """Turns a stream of token ids into text pieces, holding back bytes of an unfinished UTF-8 character."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.pending: list[int] = []  # ids since the last complete character boundary

    def push(self, token: int) -> str:
        self.pending.append(token)
        text = self.tokenizer.decode(self.pending)
        if text.endswith("\ufffd") and len(self.pending) < 8:
            return ""  # wait for the rest of the character (a UTF-8 character spans at most 4 tokens)
        self.pending = []
        return text

    def flush(self) -> str:
        text = self.tokenizer.decode(self.pending) if self.pending else ""
        self.pending = []
        return text
