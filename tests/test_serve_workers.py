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

    async def run(max_batch):
        pool = WorkerPool([engine], max_batch=max_batch)
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
