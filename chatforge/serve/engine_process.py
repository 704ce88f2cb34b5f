"""Engine replicas in processes of their own: the decode loop never waits on the HTTP side's GIL.

Why: in one process the decode thread shares the GIL with the event loop. Every torch call gives
the GIL up, and under load the busy event loop (HTTP parsing, SSE writes, text) holds it for up to
the switch interval before handing it back. A CUDA-graph decode step is one call and barely
notices, but an eager prefill is hundreds of calls: measured on CPU, a depth-4 forward took 22 ms
alone and 93 ms beside one busy Python thread; on the H200 each prefill took ~200 ms at 32 streams
and decode steps stretched the same way on CPU. So `chatforge serve` runs each replica's
`WorkerPool` (serve/workers.py, unchanged: queue, sessions, scheduling) in a spawned process that
owns the GPU, and the server process keeps what is cheap per token: HTTP, text and SSE.

The two sides talk over one pipe per replica, in small pickled tuples:

    server -> engine   ("submit", id, prompt, settings...)  ("cancel", id)  ("stop", id, choice)
                       ("timing?",)  ("close",)
    engine -> server   ("ready", EngineInfo) or ("failed", error)  ("taken", [ids])
                       ("tokens", [(id, choice, token ids, finish reason), ...])  once per decode step
                       ("error", id, exception)  ("timing", {phase: {"s", "n"}})  when asked, and
                                                                         every TIMING_EVERY s

Token ids become text on the server's event loop exactly as with the thread pool (`_Choice`,
`_emit`), so replies are the same either way (tests compare both). A job whose client leaves sends
"cancel" and its row is freed at the engine's next step; a stop string found by the text side sends
"stop". An engine process that dies fails its requests with one line and the server answers 503
for new ones; a load error (a missing checkpoint) is raised in the server process as it was in the
child. The engine process ignores Ctrl-C (the server stops it) and exits when the pipe closes, so
it never outlives the server.

`ProcessPool` has the interface of `WorkerPool` that serve/app.py uses; a replica is built in its
process by `recipe(index)` (a picklable function: load a checkpoint onto GPU `index`, build random
weights, ...).
"""

from __future__ import annotations

import asyncio
import atexit
import itertools
import multiprocessing
import pickle
import signal
import sys
import threading
import time
import weakref
from dataclasses import dataclass, field

from chatforge.errors import ChatforgeError, UsageError
from chatforge.infer.timing import TimeSpent, merge_reports
from chatforge.runtime import print0
from chatforge.serve.guard import resident_bytes
from chatforge.serve.workers import (SWITCH_INTERVAL, Delta, EngineUnavailable, Job, QueueFull, WorkerPool, _Choice,
                                     _emit)

TIMING_EVERY = 0.25  # seconds between the engine's timing reports (/health reads the latest)
ENGINE_QUEUE = 1 << 30  # the engine process queues all it is sent: the server enforces --max-queue


@dataclass
class EngineInfo:
    """What the server process needs of a replica it does not hold: the tokenizer (prompts, text)
    and what it reports."""
    tokenizer: object
    config: object  # the model's GPTConfig (its context, as an Engine's)
    meta: dict
    device: str
    compile: bool


def _portable(exc: BaseException) -> BaseException:
    """The exception itself if it crosses a pipe, else one that keeps its type's name and message."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        kind = ChatforgeError if isinstance(exc, ChatforgeError) else RuntimeError
        return kind(f"{type(exc).__name__}: {exc}")


# ---- the engine process ---------------------------------------------------------------------------

class _Outlet:
    """Where an engine process's jobs send what they produce: the pipe to the server."""

    def __init__(self, send):
        self.send = send

    def tokens(self, items: list) -> None:
        self.send(("tokens", items))

    def error(self, job_id: int, exc: BaseException) -> None:
        self.send(("error", job_id, _portable(exc)))


def _engine_main(conn, recipe, index: int, max_batch: int, continuous: bool) -> None:
    """The engine process: build replica `index`, then serve the jobs the pipe brings until it closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the server stops us
    lock = threading.Lock()

    def send(message) -> None:
        with lock:  # the decode thread and this one both send
            conn.send(message)

    try:
        engine = recipe(index)
        info = EngineInfo(engine.tokenizer, engine.config, dict(getattr(engine, "meta", {}) or {}),
                          str(engine.device), bool(engine.compile))
    except BaseException as exc:  # noqa: BLE001 - whatever stopped the load is the server's error too
        send(("failed", _portable(exc)))
        return
    pool = WorkerPool([engine], max_batch=max_batch, max_queue=ENGINE_QUEUE, continuous=continuous)
    pool.queue.on_taken = lambda jobs: send(("taken", [job.remote_id for job in jobs]))
    outlet = _Outlet(send)
    jobs: weakref.WeakValueDictionary[int, Job] = weakref.WeakValueDictionary()  # id -> job still held by the pool
    send(("ready", info))
    last_report = 0.0
    try:
        while True:
            message = ("idle",)
            if conn.poll(TIMING_EVERY):
                message = conn.recv()
                kind = message[0]
                if kind == "submit":
                    _, job_id, prompt, max_tokens, n, temperature, top_k, top_p, seed, stop, use_tools = message
                    job = Job(prompt=prompt, max_tokens=max_tokens, n=n, temperature=temperature, top_k=top_k,
                              top_p=top_p, seed=seed, stop=stop, use_tools=use_tools, outlet=outlet,
                              remote_id=job_id)
                    jobs[job_id] = job
                    pool.queue.put(job)
                elif kind == "cancel":
                    job = jobs.pop(message[1], None)
                    if job is not None:
                        job.cancel()
                elif kind == "stop":
                    job = jobs.get(message[1])
                    if job is not None:
                        job.stopped.add(message[2])
                elif kind == "close":
                    break
            now = time.monotonic()
            if now - last_report >= TIMING_EVERY or message[0] == "timing?":
                send(("timing", pool.timing_report()))
                last_report = now
    except (EOFError, OSError):  # the server process is gone
        pass
    finally:
        pool.close()


# ---- the server process ---------------------------------------------------------------------------

@dataclass
class _Replica:
    index: int
    process: object
    conn: object
    info: EngineInfo | None = None
    alive: bool = True
    waiting: set = field(default_factory=set)  # ids sent, not taken yet
    running: set = field(default_factory=set)  # ids taken, not over yet
    timing: dict = field(default_factory=dict)
    reported: threading.Event = field(default_factory=threading.Event)  # a timing report came since cleared
    lock: threading.Lock = field(default_factory=threading.Lock)  # one sender at a time


class ProcessPool:
    """`WorkerPool`'s interface, with each replica's decode loop in a process of its own.

    `recipe(i)` builds replica i's Engine in its process (it must be picklable: a module-level
    function or a functools.partial of one). Blocks until every replica has loaded; a load error
    is raised here."""

    def __init__(self, recipe, replicas: int = 1, max_batch: int = 32, max_queue: int = 256,
                 continuous: bool = True):
        if max_batch < 1:
            raise UsageError(f"--max-batch {max_batch} must be at least 1")
        self.max_batch, self.max_queue = max_batch, max_queue
        self.loop_timing = TimeSpent()  # the event loop's share: text of the tokens, SSE chunks
        self.jobs: dict[int, Job] = {}  # id -> job not over yet
        self.choices: dict[tuple[int, int], _Choice] = {}  # (id, choice) -> its text side
        self.over: set[tuple[int, int]] = set()  # (id, choice) that send nothing more
        self.registry = threading.Lock()  # jobs, choices, over, replicas' waiting and running: readers and event loop change them
        self.ids = itertools.count()
        self.closing = False
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL))  # the readers hand tokens on promptly
        context = multiprocessing.get_context("spawn")  # CUDA cannot be forked; nor can a process with threads
        self.replicas: list[_Replica] = []
        try:
            for i in range(replicas):
                ours, theirs = context.Pipe()
                # not a daemon: a daemon may not start processes of its own (compile workers might); it
                # still never outlives us, since it exits when the pipe closes, and close() runs at exit
                process = context.Process(target=_engine_main, args=(theirs, recipe, i, max_batch, continuous),
                                          name=f"chatforge-engine-{i}")
                process.start()
                theirs.close()
                self.replicas.append(_Replica(i, process, ours))
            for r in self.replicas:  # loaded in parallel, reported in order
                r.info = self._await_ready(r)
        except BaseException:
            self.close()
            raise
        self.engines = [r.info for r in self.replicas]
        atexit.register(self.close)  # before multiprocessing's own exit hook joins the engine processes
        self.readers = [threading.Thread(target=self._read, args=(r,), name=f"chatforge-engine-reader-{r.index}",
                                         daemon=True) for r in self.replicas]
        for t in self.readers:
            t.start()

    @property
    def engine(self) -> EngineInfo:
        return self.engines[0]

    def _await_ready(self, r: _Replica) -> EngineInfo:
        try:
            message = r.conn.recv()
        except (EOFError, OSError):
            r.process.join(5)
            raise ChatforgeError(f"the engine process of replica {r.index} exited while loading (exit code "
                                 f"{r.process.exitcode}); its error is in the log above") from None
        if message[0] == "failed":
            raise message[1]
        return message[1]

    # ---- what serve/app.py calls ------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        """Queue a job; its Deltas arrive on job.queue (created here, on the caller's event loop)."""
        if self.waiting() >= self.max_queue:
            raise QueueFull(f"{self.waiting()} requests are already waiting (--max-queue {self.max_queue}); "
                            "retry in a moment")
        live = [r for r in self.replicas if r.alive]
        if not live:
            raise EngineUnavailable("the engine process has exited (its error is in the server's log); "
                                    "restart the server")
        job.loop = asyncio.get_running_loop()
        job.queue = asyncio.Queue()
        job.loop_timing = self.loop_timing
        job_id = next(self.ids)
        r = min(live, key=self._load)  # the replica with the fewest rows waiting or decoding
        job.remote_id = job_id
        job.on_cancel = lambda: self._cancel(r, job_id)
        job.on_stop = lambda choice: self._stop(r, job_id, choice)
        with self.registry:  # its reader fails the jobs it holds once it sees the engine die: this one, or none
            if not r.alive:
                raise EngineUnavailable(f"the engine process of replica {r.index} has exited; restart the server")
            self.jobs[job_id] = job
            r.waiting.add(job_id)
        try:
            self._send(r, ("submit", job_id, job.prompt, job.max_tokens, job.n, job.temperature, job.top_k,
                           job.top_p, job.seed, tuple(job.stop), job.use_tools))
        except (OSError, ValueError):  # it died just now; its reader will say so in the log
            with self.registry:
                self._forget(r, job_id, job.n)
            raise EngineUnavailable(f"the engine process of replica {r.index} has exited; restart the server") \
                from None

    def waiting(self) -> int:
        """Requests sent to an engine and not taken yet, whose clients are still there."""
        return sum(1 for r in self.replicas for i in list(r.waiting)
                   if (job := self.jobs.get(i)) is not None and not job.cancelled.is_set())

    def busy(self) -> int:
        return sum(1 for r in self.replicas if r.running)

    def busy_slots(self) -> int:
        return sum(job.live_rows() for r in self.replicas for i in list(r.running)
                   if (job := self.jobs.get(i)) is not None)

    def engine_resident_bytes(self) -> int | None:
        """The engine processes' resident memory together (Linux), else None."""
        sizes = [resident_bytes(r.process.pid) for r in self.replicas if r.alive]
        return sum(sizes) if sizes and None not in sizes else None

    def timing_report(self, wait: float = 1.0) -> dict:
        """Seconds and counts per phase since start, every engine's and the event loop's: each engine
        is asked for its report as of now (waiting up to `wait` seconds; blocks, so call it off the
        event loop), else its latest periodic one is used."""
        asked = []
        for r in self.replicas:
            if r.alive:
                r.reported.clear()
                try:
                    self._send(r, ("timing?",))
                    asked.append(r)
                except (OSError, ValueError):
                    pass
        deadline = time.monotonic() + wait
        for r in asked:
            r.reported.wait(max(deadline - time.monotonic(), 0))
        return merge_reports([r.timing for r in self.replicas] + [self.loop_timing.report()])

    def close(self, timeout: float = 10.0) -> None:
        if self.closing:
            return
        self.closing = True
        for r in self.replicas:
            try:
                self._send(r, ("close",))
            except (OSError, ValueError):
                pass
        for r in self.replicas:
            r.process.join(timeout)
            if r.process.is_alive():
                r.process.terminate()
                r.process.join(timeout)
            r.conn.close()

    # ---- inside -----------------------------------------------------------------------------------

    def _load(self, r: _Replica) -> int:
        return sum(job.live_rows() if i in r.running else job.n
                   for i in list(r.waiting | r.running) if (job := self.jobs.get(i)) is not None)

    def _send(self, r: _Replica, message) -> None:
        if not r.alive:
            return
        with r.lock:
            r.conn.send(message)

    def _cancel(self, r: _Replica, job_id: int) -> None:
        with self.registry:
            job = self.jobs.get(job_id)
            if job is None:
                return  # over already
            self._forget(r, job_id, job.n)
        try:
            self._send(r, ("cancel", job_id))
        except (OSError, ValueError):
            pass

    def _read(self, r: _Replica) -> None:
        """One replica's messages, in order, handed to the jobs' event loops."""
        while True:
            try:
                message = r.conn.recv()
            except (EOFError, OSError):
                self._lost(r)
                return
            kind = message[0]
            if kind == "tokens":
                self._tokens(r, message[1])
            elif kind == "taken":
                with self.registry:  # a job the event loop forgets meanwhile must not come back as running
                    for i in message[1]:
                        if i in r.waiting:
                            r.waiting.discard(i)
                            r.running.add(i)
            elif kind == "timing":
                r.timing = message[1]
                r.reported.set()
            elif kind == "error":
                with self.registry:
                    job = self.jobs.get(message[1])
                    if job is not None:
                        self._forget(r, message[1], job.n)
                if job is not None:
                    job.send(Delta(error=message[2]))

    def _tokens(self, r: _Replica, items: list) -> None:
        now = time.perf_counter()
        by_loop: dict = {}
        with self.registry:  # a choice made for a job the event loop forgets meanwhile would stay forever
            for job_id, index, tokens, reason in items:
                job = self.jobs.get(job_id)
                key = (job_id, index)
                if job is None or key in self.over:  # cancelled, or stopped by its text, meanwhile
                    continue
                if job.ttft is None:
                    job.ttft = now - job.submitted
                job.completion_tokens += len(tokens)
                choice = self.choices.get(key)
                if choice is None:
                    choice = self.choices[key] = _Choice(self.engine, job, index)
                if reason is not None:
                    self._over(r, job_id, index)
                by_loop.setdefault(job.loop, []).append((choice, tokens, reason))
        for loop, batch in by_loop.items():
            if not loop.is_closed():
                loop.call_soon_threadsafe(_emit, batch)

    def _stop(self, r: _Replica, job_id: int, index: int) -> None:
        """On the event loop: a choice's text reached a stop string; the engine frees its row."""
        self._choice_over(r, job_id, index)
        try:
            self._send(r, ("stop", job_id, index))
        except (OSError, ValueError):
            pass

    def _choice_over(self, r: _Replica, job_id: int, index: int) -> None:
        with self.registry:
            self._over(r, job_id, index)

    def _over(self, r: _Replica, job_id: int, index: int) -> None:
        """Note that a choice sends nothing more; once all of a job's have, forget the job (registry held)."""
        job = self.jobs.get(job_id)
        if job is None or (job_id, index) in self.over:
            return
        self.over.add((job_id, index))
        if all((job_id, c) in self.over for c in range(job.n)):
            self._forget(r, job_id, job.n)

    def _forget(self, r: _Replica, job_id: int, n: int) -> Job | None:
        r.waiting.discard(job_id)
        r.running.discard(job_id)
        for c in range(n):
            self.over.discard((job_id, c))
            self.choices.pop((job_id, c), None)
        return self.jobs.pop(job_id, None)

    def _lost(self, r: _Replica) -> None:
        r.alive = False
        if self.closing:
            return
        r.process.join(1)
        with self.registry:
            gone = [job for i in list(r.waiting | r.running) if (job := self.jobs.get(i)) is not None
                    and self._forget(r, i, job.n)]
        print0(f"serve: the engine process of replica {r.index} exited (code {r.process.exitcode}); "
               f"{len(gone)} requests failed")
        error = EngineUnavailable(f"the engine process of replica {r.index} exited; see the server's log")
        for job in gone:
            job.send(Delta(error=error))
