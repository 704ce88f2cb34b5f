"""The worker pool: batching compatible jobs without mixing their outputs, cancellation, tool pieces."""

import asyncio

import pytest

from chatforge.conversation import render_for_completion
from chatforge.infer.engine import Engine
from chatforge.serve.app import ReplyParts
from chatforge.serve.workers import Job, JobQueue, PartStream, Piece, QueueFull, StopFilter, WorkerPool, run_batch
from tiny_chat import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def engine():
    tok = tiny_tokenizer()
    return Engine(tiny_model(tok.vocab_size, sequence_len=128), tok)


def prompt(engine, text):
    return render_for_completion(engine.tokenizer, {"messages": [{"role": "user", "content": text}]})


async def collect(job):
    """All pieces of a job's single choice, joined, and its finish reason."""
    text = []
    while True:
        delta = await job.queue.get()
        assert delta.error is None, delta.error
        text += [p.shown for p in delta.pieces]
        if delta.finish_reason:
            return "".join(text), delta.finish_reason


def test_batched_jobs_with_different_max_tokens_equal_their_solo_runs(engine):
    texts = [f"{i} hello the cat" for i in range(6)]
    limits = [3, 9, 5, 12, 1, 7]

    async def run(max_batch, continuous=False):
        pool = WorkerPool([engine], max_batch=max_batch, continuous=continuous)
        try:
            jobs = [Job(prompt(engine, t), max_tokens=m, temperature=0.0) for t, m in zip(texts, limits)]
            for job in jobs:
                pool.submit(job)
            return await asyncio.gather(*(collect(j) for j in jobs)), [j.completion_tokens for j in jobs]
        finally:
            pool.close()

    batched, batched_counts = asyncio.run(run(max_batch=32))
    solo, solo_counts = asyncio.run(run(max_batch=1))
    assert batched == solo
    assert batched_counts == solo_counts and all(c <= m for c, m in zip(batched_counts, limits))
    assert asyncio.run(run(max_batch=32, continuous=True)) == (solo, solo_counts)


def test_queue_batches_only_compatible_jobs_and_skips_cancelled_ones():
    q = JobQueue(max_waiting=4)
    greedy = [Job([1], 5, temperature=0.0) for _ in range(2)]
    seeded = Job([1], 5, temperature=0.7, seed=3)
    hot = Job([1], 5, temperature=0.7)
    for job in (greedy[0], seeded, hot, greedy[1]):
        q.put(job)
    with pytest.raises(QueueFull, match="--max-queue 4"):
        q.put(Job([1], 5))
    assert q.take(8, timeout=0) == greedy          # the oldest and the one that shares its settings
    hot.cancel()
    assert q.take(8, timeout=0) == [seeded]        # a seeded sampled job runs alone
    assert q.take(8, timeout=0) == []              # the cancelled one is dropped


def test_a_cancelled_job_stops_its_generation_at_once(engine):
    """Cancelling from inside the stream (as a disconnect does) ends run_batch within a step."""
    sent = []

    class CancelAfterFirst(Job):
        def send(self, delta):
            sent.append(delta)
            self.cancel()

    job = CancelAfterFirst(prompt(engine, "go"), max_tokens=100, temperature=0.0)
    run_batch(engine, [job])
    assert job.completion_tokens <= 2 and len(sent) == 1


def test_tool_tokens_become_fenced_blocks_and_parts(engine):
    tok = engine.tokenizer
    sp = tok.special_id
    ids = (tok.encode("I will compute.") + [sp("<|python_start|>")] + tok.encode("6*7") + [sp("<|python_end|>"),
           sp("<|output_start|>")] + tok.encode("42") + [sp("<|output_end|>")] + tok.encode(" It is 42.")
           + [sp("<|assistant_end|>")])
    stream, reply = PartStream(engine), ReplyParts()
    for t in ids:
        for piece in stream.push(t):
            reply.add(piece)
    for piece in stream.finish():
        reply.add(piece)
    assert reply.content() == "I will compute.\n```python\n6*7\n```\n\n```output\n42\n```\n It is 42."
    assert reply.parts == [{"type": "text", "text": "I will compute."}, {"type": "python", "text": "6*7"},
                           {"type": "python_output", "text": "42"}, {"type": "text", "text": " It is 42."}]


def test_stop_filter_holds_back_a_possible_stop_and_cuts_before_it():
    stops = StopFilter(["END"])
    out, hit = [], False
    for chunk in ["abc E", "N", "D tail"]:
        sent, hit = stops.push(Piece("text", chunk, chunk))
        out += [p.text for p in sent]
        if hit:
            break
    assert "".join(out) == "abc " and hit


@pytest.fixture(scope="module")
def chatty_engine():
    """A tiny model that never emits a special token, so every reply runs to its max_tokens."""
    import torch

    tok = tiny_tokenizer()
    model = tiny_model(tok.vocab_size, sequence_len=256)
    with torch.no_grad():
        model.lm_head.weight[tok.vocab_size - 9:] = 0.0  # the special ids' logits stay at 0, below the best word
        specials = [tok.special_id(s) for s in ("<|bos|>", "<|assistant_end|>", "<|python_start|>")]
        assert all(i >= tok.vocab_size - 9 for i in specials)
    return Engine(model, tok)


async def solo(engine, job_args):
    pool = WorkerPool([engine], max_batch=1)
    try:
        job = Job(*job_args, temperature=0.0)
        pool.submit(job)
        return await collect(job)
    finally:
        pool.close()


def test_a_request_arriving_mid_decode_joins_it_and_finishes_first(chatty_engine):
    """Continuous batching: a short request submitted while a long reply decodes starts at the next
    step instead of waiting for the long one, and neither reply changes."""
    long_args = (prompt(chatty_engine, "tell me a long story"), 120)
    short_args = (prompt(chatty_engine, "hi"), 4)

    async def run():
        pool = WorkerPool([chatty_engine], max_batch=4, continuous=True)
        try:
            long = Job(*long_args, temperature=0.0)
            pool.submit(long)
            head = await long.queue.get()  # the long reply is running
            short = Job(*short_args, temperature=0.0)
            pool.submit(short)
            short_result = await collect(short)
            long_tokens_then = long.completion_tokens
            text, reason = await collect(long)
            first = "".join(p.shown for p in head.pieces)
            return short_result, long_tokens_then, (first + text, reason), long.completion_tokens
        finally:
            pool.close()

    short_result, long_tokens_then, long_result, long_total = asyncio.run(run())
    assert long_tokens_then < 120 and long_total == 120
    assert short_result == asyncio.run(solo(chatty_engine, short_args)) and short_result[1] == "length"
    assert long_result == asyncio.run(solo(chatty_engine, long_args))


def test_a_cancelled_request_frees_its_slot_for_a_waiting_one(chatty_engine):
    """Two slots, both busy: cancelling one reply lets a queued request run while the other goes on."""
    async def run():
        pool = WorkerPool([chatty_engine], max_batch=2, continuous=True)
        try:
            a = Job(prompt(chatty_engine, "first long one"), 150, temperature=0.0)
            b = Job(prompt(chatty_engine, "second long one"), 150, temperature=0.0)
            pool.submit(a)
            pool.submit(b)
            await a.queue.get()
            await b.queue.get()
            late = Job(prompt(chatty_engine, "late"), 3, temperature=0.0)
            pool.submit(late)
            await asyncio.sleep(0.05)
            assert late.completion_tokens == 0  # no free slot yet
            a.cancel()
            result = await collect(late)
            b_then = b.completion_tokens
            await collect(b)
            return result, b_then, a.completion_tokens
        finally:
            pool.close()

    result, b_then, a_tokens = asyncio.run(run())
    assert result[1] == "length" and b_then < 150 and a_tokens < 150


def test_a_session_that_failed_mid_batch_is_not_reused(engine, monkeypatch):
    """A step that raises fails the requests it was serving; the next request with the same settings
    must not inherit their half-admitted rows (it would fail too, and every one after it)."""
    from chatforge.infer.session import DecodeSession

    real_step = DecodeSession.step
    failures = []

    def step_failing_once(self):
        if failures == ["armed"]:
            failures[0] = "raised"
            raise RuntimeError("a step that failed (e.g. out of memory in a prefill)")
        return real_step(self)

    monkeypatch.setattr(DecodeSession, "step", step_failing_once)
    args = (prompt(engine, "hello the cat"), 6)

    async def run():
        pool = WorkerPool([engine], max_batch=4, continuous=True)
        try:
            first = Job(*args, temperature=0.0)
            pool.submit(first)
            before = await collect(first)  # the pool now keeps this session for reuse
            failures.append("armed")
            failed = Job(*args, temperature=0.0)
            pool.submit(failed)
            delta = await failed.queue.get()
            after = Job(*args, temperature=0.0)
            pool.submit(after)
            return before, delta, await collect(after)
        finally:
            pool.close()

    before, delta, after = asyncio.run(run())
    assert failures == ["raised"] and isinstance(delta.error, RuntimeError)
    assert after == before


def test_a_warm_up_that_fails_at_start_fails_requests_instead_of_losing_the_replica(monkeypatch):
    """On CUDA a replica warms its session before the first request; if that fails (out of memory
    capturing the steps), the replica must live on and fail requests with the error, not leave them
    waiting forever (the engine process has already reported itself ready)."""
    import torch

    from chatforge.serve import workers

    tok = tiny_tokenizer()
    engine = Engine(tiny_model(tok.vocab_size, sequence_len=128), tok)
    engine.device = torch.device("cuda")  # only where the replica decides to warm up front; no CUDA work runs

    def failing_session(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (warm-up)")

    monkeypatch.setattr(workers, "new_session", failing_session)

    async def run():
        pool = WorkerPool([engine], max_batch=2, continuous=True)
        try:
            job = Job(prompt(engine, "hello"), 4, temperature=0.0)
            pool.submit(job)
            return await asyncio.wait_for(job.queue.get(), timeout=10)
        finally:
            pool.close()

    delta = asyncio.run(run())
    assert isinstance(delta.error, RuntimeError) and "out of memory" in str(delta.error)
