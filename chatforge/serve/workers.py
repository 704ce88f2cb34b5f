"""Engine replicas behind one request queue: what the server's routes hand their generations to.

Where it sits: `serve/app.py` turns an HTTP request into a `Job` (prompt ids + sampling settings)
and submits it to a `WorkerPool`; one worker thread per replica (one per GPU, or one on CPU) owns an
`Engine` and runs jobs; the job's text comes back to the asyncio side as `Delta`s on its own queue.
`chatforge serve` runs each replica's `WorkerPool` in a process of its own (serve/engine_process.py,
where the jobs' token ids cross a pipe and become text on the server's side); `--engine thread`
and the tests' in-process servers use this pool directly.

Scheduling. A worker takes the oldest waiting job and, with it, every other waiting job that can
share its decode (same temperature, top-k, top-p, stop strings, n and tool use; and unseeded or
greedy, since a seed names a random stream of its own), up to `max_batch` prompts.

By default (continuous batching) the batch opens a `DecodeSession` (infer/session.py) with room
for `max_batch` prompts, and after every decode step the jobs that arrived meanwhile join its free
slots if they share those settings and the oldest waiting job does (so nothing older is
overtaken); a finished row's slot is reused at once. A session steps only as many rows as its busy
slots need, so a lone request decodes at batch-1 speed, and prefills arriving prompts in chunks
between decode steps, so a long prompt never freezes the running streams. With whole batches
(`chatforge serve --scheduling batch`) they run as one `Engine.generate` call to the end, and jobs
that arrive meanwhile wait for the next one.

The decode thread does as little as it can between GPU steps: it counts each row's token and, once
per step, hands every job's new token ids to the event loop in one call (not one per token and
row). Turning ids into text (UTF-8 pieces, tool fences, stop strings) happens there, while the
decode thread waits for the GPU. A stop string the text side finds marks the choice stopped, and
the decode thread frees its row at the next step (the engine, which checks stop strings too, has
normally ended the row already). Where the time goes is summed per phase (`WorkerPool.timing_report`).

Either way each job ends at its own `max_tokens`, and rows never see each other's tokens, so a
request's text is what it would be alone (greedy outputs are checked equal to solo runs in the
tests). A seeded sampling request always runs alone through `Engine.generate`.

Disconnects. A route that loses its client calls `Job.cancel()`: a waiting job no longer counts
against --max-queue and is dropped when its turn comes; a running job stops receiving tokens, and
when every job of a batch is cancelled or finished the batch's generation is abandoned at once. In a
session, a cancelled job's slots are freed after the current step, for the next request.
`WorkerPool.busy_slots()` counts the rows decoding for jobs neither finished nor cancelled.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from chatforge.errors import ChatforgeError, UsageError
from chatforge.infer.engine import Engine
from chatforge.infer.reply import ReplyEvent, ReplyParser
from chatforge.infer.session import DecodeSession
from chatforge.infer.timing import TimeSpent, merge_reports
from chatforge.runtime import print0

# How a tool call is shown in plain text (the API's `content`): Markdown code fences.
OPEN_SHOWN = {"python": "\n```python\n", "python_output": "\n```output\n"}
CLOSE_SHOWN = "\n```\n"
SWITCH_INTERVAL = 2e-4  # seconds a thread holds the GIL while another waits (Python's default: 5e-3)


@dataclass
class Piece:
    """A bit of one reply. kind: text / python / python_output; text: its raw characters (what a
    conversation part holds); shown: the same in readable form, with fences around tool blocks."""
    kind: str
    text: str
    shown: str
    open: bool = False  # this piece starts a new tool block


@dataclass
class Delta:
    """What a job's queue receives: new pieces of choice `choice`, or its end (finish_reason set),
    or a failure of the whole job (error set)."""
    choice: int = 0
    pieces: list[Piece] = field(default_factory=list)
    finish_reason: str | None = None
    error: Exception | None = None


class PartStream:
    """Token ids of one reply -> Pieces: the reply's parts (infer/reply.py) with fences shown."""

    def __init__(self, engine: Engine):
        self.parser = ReplyParser(engine.tokenizer)

    def push(self, token: int) -> list[Piece]:
        return [self._piece(e) for e in self.parser.push(token)]

    def push_tokens(self, tokens: list[int]) -> list[Piece]:
        """Pieces of several tokens, runs of plain text joined into one piece."""
        out: list[Piece] = []
        for token in tokens:
            for e in self.parser.push(token):
                piece = self._piece(e)
                last = out[-1] if out else None
                if (last is not None and piece.kind == last.kind and not piece.open and not last.open
                        and piece.text and last.text and last.shown == last.text):
                    last.text += piece.text
                    last.shown = last.text
                else:
                    out.append(piece)
        return out

    def finish(self) -> list[Piece]:
        return [self._piece(e) for e in self.parser.finish()]

    @staticmethod
    def _piece(event: ReplyEvent) -> Piece:
        if event.event == "open":
            return Piece(event.kind, "", OPEN_SHOWN[event.kind], open=True)
        if event.event == "close":
            return Piece(event.kind, "", CLOSE_SHOWN)
        return Piece(event.kind, event.text, event.text)


class StopFilter:
    """Holds back the tail of a reply's text that could begin a stop string, and cuts the reply
    just before the first stop string (OpenAI leaves the stop sequence out of the reply)."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.keep = max((len(s) for s in self.stops), default=1) - 1
        self.held = ""

    def push(self, piece: Piece) -> tuple[list[Piece], bool]:
        """(pieces safe to send, whether a stop string was reached)."""
        if not self.stops:
            return [piece], False
        if piece.kind != "text":
            return self.flush() + [piece], False
        self.held += piece.text
        hits = [i for i in (self.held.find(s) for s in self.stops) if i >= 0]
        if hits:
            text, self.held = self.held[:min(hits)], ""
            return ([Piece("text", text, text)] if text else []), True
        cut = max(len(self.held) - self.keep, 0)
        text, self.held = self.held[:cut], self.held[cut:]
        return ([Piece("text", text, text)] if text else []), False

    def flush(self) -> list[Piece]:
        text, self.held = self.held, ""
        return [Piece("text", text, text)] if text else []


@dataclass
class Job:
    """One chat completion request: a prompt, its settings, and the queue its Deltas go to."""
    prompt: list[int]
    max_tokens: int
    n: int = 1
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    use_tools: bool = True
    loop: asyncio.AbstractEventLoop | None = None
    queue: asyncio.Queue | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    loop_timing: TimeSpent | None = None  # where the event loop's share of the work is summed
    completion_tokens: int = 0   # tokens generated over all choices (tool output included)
    finished: int = 0            # choices that have ended (an error ends them all)
    ttft: float | None = None    # seconds from submit to the first token
    submitted: float = field(default_factory=time.perf_counter)
    stopped: set = field(default_factory=set)  # choices whose text reached a stop string (engine process side)
    # Set when the job runs in an engine process (serve/engine_process.py). There: `outlet` takes its
    # tokens and errors, `remote_id` names it to the server process. Here: `on_cancel` tells the
    # engine process the client left; `on_stop(choice)` that the text side reached a stop string.
    outlet: object = None
    remote_id: int | None = None
    on_cancel: object = None
    on_stop: object = None

    def batch_key(self):
        """Jobs with equal keys can share one generate call; None: this job runs alone."""
        if self.seed is not None and self.temperature > 0:
            return None
        return (self.n, self.temperature, self.top_k, self.top_p, self.stop, self.use_tools)

    def cancel(self) -> None:
        if self.cancelled.is_set():
            return
        self.cancelled.set()
        if self.on_cancel is not None:
            self.on_cancel()

    def live_rows(self) -> int:
        """Rows still decoding for a client that is still there (0 once it left: the worker drops
        a cancelled job's rows at its next step)."""
        return 0 if self.cancelled.is_set() else max(self.n - self.finished, 0)

    def count_finish(self, delta: Delta) -> None:
        """Note the choices a delta ends (an error ends them all), for the busy-slot count."""
        if delta.error is not None:
            self.finished = self.n
        elif delta.finish_reason:
            self.finished += 1

    def send(self, delta: Delta) -> None:
        """Called from a worker thread: hand the delta to the job's asyncio queue (errors; tokens go
        through `_Outbox`, once per step for all jobs)."""
        self.count_finish(delta)
        if self.outlet is not None:
            self.outlet.error(self.remote_id, delta.error)
        elif self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.queue.put_nowait, delta)


class QueueFull(ChatforgeError):
    """More requests are waiting than --max-queue allows; the client should retry later."""


class EngineUnavailable(ChatforgeError):
    """The replica's engine process has exited; nothing can be generated until the server restarts."""


class JobQueue:
    """FIFO of waiting jobs from which a worker takes the oldest plus the jobs that can batch with it."""

    def __init__(self, max_waiting: int):
        self.max_waiting = max_waiting
        self.jobs: deque[Job] = deque()
        self.cond = threading.Condition()
        self.closed = False
        self.on_taken = None  # called with the jobs each take hands out (an engine process reports them)

    def _taken(self, jobs: list[Job]) -> list[Job]:
        if jobs and self.on_taken is not None:
            self.on_taken(jobs)
        return jobs

    def put(self, job: Job) -> None:
        with self.cond:
            if len(self.jobs) >= self.max_waiting:  # requests whose clients left hold no place
                self.jobs = deque(j for j in self.jobs if not j.cancelled.is_set())
            if len(self.jobs) >= self.max_waiting:
                raise QueueFull(f"{len(self.jobs)} requests are already waiting (--max-queue {self.max_waiting}); "
                                "retry in a moment")
            self.jobs.append(job)
            self.cond.notify()

    def take(self, max_batch: int, timeout: float) -> list[Job]:
        """The oldest live job and up to max_batch - 1 prompts' worth of compatible ones; [] on timeout."""
        with self.cond:
            self.cond.wait_for(lambda: self.jobs or self.closed, timeout=timeout)
            while self.jobs and self.jobs[0].cancelled.is_set():
                self.jobs.popleft()
            if not self.jobs:
                return []
            first = self.jobs.popleft()
            batch, key = [first], first.batch_key()
            if key is not None:
                for job in list(self.jobs):
                    if len(batch) >= max_batch:
                        break
                    if job.cancelled.is_set():
                        self.jobs.remove(job)
                    elif job.batch_key() == key:
                        self.jobs.remove(job)
                        batch.append(job)
            return self._taken(batch)

    def take_compatible(self, key, free_rows: int) -> list[Job]:
        """Without waiting: the oldest jobs that share `key` and fit in `free_rows` rows. Stops at the
        first job that does not, so a running session never overtakes an older incompatible job."""
        taken = []
        with self.cond:
            while self.jobs:
                job = self.jobs[0]
                if job.cancelled.is_set():
                    self.jobs.popleft()
                    continue
                if key is None or job.batch_key() != key or job.n > free_rows:
                    break
                taken.append(self.jobs.popleft())
                free_rows -= job.n
        return self._taken(taken)

    def waiting(self) -> int:
        """Waiting requests whose clients are still there."""
        with self.cond:
            return sum(not job.cancelled.is_set() for job in self.jobs)

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()


class WorkerPool:
    """One thread per engine replica, all taking jobs from one JobQueue."""

    def __init__(self, engines: list[Engine], max_batch: int = 32, max_queue: int = 256, continuous: bool = True):
        if not engines:
            raise UsageError("the server needs at least one engine replica")
        if max_batch < 1:
            raise UsageError(f"--max-batch {max_batch} must be at least 1")
        self.engines = engines
        self.max_batch = max_batch
        self.continuous = continuous
        self.sessions: list[DecodeSession | None] = [None] * len(engines)  # per replica, kept for reuse
        self.queue = JobQueue(max_queue)
        self.running = [False] * len(engines)  # per replica: generating now (each thread writes its own)
        self.timing = [TimeSpent() for _ in engines]  # per replica: its decode thread's phases
        self.loop_timing = TimeSpent()  # the event loop's share: text of the tokens, SSE chunks
        # The decode thread gives up the GIL in every torch call and at each hand-off; with Python's
        # default 5 ms switch interval it then waits up to 5 ms for the busy event loop to hand it
        # back, longer than a whole decode step (measured: ~1 ms per token at one stream on CPU).
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL))
        self.serving: list[list[Job]] = [[] for _ in engines]  # per replica: the jobs its current call took
        self._stop = threading.Event()
        self.threads = [threading.Thread(target=self._serve, args=(i, e), name=f"chatforge-replica-{i}", daemon=True)
                        for i, e in enumerate(engines)]
        for t in self.threads:
            t.start()

    @property
    def engine(self) -> Engine:
        return self.engines[0]

    def submit(self, job: Job) -> None:
        """Queue a job; its Deltas arrive on job.queue (created here, on the caller's event loop)."""
        job.loop = asyncio.get_running_loop()
        job.queue = asyncio.Queue()
        job.loop_timing = self.loop_timing
        self.queue.put(job)

    def close(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self.queue.close()
        for t in self.threads:
            t.join(timeout)

    def busy(self) -> int:
        return sum(self.running)

    def waiting(self) -> int:
        return self.queue.waiting()

    def timing_report(self) -> dict:
        """Seconds and counts per phase since start, all replicas and the event loop together."""
        return merge_reports([t.report() for t in self.timing] + [self.loop_timing.report()])

    def busy_slots(self) -> int:
        """Rows the replicas decode for requests whose clients are still there."""
        return sum(job.live_rows() for jobs in list(self.serving) for job in list(jobs))

    def _serve(self, index: int, engine: Engine) -> None:
        import torch

        if engine.device.type == "cuda" and torch.cuda.is_available():
            # a new thread's current device is GPU 0; graph recording, streams and events follow it
            torch.cuda.set_device(engine.device)
        if self.continuous and engine.device.type == "cuda":  # the API's default settings, ready before any request
            try:
                self.sessions[index] = new_session(engine, self.max_batch, (1.0, None, None), True, self.timing[index])
            except Exception as exc:  # the replica lives on: a request's own session tries again and fails it
                print0(f"serve: replica {index}'s warm-up failed ({type(exc).__name__}: {exc}); requests will try again")
        while not self._stop.is_set():
            batch = self.queue.take(self.max_batch, timeout=0.5)
            if not batch:
                continue
            self.running[index] = True
            jobs = list(batch)  # every job this call serves (a session admits more as it runs)
            self.serving[index] = jobs
            in_session = self.continuous and batch[0].batch_key() is not None
            try:
                if not in_session:
                    run_batch(engine, batch, self.timing[index])
                else:
                    self.sessions[index] = run_session(engine, batch, self.queue, self.max_batch, self._stop, jobs,
                                                       self.sessions[index], self.timing[index])
            except Exception as exc:  # a failed batch fails its requests, never the replica
                if in_session:  # its slots may still hold the failed jobs' rows: no later batch may inherit them
                    self.sessions[index] = None
                if not isinstance(exc, ChatforgeError):
                    print0(f"serve: a batch of {len(jobs)} failed: {type(exc).__name__}: {exc}")
                for job in jobs:
                    job.send(Delta(error=exc))
            finally:
                self.running[index] = False
                self.serving[index] = []


class _Choice:
    """Per-row state of a running job. The decode thread counts its tokens and decides when it ends;
    its text (PartStream, StopFilter) is made on the job's event loop, in `text`."""

    def __init__(self, engine: Engine, job: Job, index: int):
        self.job, self.index = job, index
        self.parts = PartStream(engine)
        self.stops = StopFilter(list(job.stop))
        self.generated = 0
        self.done = False      # decode thread: nothing more is sent
        self.stopped = False   # text side: a stop string was reached; the decode thread frees the row
        self.finished = False  # text side: the finish delta went out

    def over(self) -> bool:
        """Whether the decode thread should stop feeding this choice (and free its row)."""
        return self.done or self.stopped or self.job.cancelled.is_set() or self.index in self.job.stopped

    def text(self, tokens: list[int], reason: str | None) -> Delta | None:
        """The Delta for some new tokens of this choice (and its end, when `reason`)."""
        if self.finished:
            return None
        out = []
        for piece in self.parts.push_tokens(tokens):
            sent, hit = self.stops.push(piece)
            out += sent
            if hit:  # nothing after a stop string is sent
                self.stopped, reason = True, "stop"
                break
        if reason is not None:
            self.finished = True
            if not self.stopped:
                for piece in self.parts.finish():
                    out += self.stops.push(piece)[0]
                out += self.stops.flush()
        return Delta(self.index, out, reason) if out or reason else None


class _Outbox:
    """One decode step's tokens for every job, handed to the event loop in one call."""

    def __init__(self, timing: TimeSpent):
        self.timing = timing
        self.tokens: dict[_Choice, list] = {}  # choice -> [token ids, finish reason]

    def add(self, choice: _Choice, token: int, engine_reason: str | None, now: float) -> None:
        """Count one token of a choice; marks the choice done when its reply ended."""
        job = choice.job
        if job.ttft is None:
            job.ttft = now - job.submitted
        job.completion_tokens += 1
        choice.generated += 1
        reason = None
        if engine_reason is not None:
            reason = "stop" if engine_reason == "stop" else "length"
        elif choice.generated >= job.max_tokens:
            reason = "length"
        if reason is not None:
            choice.done = True
        entry = self.tokens.get(choice)
        if entry is None:
            self.tokens[choice] = [[token], reason]
        else:
            entry[0].append(token)
            entry[1] = reason

    def flush(self) -> None:
        if not self.tokens:
            return
        start = time.perf_counter()
        by_loop: dict = {}
        remote: dict = {}
        for choice, (tokens, reason) in self.tokens.items():
            job = choice.job
            if job.outlet is not None:  # in an engine process: the ids go to the server process as they are
                remote.setdefault(job.outlet, []).append((job.remote_id, choice.index, tokens, reason))
            else:
                by_loop.setdefault(job.loop, []).append((choice, tokens, reason))
        self.tokens = {}
        for outlet, items in remote.items():
            outlet.tokens(items)
        for loop, items in by_loop.items():
            if loop is None:  # no event loop: a direct caller (tests) gets its deltas here, in order
                _emit(items)
            elif not loop.is_closed():
                loop.call_soon_threadsafe(_emit, items)
        self.timing.add("hand-off to the event loop", time.perf_counter() - start)


def _emit(items: list) -> None:
    """On the jobs' event loop: turn each choice's new ids into pieces and queue the Delta."""
    start = time.perf_counter()
    count = 0
    for choice, tokens, reason in items:
        count += len(tokens)
        was_stopped = choice.stopped
        delta = choice.text(tokens, reason)
        job = choice.job
        if choice.stopped and not was_stopped and job.on_stop is not None:
            job.on_stop(choice.index)  # the engine process frees the row
        if delta is None:
            continue
        if job.loop is None:
            job.send(delta)
        else:
            job.count_finish(delta)
            job.queue.put_nowait(delta)
    timing = items[0][0].job.loop_timing
    if timing is not None:
        timing.add("detokenize + stop strings (event loop)", time.perf_counter() - start, count)


def run_batch(engine: Engine, batch: list[Job], timing: TimeSpent | None = None) -> None:
    """Generate for a batch of compatible jobs, sending each choice's pieces as they come."""
    timing = timing or TimeSpent()
    first = batch[0]
    n = first.n
    choices = [_Choice(engine, job, j) for job in batch for j in range(n)]  # row order = engine's rows
    outbox = _Outbox(timing)
    stream = engine.generate([job.prompt for job in batch], num_samples=n,
                             max_tokens=max(job.max_tokens for job in batch), temperature=first.temperature,
                             top_k=first.top_k, top_p=first.top_p, seed=first.seed,
                             stop_strings=list(first.stop), use_tools=first.use_tools)
    try:
        while True:
            start = time.perf_counter()
            step = next(stream, None)
            now = time.perf_counter()
            timing.add("engine step (whole batches)", now - start)
            if step is None:
                break
            for t in step:
                choice = choices[t.row]
                if choice.over():
                    choice.done = True
                    continue
                outbox.add(choice, t.token, t.finish_reason if t.done else None, now)
            timing.add("worker bookkeeping", time.perf_counter() - now, len(step))
            outbox.flush()
            if all(c.over() for c in choices):
                break
    finally:
        stream.close()


def new_session(engine: Engine, capacity: int, sampling: tuple, use_tools: bool, timing: TimeSpent) -> DecodeSession:
    """A DecodeSession for these settings; on CUDA with every step shape built up front, so the
    compile and graph capture of a new row count never stall the streams already running."""
    session = DecodeSession(engine, capacity, *sampling, use_tools, timing=timing)
    if engine.device.type == "cuda":
        timing.add("warm-up (compile, capture)", session.warm())
    return session


def run_session(engine: Engine, batch: list[Job], queue: JobQueue, max_batch: int, stop: threading.Event,
                served: list[Job], previous: DecodeSession | None = None,
                timing: TimeSpent | None = None) -> DecodeSession:
    """Continuous batching: decode `batch` in a DecodeSession and, whenever slots are free, admit
    the compatible jobs that arrived meanwhile; a cancelled job's slots are freed at once. Returns
    when no slot is busy, with the session, which the next call reuses (its captured steps too) when
    the settings match. Every job taken is appended to `served`."""
    timing = timing or TimeSpent()
    first = batch[0]
    key, n = first.batch_key(), first.n
    settings = (max_batch * n, (first.temperature, first.top_k, first.top_p), first.use_tools)
    if previous is not None and (previous.capacity, previous.sampling, previous.use_tools) == settings:
        session = previous
        session.timing = timing
    else:
        session = new_session(engine, max_batch * n, settings[1], first.use_tools, timing)
    choices: dict[int, _Choice] = {}  # slot -> the choice decoding there
    outbox = _Outbox(timing)

    def admit(job: Job) -> None:
        try:
            taken = session.admit(job.prompt, job.n, job.max_tokens, job.stop)
        except ChatforgeError as exc:  # this request's own fault (e.g. a prompt over the context): only it fails
            job.send(Delta(error=exc))
            return
        for j, slot in enumerate(taken):
            choices[slot] = _Choice(engine, job, j)

    for job in batch:
        admit(job)
    while not stop.is_set():
        step = session.step()
        now = time.perf_counter()
        for t in step:
            choice = choices[t.row]
            if not choice.over():
                outbox.add(choice, t.token, t.finish_reason if t.done else None, now)
            if t.done:  # the engine ended the row and freed its slot
                del choices[t.row]
        ended = [slot for slot, c in choices.items() if c.over()]
        if ended:  # cut short on our side (a stop string, a cancelled request): free the slots now
            session.release(ended)
            for slot in ended:
                del choices[slot]
        timing.add("worker bookkeeping", time.perf_counter() - now, len(step))
        outbox.flush()
        if not session.active():
            return session
        free = session.free_slots()
        if free:
            start = time.perf_counter()
            for job in queue.take_compatible(key, free):
                served.append(job)
                admit(job)
            timing.add("admission", time.perf_counter() - start)
    return session
