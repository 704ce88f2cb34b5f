"""Continuous batching: a decode that rows join and leave while it runs (what the server uses).

`Engine.generate` decodes a fixed set of prompts to the end; a server that used only that would
make a request arriving mid-batch wait for the whole batch, and a cancelled request's row would
decode on until its batch ended. A `DecodeSession` instead owns `capacity` rows of one static KV
cache (sized to the model's context, so any prompt fits); `admit` takes the lowest free slots for a
prompt, `release` frees slots at once, and `step` prefills what was admitted and decodes the
occupied rows by one token.

Prefill is interleaved with decoding so that an arriving prompt never freezes the running streams
for long: each step prefills at most `prefill_chunk` prompt tokens (512 by default) before its
decode step. Prompts admitted since the last step that fit in that budget are prefilled together,
right-padded to the longest, in one forward (the padding's keys/values land past each row's length,
where the row's own decode overwrites them before attending); a longer prompt is prefilled in
chunks of the budget over as many steps into a cache of its own, then copied into its slots. A
prompt's first token comes out of the step that finished its prefill. `prefill_chunk=None` prefills
every admitted prompt whole at the next step (the unchunked reference the tests compare against).

A step only runs the first R rows, R the smallest power of two that covers every occupied slot:
each R gets its own captured forward + sampling over views of the same cache, so one request alone
decodes as fast as through `generate` (batch 1 is the fastest shape by far on a GPU), and a session
opened for one request still has room for 31 more. Slots are taken lowest first, so R stays small.

How it stays correct with the host a step behind the GPU (see engine.py): prefill and `release`
only enqueue device work after the step already in flight, on the same stream, so they overwrite
whatever that step wrote for the slot (its cache rows, its length, its sampled id), and a freed or
newly admitted slot's output from a step launched before the change is ignored on the host. Free
slots (and slots still being prefilled) inside the R rows decode junk at position 0 (their length
is reset before every step), as finished rows do in `generate`. Per-row limits (max_tokens, stop
strings) work as in `generate`; all rows share the session's temperature/top-k/top-p, but each
admission has its own seed (noise is keyed by row and position), so a seeded request gets the same
tokens here as alone through `generate`. A row whose tool call runs waits alone, as in `generate`.
One engine runs one session (or one `generate`) at a time.

Where the time goes is added to `timing` (infer/timing.py): prefill, the decode launch, the wait
for the GPU, the engine's bookkeeping, and on CUDA the GPU's own time for decode and prefill
(events read a step later, so measuring never stalls the pipeline).
"""

from __future__ import annotations

import os
import random
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from chatforge.errors import UsageError
from chatforge.infer.engine import CACHE_ROUND, PREFILL_GROUP, Engine, StepToken, _Row
from chatforge.infer.sampling import check_sampling_args, row_keys, sample_next
from chatforge.infer.timing import TimeSpent
from chatforge.runtime import print0

TOOL_POLL = 0.005   # seconds a step waits for a tool when every row waits, before it returns to admit
PREFILL_CHUNK = 512  # most prompt tokens prefilled per step, so running streams wait one chunk at most
SHORTEST_BUCKET = 16  # bucketed prefill: prompt lengths are padded to a power of two from here


def _pow2(n: int, floor: int = 1) -> int:
    return max(floor, 1 << (n - 1).bit_length())


@dataclass
class _Admission:
    """A prompt admitted but not yet (fully) prefilled; its slots are taken meanwhile."""
    prompt: list[int]
    slots: list[int]
    max_tokens: int
    stops: tuple
    seed: int
    done: int = 0                  # prompt tokens already prefilled (into `cache`)
    cache: object = None           # this prompt's own KVCache while it is prefilled in chunks
    released: set = field(default_factory=set)


class _Clock:
    """Host seconds between laps, each added to `timing` under its name: where a prefill's host time
    goes (a GPU-bound forward shows in the launch as little; a per-shape setup as a lot)."""

    def __init__(self, timing):
        self.timing, self.last = timing, time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.timing.add(name, now - self.last)
        self.last = now


class DecodeSession:
    @torch.inference_mode()
    def __init__(self, engine: Engine, capacity: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, use_tools: bool = True, prefill_chunk: int | None = PREFILL_CHUNK,
                 timing: TimeSpent | None = None, bucketed: bool | None = None,
                 prefill_graphs: bool | None = None):
        from chatforge.model.gpt import KVCache

        if capacity < 1:
            raise UsageError(f"a decode session needs at least one slot (got {capacity})")
        if prefill_chunk is not None and prefill_chunk < 2:
            raise UsageError(f"the prefill chunk must be at least 2 tokens (got {prefill_chunk})")
        check_sampling_args(temperature, top_k, top_p)
        self.engine, self.capacity, self.use_tools = engine, capacity, use_tools
        self.sampling = (temperature, top_k, top_p)
        self.prefill_chunk = prefill_chunk
        self.timing = timing or TimeSpent()
        device = engine.device
        # Bucketed prefill (the default on CUDA, with a chunk): every prefill forward takes one of a few
        # shapes, which `warm` runs once up front, so no request pays a new shape's first-time cost
        # (kernel selection, attention plans) and the eager forward's shapes stay a small set.
        self.bucketed = (device.type == "cuda") if bucketed is None else bucketed
        if self.bucketed and prefill_chunk is None:
            raise UsageError("bucketed prefill needs a prefill chunk")
        # Bucketed groups of prompts run as recorded CUDA graphs (infer/prefill_graphs.py) where the
        # engine records its decode steps; CHATFORGE_PREFILL_GRAPHS=0 runs them eagerly.
        if prefill_graphs is None:
            prefill_graphs = (self.bucketed and engine.cuda_graph and os.environ.get("CHATFORGE_PREFILL_GRAPHS") != "0"
                              and engine.prefill_graphs is not False)  # False: recording failed
        self.graphs = None
        if prefill_graphs:
            if not self.bucketed:
                raise UsageError("prefill graphs need bucketed prefill")
            from chatforge.infer.prefill_graphs import PrefillGraphs

            rows = min(_pow2(min(PREFILL_GROUP, capacity)), PREFILL_GROUP)
            # kept on the engine: prefill does not depend on sampling, so a session for new settings
            # (one engine runs one session at a time) reuses the buffers and graphs recorded before
            shared = engine.prefill_graphs
            if not shared or shared.max_rows < rows:
                shared = engine.prefill_graphs = PrefillGraphs(engine, rows)
            self.graphs = shared
        max_len = -(-(engine.config.sequence_len + 1) // CACHE_ROUND) * CACHE_ROUND  # +1: the scratch slot
        self.cache = KVCache(engine.config, capacity, max_len, device, engine.dtype)
        # Without recorded or compiled steps (the CPU) shapes may change every step, so a step attends
        # over a window of the cache that covers what its rows have written (a multiple of CACHE_ROUND),
        # not the whole context: on a CPU, attention over an unused 2k-position cache dominated the step.
        self.windowed = not engine.cuda_graph and not engine.compile
        self.since = [0] * capacity  # steps each slot has decoded since its prefill: its position's bound
        self.static_in = torch.zeros(capacity, dtype=torch.long, device=device)  # each slot's next input
        self.next_ids = torch.zeros(capacity, dtype=torch.long, device=device)   # each slot's next output
        self.keys = torch.zeros(capacity, dtype=torch.long, device=device)      # each slot's noise key
        self.steps: dict[int, object] = {}  # R -> the step over the first R rows
        self.rows: list[_Row | None] = [None] * capacity
        self.admitted: deque[_Admission] = deque()  # waiting for (the rest of) their prefill, oldest first
        self.reserved: set[int] = set()             # their slots
        self.stop_set = {engine.assistant_end, engine.bos}
        self.cuda = device.type == "cuda"
        self.host_ids = torch.empty(capacity, dtype=torch.long, pin_memory=self.cuda)
        self.arrived = torch.cuda.Event() if self.cuda else None
        self.gpu_marks: list = []  # (phase, start event, end event) not read yet

    # ---- rows joining and leaving -----------------------------------------------------------------

    def free_slots(self) -> int:
        return sum(row is None for row in self.rows) - len(self.reserved)

    def active(self) -> bool:
        return bool(self.reserved) or any(row is not None for row in self.rows)

    def admit(self, prompt: list[int], num_samples: int = 1, max_tokens: int = 256,
              stop_strings: tuple[str, ...] = (), seed: int | None = None) -> list[int]:
        """Take `num_samples` free slots for `prompt`; the next steps prefill it and its first tokens
        come out of the step that finishes that. Returns the slots (a StepToken's `row` names its
        slot). With a seed, the samples are those `Engine.generate(..., seed=seed)` draws."""
        [prompt] = self.engine._check_prompts([prompt], num_samples, max_tokens)
        free = [i for i, row in enumerate(self.rows) if row is None and i not in self.reserved][:num_samples]
        if len(free) < num_samples:  # lowest first: R stays small
            raise UsageError(f"{num_samples} rows asked of a session with {len(free)} free slots")
        self.admitted.append(_Admission(prompt, free, max_tokens, tuple(s for s in stop_strings if s),
                                        seed if seed is not None else random.getrandbits(63)))
        self.reserved.update(free)
        return free

    def release(self, slots: list[int]) -> None:
        """Stop these slots now (a cancelled request); they are free for the next `admit`."""
        for i in slots:
            if i in self.reserved:
                self.reserved.discard(i)
                for a in self.admitted:
                    if i in a.slots:
                        a.released.add(i)
                self.admitted = deque(a for a in self.admitted if len(a.released) < len(a.slots))
                continue
            if self.rows[i] is not None and self.rows[i].tool is not None:
                self.rows[i].tool.cancel()  # a call not started yet is dropped; a running one just ends
            self.rows[i] = None

    # ---- prefill ---------------------------------------------------------------------------------

    def _prefill(self) -> None:
        """Prefill up to `prefill_chunk` tokens of the admitted prompts, oldest first: the fresh ones
        that fit together in one padded forward, else one chunk of the oldest."""
        budget = self.prefill_chunk or float("inf")
        group = []
        while self.admitted and len(group) < PREFILL_GROUP:
            a = self.admitted[0]
            if a.done or len(a.prompt) > budget:
                break
            group.append(self.admitted.popleft())
            budget -= len(a.prompt)
        if group:
            self._prefill_together(group)
        elif self.admitted:
            a = self.admitted[0]
            self._prefill_chunk(a, int(min(budget, len(a.prompt) - a.done)))

    def _forward(self, ids: torch.Tensor, cache, last: torch.Tensor) -> torch.Tensor:
        """(G, V) logits of each row at its position `last[g]`."""
        e = self.engine
        with e._autocast():
            return e.model(ids, kv_cache=cache, logits_at=last)[:, 0]

    def _prefill_together(self, group: list[_Admission]) -> None:
        from chatforge.model.gpt import KVCache

        e, clock = self.engine, _Clock(self.timing)
        lengths = [len(a.prompt) for a in group]
        T, G = max(lengths), len(group)
        if self.bucketed:  # pad to the bucket's shape: rows of one token stand in for the missing prompts
            T, G = self._group_len(T), min(_pow2(G), PREFILL_GROUP)
        rows = [a.prompt + [0] * (T - len(a.prompt)) for a in group] + [[0] * T] * (G - len(group))
        ids = torch.tensor(rows, device=e.device)
        last = torch.tensor(lengths + [1] * (G - len(group)), device=e.device) - 1
        if self.graphs is not None and self.graphs.fits(G, T):
            clock.lap("prefill: inputs and cache (host)")
            small, logits = self.graphs.run(ids, last)  # (G, V)
            clock.lap("prefill: forward launch (host)")
        else:
            small = KVCache(e.config, G, T, e.device, e.dtype)
            clock.lap("prefill: inputs and cache (host)")
            logits = self._forward(ids, small, last)  # (G, V)
            clock.lap("prefill: forward launch (host)")
            small.lengths.copy_(last + 1)  # the padding's keys/values lie past each row's length
        self._start_rows([(a, g) for g, a in enumerate(group)], small, logits)
        clock.lap("prefill: rows started (host)")

    def _group_len(self, longest: int) -> int:
        """Bucketed: the padded length of a group whose longest prompt has `longest` tokens. Within
        the chunk (the group's budget) and the session's cache (its rows are copied there), which a
        prompt, shorter than the context, never exceeds."""
        return min(_pow2(longest, SHORTEST_BUCKET), self.prefill_chunk, self.cache.max_len)

    def _chunk_cache_len(self, prompt_len: int) -> int:
        """A long prompt's own cache: its length, or bucketed, whole chunks (within the session's cache)."""
        if not self.bucketed:
            return prompt_len
        return min(-(-prompt_len // self.prefill_chunk) * self.prefill_chunk, self.cache.max_len)

    def _prefill_chunk(self, a: _Admission, size: int) -> None:
        from chatforge.model.gpt import KVCache

        e = self.engine
        if not self.bucketed and len(a.prompt) - a.done - size == 1:
            size += 1  # never leave a one-token chunk: a one-token forward takes the decode path
        clock = _Clock(self.timing)
        if a.cache is None:
            a.cache = KVCache(e.config, 1, self._chunk_cache_len(len(a.prompt)), e.device, e.dtype)
        # bucketed: every chunk is a whole chunk long (the last one padded), so there is one shape per cache length
        T = min(self.prefill_chunk, a.cache.max_len - a.done) if self.bucketed else size
        ids = torch.tensor([a.prompt[a.done:a.done + size] + [0] * (T - size)], device=e.device)
        clock.lap("prefill: inputs and cache (host)")
        logits = self._forward(ids, a.cache, torch.tensor([size - 1], device=e.device))
        clock.lap("prefill: forward launch (host)")
        a.done += size
        if T != size:
            a.cache.lengths.fill_(a.done)  # the padding's keys/values lie past the prompt
        if a.done == len(a.prompt):
            self.admitted.popleft()
            self._start_rows([(a, 0)], a.cache, logits)
            clock.lap("prefill: rows started (host)")

    def _start_rows(self, started: list[tuple[_Admission, int]], small, logits: torch.Tensor) -> None:
        """Copy prefilled prompts (admission, its row in `small` and `logits`) into their live slots
        and sample their first tokens: one copy and one sampling for the whole group."""
        e = self.engine
        sources, slots, keys = [], [], []
        for a, src in started:
            samples = [j for j, slot in enumerate(a.slots) if slot not in a.released]
            sources += [src] * len(samples)
            slots += [a.slots[j] for j in samples]
            keys.append(row_keys(a.seed, len(a.slots), "cpu")[samples])  # the same keys as on the device
        if slots:
            self.cache.copy_rows(small, sources, slots)
            index = torch.tensor(slots, device=e.device)
            self.keys[index] = torch.cat(keys).to(e.device)
            rows = e._mask_padding(logits.float()[torch.tensor(sources, device=e.device)])  # a copy per sample
            first = sample_next(rows, *self.sampling, keys=self.keys[index], positions=self.cache.lengths[index])
            self.next_ids[index] = first
            self.static_in[index] = first
        for a, _ in started:
            for slot in a.slots:
                if slot not in a.released:
                    self.reserved.discard(slot)
                    self.rows[slot] = _Row(len(a.prompt), a.max_tokens, a.stops)
                    self.since[slot] = 0

    # ---- decoding --------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[StepToken]:
        """Prefill (part of) what was admitted, launch the next decode step, then return the tokens
        the previous one (or a finished prefill) produced for the occupied slots, in slot order.
        Nothing to do without occupied slots."""
        if not self.active():
            return []
        e, timing = self.engine, self.timing
        if self.admitted:
            start = time.perf_counter()
            with self._gpu_mark("gpu prefill"):
                self._prefill()
            timing.add("prefill (host)", time.perf_counter() - start)
        start = time.perf_counter()
        live = {i: row for i, row in enumerate(self.rows) if row is not None}  # the slots copied below
        if not live or not e._wait_for_tools(live, timeout=TOOL_POLL):  # nothing can step: let the caller admit
            return []
        self.host_ids.copy_(self.next_ids, non_blocking=self.cuda)
        if self.cuda:
            self.arrived.record()
        forced = e._feed_forced(live, self.static_in)
        e._hold_waiting(live, self.cache, self.static_in)
        R = min(1 << max(live).bit_length(), self.capacity)  # a power of two above the highest busy slot
        free = [i for i in range(R) if i not in live]
        if free:  # junk stays in the scratch slot, never past the cache
            self.cache.lengths[torch.tensor(free, device=e.device)] = 0
        key = self._build_step(R, self._window(live))
        for i in live:
            self.since[i] += 1
        launched = time.perf_counter()
        with self._gpu_mark("gpu decode"):
            self.steps[key]()
        waited = time.perf_counter()
        if self.cuda:
            self.arrived.synchronize()
        host = self.host_ids.tolist()
        arrived = time.perf_counter()
        out = e._account(live, host, forced, self.stop_set, self.use_tools)
        for t in out:
            if t.done:
                self.rows[t.row] = None
        end = time.perf_counter()
        # on CPU the launch is the forward itself; on CUDA the forward shows as the wait (when the
        # host is ahead) and as "gpu decode"
        timing.add("decode launch", waited - launched)
        timing.add("wait for GPU", arrived - waited)
        timing.add("engine bookkeeping", (launched - start) + (end - arrived), len(out))
        self._read_gpu_marks()
        return out

    def _window(self, live: dict) -> int:
        """The cache positions this step attends over: every live row writes below
        prompt + steps since its prefill + 1; the whole cache where steps keep one shape."""
        if not self.windowed:
            return self.cache.max_len
        need = max(row.prompt_len + self.since[i] for i, row in live.items()) + 2
        return min(-(-need // CACHE_ROUND) * CACHE_ROUND, self.cache.max_len)

    def _build_step(self, R: int, length: int | None = None):
        """The step over the first R rows (and `length` cache positions); returns its key in `steps`."""
        length = length or self.cache.max_len
        key = R if length == self.cache.max_len else (R, length)
        if key not in self.steps:
            cache = self.cache.head(R) if length == self.cache.max_len else self.cache.window(R, length)
            self.steps[key] = self.engine._session_step(cache, self.static_in[:R], self.next_ids[:R],
                                                        self.keys[:R], self.sampling)
        return key

    @torch.inference_mode()
    def warm(self) -> float:
        """Build (compile, capture) the step of every row count a step can take, so no request waits
        on one later; with --compile each is a compile of its own (seconds each on a GPU), so the
        server does this once per session, before the first step. Returns the seconds it took."""
        start = time.perf_counter()
        if any(row is not None for row in self.rows) or self.admitted:
            raise RuntimeError("warm a session before anything is admitted")
        R = 1
        while True:
            R = min(R, self.capacity)
            self._build_step(R)  # free rows only: what it writes, their next prefill overwrites
            if R == self.capacity:
                break
            R *= 2
        self.cache.lengths.zero_()
        if self.bucketed:
            self._warm_prefill()
        return time.perf_counter() - start

    def _warm_prefill(self) -> None:
        """One forward of every shape a bucketed prefill can take (recorded as a graph where it
        fits the prefill graphs' buffers, largest first): groups of G prompts padded to T tokens,
        and a long prompt's whole chunks into each length its own cache can have."""
        from chatforge.model.gpt import KVCache

        e = self.engine
        longest = min(self.prefill_chunk, e.config.sequence_len - 1)  # the longest prompt a group can hold
        group_lengths = {self._group_len(n) for n in range(1, longest + 1)}
        rows = [1 << i for i in range(_pow2(min(PREFILL_GROUP, self.capacity)).bit_length())]
        buckets = [(G, T) for G in rows for T in group_lengths]
        for G, T in sorted(buckets, key=lambda b: -b[0] * b[1]):
            if self.graphs is not None and self.graphs.fits(G, T):
                try:
                    self.graphs.build(G, T)
                    continue
                except Exception as exc:  # noqa: BLE001 - whatever failed, eager prefill still serves
                    print0(f"prefill graphs: recording bucket {G}x{T} failed ({type(exc).__name__}: {exc}); "
                           "prefill runs eagerly (CHATFORGE_PREFILL_GRAPHS=0 skips the attempt)")
                    e.prefill_graphs, self.graphs = False, None  # not tried again on this engine
            cache = KVCache(e.config, G, T, e.device, e.dtype)
            self._forward(torch.zeros(G, T, dtype=torch.long, device=e.device), cache,
                          torch.zeros(G, dtype=torch.long, device=e.device))
        lengths = {self._chunk_cache_len(n) for n in range(self.prefill_chunk + 1, self.engine.config.sequence_len,
                                                           self.prefill_chunk)}
        lengths.add(self._chunk_cache_len(self.engine.config.sequence_len - 1))
        for L in sorted(lengths):
            if L <= self.prefill_chunk:
                continue
            cache = KVCache(e.config, 1, L, e.device, e.dtype)
            for done in {0, (L - 1) // self.prefill_chunk * self.prefill_chunk}:  # whole chunks, and the last
                cache.lengths.fill_(done)
                self._forward(torch.zeros(1, min(self.prefill_chunk, L - done), dtype=torch.long, device=e.device),
                              cache, torch.zeros(1, dtype=torch.long, device=e.device))

    @contextmanager
    def _gpu_mark(self, phase: str):
        """On CUDA, events around the work enqueued in the block; read once they have passed."""
        if not self.cuda:
            yield
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        yield
        end.record()
        self.gpu_marks.append((phase, start, end))

    def _read_gpu_marks(self) -> None:
        while self.gpu_marks and self.gpu_marks[0][2].query():
            phase, start, end = self.gpu_marks.pop(0)
            self.timing.add(phase, start.elapsed_time(end) / 1e3)
