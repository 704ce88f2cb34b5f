"""The engine: cached decode equals an uncached forward, seeds repeat, tools force their output, errors."""

import pytest
import torch

from chatforge.conversation import render_for_completion
from chatforge.errors import CheckpointError, UsageError
from chatforge.infer.engine import Engine, IncrementalDecoder
from chatforge.model.gpt import GPTConfig
from tiny_chat import save_tiny_checkpoint, tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(tok.vocab_size, sequence_len=64)


def prompt(tok, text):
    return render_for_completion(tok, {"messages": [{"role": "user", "content": text}]})


def greedy_uncached(model, ids, max_tokens, stops):
    """Reference computed another way: the full sequence through the training forward at every step."""
    ids, out = list(ids), []
    with torch.no_grad():
        for _ in range(max_tokens):
            nxt = int(model(torch.tensor([ids]))[0, -1].argmax())
            out.append(nxt)
            ids.append(nxt)
            if nxt in stops or len(ids) >= model.config.sequence_len:
                break
    return out


def test_cached_greedy_equals_uncached_forward(tok, model):
    engine = Engine(model, tok)
    prompts = [prompt(tok, "hello how are you"), prompt(tok, "the cat sat on a mat and the dog ran"), [tok.bos_id]]
    stops = {tok.special_id("<|assistant_end|>"), tok.bos_id}
    # 30 new tokens on a 64-token context run past the 16-token sliding window of the S layer
    results = engine.generate_batch(prompts, num_samples=2, max_tokens=30, temperature=0.0, use_tools=False)
    for i, p in enumerate(prompts):
        expected = greedy_uncached(model, p, 30, stops)
        for j in range(2):
            r = results[i * 2 + j]
            assert r.tokens == expected, (i, j)
            assert r.sampled_mask == [1] * len(expected)


def test_same_seed_same_output(tok, model):
    engine = Engine(model, tok)
    p = [prompt(tok, "we said hello")]
    kw = dict(num_samples=3, max_tokens=20, temperature=1.0, top_k=50, use_tools=False)
    a = [r.tokens for r in engine.generate_batch(p, seed=11, **kw)]
    b = [r.tokens for r in engine.generate_batch(p, seed=11, **kw)]
    c = [r.tokens for r in engine.generate_batch(p, seed=12, **kw)]
    assert a == b
    assert a != c
    assert len({tuple(t) for t in a}) > 1  # samples of one prompt differ from each other


def test_streaming_matches_batch_and_reports_finish(tok, model):
    engine = Engine(model, tok)
    p = [prompt(tok, "the dog")]
    steps = list(engine.generate(p, max_tokens=7, temperature=0.0, use_tools=False))
    streamed = [s[0].token for s in steps]
    assert all(len(s) == 1 for s in steps)
    assert streamed == engine.generate_batch(p, max_tokens=7, temperature=0.0, use_tools=False)[0].tokens
    assert steps[-1][0].done and steps[-1][0].finish_reason in ("length", "stop")
    if steps[-1][0].finish_reason == "length":
        assert len(steps) == 7


def test_context_end_stops_a_row(tok, model):
    engine = Engine(model, tok)
    p = [[tok.bos_id] + tok.encode("the cat sat on a mat " * 20)[:58]]  # 59 tokens of a 64-token context
    r = engine.generate_batch(p, max_tokens=50, temperature=0.0, use_tools=False, stop_ids=[])[0]
    assert len(r.tokens) <= 5
    if r.finish_reason != "stop":
        assert r.finish_reason == "context" and len(p[0]) + len(r.tokens) == 64


def test_stop_string_ends_the_row(tok, model):
    engine = Engine(model, tok)
    p = [prompt(tok, "hello")]
    free = engine.generate_batch(p, max_tokens=30, temperature=0.0, use_tools=False)[0]
    text = tok.decode([t for t in free.tokens if not tok.is_special(t)])
    if len(text) < 4:
        pytest.skip("the random model stopped too early to pick a stop string")
    stop = text[2:4]
    r = engine.generate_batch(p, max_tokens=30, temperature=0.0, use_tools=False, stop_strings=[stop])[0]
    assert r.finish_reason == "stop"
    assert stop in tok.decode(r.tokens) and len(r.tokens) <= len(free.tokens)


def test_prompt_longer_than_context_is_a_clear_error(tok, model):
    engine = Engine(model, tok)
    with pytest.raises(UsageError, match=r"prompt 0 is 80 tokens but the model's context is 64"):
        engine.generate_batch([[tok.bos_id] * 80], max_tokens=4)
    with pytest.raises(UsageError, match="--temperature"):
        engine.generate_batch([[tok.bos_id]], temperature=-1)


class ScriptedModel(torch.nn.Module):
    """A stand-in GPT that follows a script, using the real KVCache protocol.

    It writes each input id into the cache's keys (as the real model writes its keys), so its whole
    history survives prefill, copy_rows and decode; it then says the next script token, skipping
    whatever was forced in between <|output_start|> and <|output_end|>.
    """

    def __init__(self, tok, script, sequence_len=128):
        super().__init__()
        self.config = GPTConfig(sequence_len=sequence_len, vocab_size=tok.vocab_size, n_layer=1, n_head=1,
                                n_kv_head=1, n_embd=2)
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.tok, self.script = tok, script

    def forward(self, idx, kv_cache=None, logits_at=None):
        B, T = idx.shape
        logits = torch.zeros(B, T, self.config.vocab_size)
        start, end = self.tok.special_id("<|output_start|>"), self.tok.special_id("<|output_end|>")
        assistant_start = self.tok.special_id("<|assistant_start|>")
        for b in range(B):
            at = int(kv_cache.lengths[b])
            kv_cache.k[0][b, 0, at:at + T, 0] = idx[b].float()
            history = kv_cache.k[0][b, 0, :at + T, 0].long().tolist()
            if assistant_start not in history:
                continue  # a finished row's junk step in its scratch slot
            generated = history[len(history) - history[::-1].index(assistant_start):]
            inside, produced = False, 0
            for t in generated:
                if t == start:
                    inside = True
                elif t == end:
                    inside = False
                elif not inside:
                    produced += 1
            nxt = 0 if inside else (self.script[produced] if produced < len(self.script)
                                     else self.tok.special_id("<|assistant_end|>"))
            logits[b, -1, nxt] = 10.0
        kv_cache.lengths += T
        return logits if logits_at is None else logits[torch.arange(B), logits_at][:, None]


def scripted_tool_engine(index: int = 0) -> Engine:
    """An engine whose model calls the Python tool with 6 * 7, then says the answer: what an engine
    process builds in the server test of tool use (module level, so it pickles)."""
    tok = tiny_tokenizer()
    sp = tok.special_id
    script = [sp("<|python_start|>"), *tok.encode("6 * 7"), sp("<|python_end|>"), *tok.encode(" the answer is 42")]
    return Engine(ScriptedModel(tok, script), tok)


def test_tool_call_forces_sandbox_output_and_masks_it(tok):
    sp = tok.special_id
    code, after = tok.encode("6 * 7"), tok.encode(" the answer is 42")
    script = [sp("<|python_start|>"), *code, sp("<|python_end|>"), *after]
    engine = Engine(ScriptedModel(tok, script), tok)
    p = [prompt(tok, "what is 6 * 7"), prompt(tok, "and again")]
    results = engine.generate_batch(p, num_samples=2, max_tokens=60, temperature=0.0)  # 4 rows call the tool at once
    forced = [sp("<|output_start|>"), *tok.encode("42"), sp("<|output_end|>")]
    expected = script[:len(code) + 2] + forced + after + [sp("<|assistant_end|>")]
    mask = [1] * (len(code) + 2) + [0] * len(forced) + [1] * (len(after) + 1)
    for r in results:
        assert r.tokens == expected
        assert r.sampled_mask == mask
        assert r.finish_reason == "stop"


def test_tool_errors_are_forced_too(tok):
    sp = tok.special_id
    script = [sp("<|python_start|>"), *tok.encode("1 / 0"), sp("<|python_end|>")]
    engine = Engine(ScriptedModel(tok, script), tok)
    r = engine.generate_batch([prompt(tok, "divide")], max_tokens=60, temperature=0.0)[0]
    out = tok.decode([t for t, m in zip(r.tokens, r.sampled_mask) if m == 0])
    assert out == "<|output_start|>ZeroDivisionError: division by zero<|output_end|>"
    # with tools off the same tokens pass through, nothing is forced
    r = engine.generate_batch([prompt(tok, "divide")], max_tokens=60, temperature=0.0, use_tools=False)[0]
    assert all(r.sampled_mask)


def test_incremental_decoder_holds_partial_characters(tok):
    text = "naïve café 東京 😀 done"
    ids = tok.encode(text)
    dec = IncrementalDecoder(tok)
    pieces = [dec.push(t) for t in ids] + [dec.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)


def test_from_checkpoint_loads_and_checks_the_tokenizer():
    with pytest.raises(CheckpointError, match=r"no sft checkpoints.*chatforge sft"):
        Engine.from_checkpoint("sft", device="cpu")
    tok, model = save_tiny_checkpoint("sft", "d2")
    engine = Engine.from_checkpoint("sft", device="cpu")
    assert engine.meta["tag"] == "d2" and engine.meta["step"] == 1
    p = [prompt(tok, "hello")]
    ours = Engine(model, tok).generate_batch(p, max_tokens=10, temperature=0.0, use_tools=False)[0]
    assert engine.generate_batch(p, max_tokens=10, temperature=0.0, use_tools=False)[0].tokens == ours.tokens
    with pytest.raises(CheckpointError, match="available tags: d2"):
        Engine.from_checkpoint("sft", tag="d99", device="cpu")
    save_tiny_checkpoint("mid", "d2", vocab_size=tok.vocab_size + 64)
    with pytest.raises(CheckpointError, match=r"trained with a \d+-token tokenizer"):
        Engine.from_checkpoint("mid", device="cpu")


def test_bench_infer_runs_on_cpu_with_tiny_numbers():
    import argparse

    from chatforge.bench import infer

    parser = argparse.ArgumentParser()
    infer.add_arguments(parser)
    args = parser.parse_args("--depth 1 --head-dim 16 --vocab-size 300 --max-seq-len 64 --prompt-len 8 --max-new-tokens 4 "
                             "--batch-sizes 1,3 --device cpu".split())
    rows = infer.main(args)
    assert [r["batch"] for r in rows] == [1, 3]
    assert all(r["tokens_per_s"] > 0 and r["bandwidth_fraction"] is None for r in rows)
    with pytest.raises(UsageError, match="--batch-sizes"):
        infer.main(parser.parse_args(["--batch-sizes", "0", "--device", "cpu"]))


class ToolThenNoise(ScriptedModel):
    """Rows whose prompt holds the word 'calc' follow the script (a tool call); every other token is
    drawn from flat logits, so the sampled ids come from the noise alone."""

    def forward(self, idx, kv_cache=None, logits_at=None):
        at = kv_cache.lengths.clone()
        logits = super().forward(idx, kv_cache)
        calc = self.tok.encode(" calc")[-1]
        for b in range(idx.shape[0]):
            history = kv_cache.k[0][b, 0, :int(at[b]) + idx.shape[1], 0].long().tolist()
            produced = logits[b, -1].argmax().item()
            if calc not in history or produced == self.tok.special_id("<|assistant_end|>"):
                logits[b, -1] = 0.0  # past the script, or not a tool row: any token
        return logits if logits_at is None else logits[torch.arange(idx.shape[0]), logits_at][:, None]


def delayed_sandbox(monkeypatch, delays):
    """submit_python as the engine sees it, each call finishing after the next delay in `delays`;
    returns the log of (event, time) the calls went through."""
    import threading
    import time
    from concurrent.futures import Future

    import chatforge.infer.engine as engine_module
    from chatforge.infer.sandbox import run_python
    log, delays = [], list(delays)

    def submit(code):
        future, delay = Future(), delays.pop(0) if delays else 0.0
        log.append(("submit", time.monotonic()))

        def finish():
            time.sleep(delay)
            result = run_python(code)
            log.append(("done", time.monotonic()))
            future.set_result(result)
        threading.Thread(target=finish, daemon=True).start()
        return future

    monkeypatch.setattr(engine_module, "submit_python", submit)
    return log


def test_a_row_waiting_for_its_tool_lets_the_others_decode(tok, monkeypatch):
    sp = tok.special_id
    after = tok.encode(" so 42")
    script = [sp("<|python_start|>"), *tok.encode("6 * 7"), sp("<|python_end|>"), *after]
    engine = Engine(ScriptedModel(tok, script), tok)
    delayed_sandbox(monkeypatch, [0.4])  # row 0's call is slow, row 1's is not
    seen, order = {0: [], 1: []}, []
    for step in engine.generate([prompt(tok, "what is 6 * 7"), prompt(tok, "and again")], max_tokens=60,
                                temperature=0.0):
        for t in step:
            seen[t.row].append(t.token)
            order.append(t.row)
    end = seen[0].index(sp("<|python_end|>"))
    row0 = [i for i, r in enumerate(order) if r == 0]
    while_waiting = order[row0[end] + 1:row0[end + 1]]
    assert while_waiting.count(1) >= len(after) + 3  # row 1 got its output and went on meanwhile
    assert seen[0] == seen[1]


@pytest.mark.parametrize("delays", [[0.0] * 8, [0.3, 0.0, 0.15, 0.0], [0.0, 0.4, 0.05, 0.2]])
def test_tool_latency_changes_no_token(tok, monkeypatch, delays):
    """Same seed, same tokens, however long each row's tool took: noise is keyed by row and position."""
    sp = tok.special_id
    script = [sp("<|python_start|>"), *tok.encode("6 * 7"), sp("<|python_end|>")]
    engine = Engine(ToolThenNoise(tok, script), tok)
    prompts = [prompt(tok, "calc this"), prompt(tok, "just talk"), prompt(tok, "calc that one")]
    results = {}
    for name, ds in (("instant", []), ("delayed", delays)):
        delayed_sandbox(monkeypatch, ds)
        out = engine.generate_batch(prompts, num_samples=2, max_tokens=24, temperature=1.0, seed=11)
        results[name] = [(r.tokens, r.sampled_mask) for r in out]
    assert results["instant"] == results["delayed"]
    tool_rows = [r for r in results["instant"] if 0 in r[1]]
    assert len(tool_rows) == 4  # the 'calc' rows called the tool; the others sampled freely
    assert len({tuple(t) for t, _ in results["instant"]}) == 6


def test_several_rows_call_the_tool_at_once(tok, monkeypatch):
    sp = tok.special_id
    script = [sp("<|python_start|>"), *tok.encode("6 * 7"), sp("<|python_end|>"), *tok.encode(" ok")]
    engine = Engine(ScriptedModel(tok, script), tok)
    log = delayed_sandbox(monkeypatch, [0.3] * 4)
    engine.generate_batch([prompt(tok, "what is 6 * 7")], num_samples=4, max_tokens=40, temperature=0.0)
    events = [e for e, _ in log]
    assert events[:4] == ["submit"] * 4  # all four calls were out before the first came back
    assert engine.tool_stats["calls"] == 4 and engine.tool_stats["blocked_s"] > 0
