"""ProcessPool's bookkeeping when the event loop and a replica's reader thread act on one job at once.

Each test stops the reader thread at the instant it handles a message of a job (a hook) and, from
another thread, does what the event loop would do then (a client leaving, a submit to an engine
that just died). The reader holds the pool's registry while it handles a message, so the other
side waits for it or comes first; either way no id, choice or count stays behind."""

import asyncio
import threading
from functools import partial

import pytest
from tiny_chat import tiny_engine

from chatforge.serve import engine_process
from chatforge.serve.engine_process import ProcessPool
from chatforge.serve.workers import EngineUnavailable, Job

CONTEXT = 128


@pytest.fixture
def pool():
    p = ProcessPool(partial(tiny_engine, CONTEXT), max_batch=4)
    yield p
    p.close()


class OnReader:
    """`hook()` from the reader thread (once): run `action` in a thread of its own, as the event loop
    would at that instant, and let it finish if it can (up to half a second: while the reader holds
    the registry, it cannot until the reader is done)."""

    def __init__(self, action):
        self.action, self.thread, self.fired = action, None, threading.Event()

    def hook(self) -> None:
        if self.thread is not None or not threading.current_thread().name.startswith("chatforge-engine-reader"):
            return
        self.thread = threading.Thread(target=self.action)
        self.thread.start()
        self.fired.set()
        self.thread.join(0.5)

    async def done(self) -> None:
        assert await asyncio.to_thread(self.fired.wait, 10), "the reader never reached the hook"
        await asyncio.to_thread(self.thread.join)


def long_job(pool) -> Job:
    prompt = [pool.engine.tokenizer.special_id("<|bos|>")] * 4
    return Job(prompt=prompt, max_tokens=100, temperature=0.0, use_tools=False)


def settled(pool) -> None:
    """Every message the engine sent before now has been handled (its reader handles them in order)."""
    pool.timing_report(wait=10)
    assert all(r.reported.is_set() for r in pool.replicas)


def submit_and_leave(pool, job: Job, leaves: OnReader) -> None:
    """Submit `job`, whose client leaves when the reader reaches the hook; then nothing may be left."""
    async def main():
        pool.submit(job)
        await leaves.done()

    asyncio.run(main())
    settled(pool)
    assert_nothing_left(pool)


def assert_nothing_left(pool) -> None:
    [r] = pool.replicas
    assert (pool.jobs, pool.choices, pool.over, r.waiting, r.running) == ({}, {}, set(), set(), set())
    assert (pool.busy(), pool.busy_slots(), pool.waiting()) == (0, 0, 0)


def test_a_client_leaving_as_its_job_is_taken_leaves_no_running_id(pool):
    [r] = pool.replicas
    job = long_job(pool)
    leaves = OnReader(job.cancel)

    class Waiting(set):
        def __contains__(self, i):  # the reader asks as it handles the engine's "taken"
            answer = super().__contains__(i)
            if i == job.remote_id:
                leaves.hook()  # the client leaves between the reader's question and what it does with the answer
            return answer

    r.waiting = Waiting()
    submit_and_leave(pool, job, leaves)


def test_a_client_leaving_as_its_first_tokens_arrive_leaves_no_choice(pool, monkeypatch):
    job = long_job(pool)
    leaves = OnReader(job.cancel)
    choice = engine_process._Choice

    def hooked(engine, j, index):  # the reader makes a job's choice as its first tokens arrive
        if j is job:
            leaves.hook()
        return choice(engine, j, index)

    monkeypatch.setattr(engine_process, "_Choice", hooked)
    submit_and_leave(pool, job, leaves)


def test_a_submit_as_the_engine_process_dies_fails_at_once_and_is_not_kept(pool, monkeypatch):
    """The reader notes the death while the event loop is between choosing the replica and sending."""
    [r] = pool.replicas
    load = pool._load

    def dies_meanwhile(replica):
        r.process.kill()
        pool.readers[0].join(10)  # the reader has seen the pipe close and failed what it knew of
        return load(replica)

    monkeypatch.setattr(pool, "_load", dies_meanwhile)
    job = long_job(pool)

    async def main():
        with pytest.raises(EngineUnavailable):
            pool.submit(job)

    asyncio.run(main())
    assert not pool.readers[0].is_alive() and pool.jobs == {} and r.waiting == set()
