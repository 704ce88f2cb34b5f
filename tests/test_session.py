"""DecodeSession: rows joining and leaving a running decode give the tokens they would alone."""

import pytest

from chatforge.conversation import render_for_completion
from chatforge.errors import UsageError
from chatforge.infer.engine import Engine
from chatforge.infer.session import DecodeSession
from tiny_chat import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def engine():
    tok = tiny_tokenizer()
    return Engine(tiny_model(tok.vocab_size, sequence_len=64), tok)


def prompt(engine, text):
    return render_for_completion(engine.tokenizer, {"messages": [{"role": "user", "content": text}]})


def alone(engine, p, max_tokens, n=1):
    return [r.tokens for r in engine.generate_batch([p], num_samples=n, max_tokens=max_tokens, temperature=0.0,
                                                    use_tools=False)]


def drain(session, outputs, steps=None):
    """Step until no slot is busy (or `steps` times), appending each slot's tokens to outputs[slot][-1]."""
    done = 0
    while session.active() and (steps is None or done < steps):
        for t in session.step():
            outputs.setdefault(t.row, [[]])[-1].append(t.token)
        done += 1


def test_rows_admitted_mid_decode_get_the_tokens_they_would_alone(engine):
    a, b = prompt(engine, "hello there"), prompt(engine, "the cat sat on the mat")
    session = DecodeSession(engine, capacity=4, temperature=0.0, use_tools=False)
    outputs = {}
    [slot_a] = session.admit(a, max_tokens=20)
    drain(session, outputs, steps=5)
    slots_b = session.admit(b, num_samples=2, max_tokens=12)  # two samples of one prompt share its prefill
    assert slot_a not in slots_b and session.free_slots() == 1
    drain(session, outputs)
    assert outputs[slot_a] == alone(engine, a, 20)
    assert [outputs[s][0] for s in slots_b] == alone(engine, b, 12, n=2)


def test_a_released_slot_takes_a_new_prompt(engine):
    a, b, c = (prompt(engine, t) for t in ("one two three", "four five", "six seven eight nine"))
    session = DecodeSession(engine, capacity=2, temperature=0.0, use_tools=False)
    outputs = {}
    [sa] = session.admit(a, max_tokens=30)
    [sb] = session.admit(b, max_tokens=15)
    drain(session, outputs, steps=3)
    session.release([sa])            # a cancelled request
    [sc] = session.admit(c, max_tokens=10)
    assert sc == sa
    outputs[sc].append([])           # what the slot says from now on is c's
    drain(session, outputs)
    assert outputs[sb] == alone(engine, b, 15)
    assert outputs[sc][-1] == alone(engine, c, 10)[0]


def test_a_long_lived_session_keeps_serving_correctly(engine):
    """More steps than the cache is long (256 positions here) through one session, a free slot
    decoding junk beside a busy one part of the time: every reply is still its solo reply."""
    session = DecodeSession(engine, capacity=2, temperature=0.0, use_tools=False)
    p = prompt(engine, "again")
    expected = alone(engine, p, 40)[0]
    for round_ in range(8):          # 8 x 40 steps > 256
        outputs = {}
        slots = session.admit(p, num_samples=2, max_tokens=40)
        if round_ % 2:
            session.release(slots[:1])  # slot 0 free (and reset every step) while slot 1 decodes
        drain(session, outputs)
        assert outputs[slots[-1]] == [expected]


def test_admission_errors(engine):
    session = DecodeSession(engine, capacity=1, temperature=0.0)
    with pytest.raises(UsageError, match="free slots"):
        session.admit([1, 2, 3], num_samples=2)
    with pytest.raises(UsageError, match="context is 64"):
        session.admit(list(range(70)))
    with pytest.raises(UsageError, match="at least one slot"):
        DecodeSession(engine, capacity=0)


def test_a_seeded_admission_draws_what_generate_draws(engine):
    p = prompt(engine, "tell me a story")
    expected = [r.tokens for r in engine.generate_batch([p], num_samples=2, max_tokens=12, temperature=1.0,
                                                        seed=21, use_tools=False)]
    session = DecodeSession(engine, capacity=4, temperature=1.0, use_tools=False)
    outputs = {}
    [other] = session.admit(prompt(engine, "something else"), max_tokens=20)
    drain(session, outputs, steps=3)  # the seeded request joins a decode already running
    slots = session.admit(p, num_samples=2, max_tokens=12, seed=21)
    drain(session, outputs)
    assert [outputs[s][0] for s in slots] == expected
    assert other not in slots


def test_a_row_waiting_for_its_tool_does_not_hold_the_session(monkeypatch):
    from test_engine import ScriptedModel, delayed_sandbox

    tok = tiny_tokenizer()
    sp = tok.special_id
    script = [sp("<|python_start|>"), *tok.encode("6 * 7"), sp("<|python_end|>"), *tok.encode(" so 42")]
    scripted = Engine(ScriptedModel(tok, script), tok)
    p = render_for_completion(tok, {"messages": [{"role": "user", "content": "what is 6 * 7"}]})
    expected = scripted.generate_batch([p], max_tokens=40, temperature=0.0)[0].tokens
    delayed_sandbox(monkeypatch, [0.4, 0.0])
    session = DecodeSession(scripted, capacity=2, temperature=0.0)
    [slow] = session.admit(p, max_tokens=40)
    [fast] = session.admit(p, max_tokens=40)
    outputs, finished_first = {}, None
    while session.active():
        for t in session.step():
            outputs.setdefault(t.row, [[]])[-1].append(t.token)
            if t.done and finished_first is None:
                finished_first = t.row
    assert finished_first == fast  # the fast row finished while the slow one waited
    assert outputs[slow][0] == outputs[fast][0] == expected


def test_a_long_prompt_is_prefilled_in_chunks_while_running_rows_keep_decoding():
    """A prompt longer than the prefill chunk arrives among running rows: it is prefilled over
    several steps, each of which still gives every running row its next token, and every reply
    (greedy and seeded sampling) equals the unchunked session's."""
    tok = tiny_tokenizer()
    engine = Engine(tiny_model(tok.vocab_size, sequence_len=256), tok)
    long = prompt(engine, " ".join(["the cat sat on a mat and the dog ran"] * 12))
    running = [prompt(engine, t) for t in ("hello there", "how are you", "answer is yes")]
    assert len(long) > 3 * 32

    def serve(chunk, temperature):
        session = DecodeSession(engine, capacity=8, temperature=temperature, use_tools=False, prefill_chunk=chunk)
        outputs = {}
        slots = [session.admit(p, max_tokens=60, seed=i)[0] for i, p in enumerate(running)]
        drain(session, outputs, steps=4)
        [late] = session.admit(long, max_tokens=20, seed=7)
        steps_to_first = 0
        while late not in outputs:
            step = session.step()
            steps_to_first += 1
            assert set(slots) <= {t.row for t in step}  # the running rows got their token this step too
            for t in step:
                outputs.setdefault(t.row, [[]])[-1].append(t.token)
        drain(session, outputs)
        return steps_to_first, outputs

    for temperature in (0.0, 1.0):
        chunked_steps, chunked = serve(32, temperature)
        whole_steps, whole = serve(None, temperature)
        assert chunked_steps >= 3 and whole_steps == 1  # the chunks spread over steps; unchunked takes one
        assert chunked == whole
        assert all(len(reply[0]) > 0 for reply in chunked.values())


def test_a_warmed_session_has_every_step_shape_and_decodes_the_same(engine):
    a, b = prompt(engine, "hello there"), prompt(engine, "the cat sat on the mat")
    session = DecodeSession(engine, capacity=6, temperature=0.0, use_tools=False)
    session.warm()
    assert sorted(session.steps) == [1, 2, 4, 6]  # every row count a step can take, the capacity last
    outputs = {}
    [slot_a] = session.admit(a, max_tokens=12)
    drain(session, outputs, steps=3)
    slots_b = session.admit(b, num_samples=3, max_tokens=10)
    drain(session, outputs)
    assert outputs[slot_a] == alone(engine, a, 12)
    assert [outputs[s][0] for s in slots_b] == alone(engine, b, 10, n=3)
    with pytest.raises(RuntimeError, match="before anything is admitted"):
        session.admit(a, max_tokens=4)
        session.warm()


def test_bucketed_prefill_decodes_the_same_and_uses_only_the_shapes_warm_ran(monkeypatch):
    """Bucketed prefill (the CUDA default) pads each prefill to one of a few shapes; `warm` runs
    every one of them up front, so no request meets a shape first. Replies equal the unpadded ones."""
    import random

    tok = tiny_tokenizer()
    engine = Engine(tiny_model(tok.vocab_size, sequence_len=256), tok)
    shapes = []
    forward = engine.model.forward

    def recorded(ids, *args, kv_cache=None, **kwargs):
        if ids.shape[1] > 1:  # a prefill (decode steps are one token)
            shapes.append((tuple(ids.shape), kv_cache.max_len))
        return forward(ids, *args, kv_cache=kv_cache, **kwargs)

    monkeypatch.setattr(engine.model, "forward", recorded)
    rng = random.Random(0)
    texts = [" ".join(rng.choice(["the", "cat", "sat", "dog", "ran", "42"]) for _ in range(rng.randint(1, 60)))
             for _ in range(12)]
    prompts = [prompt(engine, t) for t in texts]
    assert max(map(len, prompts)) > 64  # some take the chunked path

    def serve(bucketed, graphs=False):
        session = DecodeSession(engine, capacity=4, temperature=0.0, use_tools=False, prefill_chunk=64,
                                bucketed=bucketed, prefill_graphs=graphs)
        if bucketed:
            session.warm()
        built = set(session.graphs.graphs) if graphs else set()
        warmed = set(shapes) | {((G, T), T) for G, T in built}  # a graph's shape, as the forward sees it
        shapes.clear()
        outputs, waiting = {}, list(enumerate(prompts))
        while waiting or session.active():
            while waiting and session.free_slots():  # arrivals join as slots free up
                i, p = waiting.pop(0)
                [slot] = session.admit(p, max_tokens=8)
                outputs[i] = slot
            for t in session.step():
                outputs.setdefault(("tokens", t.row), [[]])[-1].append(t.token)
                if t.done:
                    outputs[("tokens", t.row)].append([])
        if graphs:
            assert set(session.graphs.graphs) == built  # nothing was built while serving
        return warmed, set(shapes), outputs

    warmed, used, bucketed = serve(True)
    assert used <= warmed and len(warmed) < 30
    _, unpadded_shapes, plain = serve(False)
    assert len(unpadded_shapes) > len(used)  # without buckets, shapes follow the prompts
    assert bucketed == plain
    # the prefill graphs' static buffers (on the CPU run eagerly, as the recorded graphs run on a GPU)
    warmed, used, graphed = serve(True, graphs=True)
    assert used <= warmed and graphed == plain


@pytest.mark.parametrize("context, chunk", [(32, 512), (600, 1024)], ids=["context-under-chunk", "chunk-over-cache"])
def test_bucketed_prefill_keeps_its_shapes_within_the_context_and_the_cache(context, chunk):
    """A context shorter than the prefill chunk (a tiny model on CUDA) warms only shapes a prompt can
    take; a chunk longer than the session's cache never pads a group past that cache. Replies are
    those of plain prefill."""
    tok = tiny_tokenizer()
    engine = Engine(tiny_model(tok.vocab_size, sequence_len=context), tok)
    shapes = []
    forward = engine.model.forward

    def recorded(ids, *args, kv_cache=None, **kwargs):
        if ids.shape[1] > 1:
            shapes.append(tuple(ids.shape))
        return forward(ids, *args, kv_cache=kv_cache, **kwargs)

    engine.model.forward = recorded
    prompts = [prompt(engine, "hi"), [tok.special_id("<|bos|>")] * (context - 1)]

    def serve(bucketed):
        session = DecodeSession(engine, capacity=2, temperature=0.0, use_tools=False, prefill_chunk=chunk,
                                bucketed=bucketed, prefill_graphs=bucketed)
        if bucketed:
            session.warm()
            longest = max(T for _, T in set(shapes) | set(session.graphs.graphs))
            assert longest <= session.cache.max_len and longest < 2 * context  # none that no prompt can take
        outputs = {}
        slots = [session.admit(p, max_tokens=4)[0] for p in prompts]
        drain(session, outputs)
        return [outputs[s] for s in slots]

    assert serve(True) == serve(False)


@pytest.mark.parametrize("index", [0, 1], ids=["first-gpu", "second-gpu"])
def test_recorded_prefill_and_decode_graphs_give_the_eager_replies_on_any_gpu(index):
    """GPU only. The recorded graphs (decode steps, bucketed prefill) against the same session run
    eagerly, on GPU 0 and on GPU 1 (a second replica: the capture must happen on that GPU, though
    its thread's current device is 0)."""
    import torch

    if torch.cuda.device_count() <= index:
        pytest.skip(f"needs {index + 1} CUDA GPUs")
    tok = tiny_tokenizer()
    device = torch.device("cuda", index)
    texts = ["hi", "the cat sat on the mat " * 3, "what is 6 * 7", "the dog ran " * 30]

    def serve(graphs: bool):
        engine = Engine(tiny_model(tok.vocab_size, sequence_len=256).to(device), tok, device, cuda_graph=graphs)
        session = DecodeSession(engine, capacity=4, temperature=0.0, use_tools=False, prefill_chunk=64,
                                bucketed=True, prefill_graphs=graphs)
        session.warm()
        outputs = {}
        slots = [session.admit(prompt(engine, t), max_tokens=12)[0] for t in texts]
        drain(session, outputs)
        return [outputs[s] for s in slots]

    assert serve(True) == serve(False)


def test_a_prefill_graph_that_fails_to_record_leaves_eager_prefill_serving(engine, monkeypatch, capsys):
    """A GPU where recording fails (a driver, an op that cannot be captured) must still serve: one
    line says so, prefill runs eagerly with the same replies, and the engine does not try again."""
    from chatforge.infer.prefill_graphs import PrefillGraphs

    def refuse(self, G, T):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(PrefillGraphs, "build", refuse)
    monkeypatch.setattr(engine, "prefill_graphs", None)  # the module's engine: restored afterwards
    a, b = prompt(engine, "hello there"), prompt(engine, "the cat sat on the mat")
    session = DecodeSession(engine, capacity=4, temperature=0.0, use_tools=False, bucketed=True, prefill_graphs=True)
    session.warm()
    assert session.graphs is None and engine.prefill_graphs is False
    assert capsys.readouterr().out.count("prefill runs eagerly") == 1
    outputs = {}
    [sa] = session.admit(a, max_tokens=10)
    [sb] = session.admit(b, max_tokens=10)
    drain(session, outputs)
    assert [outputs[sa], outputs[sb]] == [alone(engine, a, 10), alone(engine, b, 10)]
