"""Continuous batching: a decode that rows join and leave while it runs (what the server uses).

`Engine.generate` decodes a fixed set of prompts to the end; a server that used only that would
make a request arriving mid-batch wait for the whole batch, and a cancelled request's row would
decode on until its batch ended. A `DecodeSession` instead owns `capacity` rows of one static KV
cache (sized to the model's context, so any prompt fits); `admit` prefills a prompt into the lowest
free slots between steps, `release` frees slots at once, and `step` decodes the occupied rows by one
token.

A step only runs the first R rows, R the smallest power of two that covers every occupied slot:
each R gets its own captured forward + sampling over views of the same cache, so one request alone
decodes as fast as through `generate` (batch 1 is the fastest shape by far on a GPU), and a session
opened for one request still has room for 31 more. Slots are taken lowest first, so R stays small.

How it stays correct with the host a step behind the GPU (see engine.py): `admit` and `release`
only enqueue device work after the step already in flight, on the same stream, so they overwrite
whatever that step wrote for the slot (its cache rows, its length, its sampled id), and a freed or
newly admitted slot's output from a step launched before the change is ignored on the host. Free
slots inside the R rows decode junk at position 0 (their length is reset before every step), as
finished rows do in `generate`. Per-row limits (max_tokens, stop strings) work as in `generate`;
all rows share the session's temperature/top-k/top-p, but each admission has its own seed (noise is
keyed by row and position), so a seeded request gets the same tokens here as alone through
`generate`. A row whose tool call runs waits alone, as in `generate`. One engine runs one session
(or one `generate`) at a time.
"""

from __future__ import annotations

import random

import torch

from chatforge.errors import UsageError
from chatforge.infer.engine import CACHE_ROUND, Engine, StepToken, _Row
from chatforge.infer.sampling import check_sampling_args, row_keys, sample_next

TOOL_POLL = 0.005  # seconds a step waits for a tool when every row waits, before it returns to admit


class DecodeSession:
    @torch.inference_mode()
    def __init__(self, engine: Engine, capacity: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, use_tools: bool = True):
        from chatforge.model.gpt import KVCache

        if capacity < 1:
            raise UsageError(f"a decode session needs at least one slot (got {capacity})")
        check_sampling_args(temperature, top_k, top_p)
        self.engine, self.capacity, self.use_tools = engine, capacity, use_tools
        self.sampling = (temperature, top_k, top_p)
        device = engine.device
        max_len = -(-(engine.config.sequence_len + 1) // CACHE_ROUND) * CACHE_ROUND  # +1: the scratch slot
        self.cache = KVCache(engine.config, capacity, max_len, device, engine.dtype)
        self.static_in = torch.zeros(capacity, dtype=torch.long, device=device)  # each slot's next input
        self.next_ids = torch.zeros(capacity, dtype=torch.long, device=device)   # each slot's next output
        self.keys = torch.zeros(capacity, dtype=torch.long, device=device)      # each slot's noise key
        self.steps: dict[int, object] = {}  # R -> the step over the first R rows
        self.rows: list[_Row | None] = [None] * capacity
        self.stop_set = {engine.assistant_end, engine.bos}
        self.cuda = device.type == "cuda"
        self.host_ids = torch.empty(capacity, dtype=torch.long, pin_memory=self.cuda)
        self.arrived = torch.cuda.Event() if self.cuda else None

    # ---- rows joining and leaving -----------------------------------------------------------------

    def free_slots(self) -> int:
        return sum(row is None for row in self.rows)

    def active(self) -> bool:
        return any(row is not None for row in self.rows)

    @torch.inference_mode()
    def admit(self, prompt: list[int], num_samples: int = 1, max_tokens: int = 256,
              stop_strings: tuple[str, ...] = (), seed: int | None = None) -> list[int]:
        """Prefill `prompt` into `num_samples` free slots; their first tokens come out of the next
        `step`. Returns the slots (a StepToken's `row` names its slot). With a seed, the samples are
        those `Engine.generate(..., seed=seed)` draws for this prompt."""
        e = self.engine
        [prompt] = e._check_prompts([prompt], num_samples, max_tokens)
        free = [i for i, row in enumerate(self.rows) if row is None][:num_samples]  # lowest first: R stays small
        if len(free) < num_samples:
            raise UsageError(f"{num_samples} rows asked of a session with {len(free)} free slots")
        logits = e._prefill_rows(self.cache, [prompt], num_samples, free)
        index = torch.tensor(free, device=e.device)
        self.keys[index] = row_keys(seed if seed is not None else random.getrandbits(63), num_samples, e.device)
        first = sample_next(logits, *self.sampling, keys=self.keys[index], positions=self.cache.lengths[index])
        self.next_ids[index] = first
        self.static_in[index] = first
        stops = tuple(s for s in stop_strings if s)
        for i in free:
            self.rows[i] = _Row(len(prompt), max_tokens, stops)
        return free

    def release(self, slots: list[int]) -> None:
        """Stop these slots now (a cancelled request); they are free for the next `admit`."""
        for i in slots:
            if self.rows[i] is not None and self.rows[i].tool is not None:
                self.rows[i].tool.cancel()  # a call not started yet is dropped; a running one just ends
            self.rows[i] = None

    # ---- decoding --------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[StepToken]:
        """Launch the next decode step, then return the tokens the previous one (or an admission)
        produced for the occupied slots, in slot order. Nothing to do without occupied slots."""
        if not self.active():
            return []
        e = self.engine
        live = {i: row for i, row in enumerate(self.rows) if row is not None}  # the slots copied below
        if not e._wait_for_tools(live, timeout=TOOL_POLL):  # every row still waits: let the caller admit
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
        if R not in self.steps:
            self.steps[R] = e._session_step(self.cache.head(R), self.static_in[:R], self.next_ids[:R],
                                            self.keys[:R], self.sampling)
        self.steps[R]()
        if self.cuda:
            self.arrived.synchronize()
        host = self.host_ids.tolist()
        out = e._account(live, host, forced, self.stop_set, self.use_tools)
        for t in out:
            if t.done:
                self.rows[t.row] = None
        return out
