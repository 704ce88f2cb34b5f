"""The server's API, end to end: a real uvicorn on a loopback port, the real `openai` client, raw HTTP
for the malformed requests, and replies checked against the engine's own greedy generation."""

import asyncio
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from functools import partial

import openai
import pytest
from tiny_chat import save_tiny_checkpoint, tiny_engine, tiny_model, tiny_tokenizer

from chatforge.conversation import render_for_completion
from chatforge.infer.engine import Engine
from chatforge.serve.app import Limits, create_app
from chatforge.serve.command import ServerThread
from chatforge.serve.engine_process import ProcessPool
from chatforge.serve.workers import WorkerPool

MODEL_ID = "chatforge-test"
CONTEXT = 256


@pytest.fixture(scope="module", params=["batches", "continuous", "process"])
def served(request):
    """(base url, engine for references, pool) of a server on a tiny random model, scheduling by
    whole batches or with continuous batching in the server's process, or continuous batching in
    an engine process of its own as `chatforge serve` runs it (every API test runs against all three)."""
    tok = tiny_tokenizer()
    reference = Engine(tiny_model(tok.vocab_size, sequence_len=CONTEXT), tok)  # the server's weights, own cache
    if request.param == "process":
        pool = ProcessPool(partial(tiny_engine, CONTEXT), max_batch=32)
    else:
        server_engine = Engine(tiny_model(tok.vocab_size, sequence_len=CONTEXT), tok)
        pool = WorkerPool([server_engine], max_batch=32, continuous=request.param == "continuous")
    app = create_app(pool, MODEL_ID, Limits(context=CONTEXT, max_message_chars=2000, max_body_bytes=50_000,
                                            default_max_tokens=24))
    server = ServerThread(app)
    yield server.url, reference, pool
    server.stop()
    pool.close()


def client(url, key="unused"):
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


def shown_text(tokenizer, tokens):
    """The documented readable form of a reply: text runs decoded whole, tool blocks fenced."""
    special = tokenizer.special_id
    fences = {special("<|python_start|>"): "\n```python\n", special("<|output_start|>"): "\n```output\n"}
    ends = (special("<|python_end|>"), special("<|output_end|>"))
    out, run, in_block = [], [], False
    for t in tokens + [None]:
        if t is not None and not tokenizer.is_special(t):
            run.append(t)
            continue
        out.append(tokenizer.decode(run))
        run = []
        if t in fences:
            out.append(("\n```\n" if in_block else "") + fences[t])
            in_block = True
        elif (t in ends or t is None) and in_block:
            out.append("\n```\n")
            in_block = False
    return "".join(out)


def solo_reply(engine, text, max_tokens):
    """What one greedy request should answer, computed by the engine directly."""
    ids = render_for_completion(engine.tokenizer, {"messages": [{"role": "user", "content": text}]})
    result = engine.generate_batch([ids], max_tokens=max_tokens, temperature=0.0)[0]
    return shown_text(engine.tokenizer, result.tokens), len(ids), len(result.tokens)


def post(url, body, headers=None, raw=None):
    """(status, parsed JSON) of a POST to /v1/chat/completions."""
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url + "/v1/chat/completions", data=data, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def get(url, path, headers=None):
    req = urllib.request.Request(url + path, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_non_streaming_reply_equals_the_engines_greedy_output(served):
    url, engine, _ = served
    out = client(url).chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "hello cat"}],
                                              temperature=0, max_tokens=20)
    text, n_prompt, n_out = solo_reply(engine, "hello cat", 20)
    assert out.choices[0].message.content == text
    assert out.choices[0].finish_reason in ("stop", "length")
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (n_prompt, n_out)
    assert out.usage.total_tokens == n_prompt + n_out
    assert out.model == MODEL_ID and out.id.startswith("chatcmpl-")


def test_streaming_chunks_add_up_to_the_reply_and_end_with_usage(served):
    url, engine, _ = served
    stream = client(url).chat.completions.create(
        model=MODEL_ID, messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "the dog"}],
        temperature=0, max_completion_tokens=16, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    ids = render_for_completion(engine.tokenizer, {"messages": [{"role": "system", "content": "be brief"},
                                                                {"role": "user", "content": "the dog"}]})
    ref = engine.generate_batch([ids], max_tokens=16, temperature=0.0)[0]
    assert text == shown_text(engine.tokenizer, ref.tokens)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ref.tokens)


def test_raw_stream_is_sse_ending_with_done(served):
    url, _, _ = served
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 4}).encode()
    req = urllib.request.Request(url + "/v1/chat/completions", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [e for e in r.read().decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[1][6:])["object"] == "chat.completion.chunk"


def test_32_concurrent_streaming_clients_each_get_their_solo_reply(served):
    url, engine, _ = served
    prompts = [f"{i} the cat " + "sat " * (i % 7) for i in range(32)]
    expected = [solo_reply(engine, p, 16)[0] for p in prompts]

    async def one(c, prompt):
        stream = await c.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": prompt}],
                                                 temperature=0, max_tokens=16, stream=True)
        return "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])

    async def everyone():
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120) as c:
            return await asyncio.gather(*(one(c, p) for p in prompts))

    assert asyncio.run(everyone()) == expected


def test_stop_string_cuts_the_reply_before_it(served):
    url, engine, _ = served
    full, _, _ = solo_reply(engine, "how are you", 24)
    stop = full[len(full) // 2:len(full) // 2 + 3]
    assert stop.strip(), "the reference reply is too short for this test"
    out = client(url).chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "how are you"}],
                                              temperature=0, max_tokens=24, stop=[stop])
    assert out.choices[0].message.content == full[:full.index(stop)]
    assert out.choices[0].finish_reason == "stop"


def test_n_choices_with_a_seed_are_reproducible(served):
    url, _, _ = served
    kwargs = dict(model=MODEL_ID, messages=[{"role": "user", "content": "answer is"}], temperature=1.0, extra_body={"top_k": 20},
                  max_tokens=12, n=3, seed=7)
    a = client(url).chat.completions.create(**kwargs)
    b = client(url).chat.completions.create(**kwargs)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]


@pytest.mark.parametrize("body, status, param", [
    ({"messages": "hello"}, 400, "messages"),
    ({}, 400, "messages"),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    ({"messages": [{"role": "user", "content": "   "}]}, 400, "messages[0].content"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, 400, "messages[0].role"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "x" * 2001}]}, 400, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "cat " * 400}]}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 10_000}, 400, "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 3.5}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, 400, "top_p"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 0}, 400, "n"),
    ({"messages": [{"role": "user", "content": "hi"}], "model": "gpt-4"}, 404, "model"),
])
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(served, body, status, param):
    url, _, _ = served
    code, answer = post(url, body)
    assert code == status, answer
    assert set(answer["error"]) == {"message", "type", "param", "code"}
    assert answer["error"]["param"] == param and answer["error"]["type"] == "invalid_request_error"
    code, _ = post(url, {"messages": [{"role": "user", "content": "still there?"}], "max_tokens": 2})
    assert code == 200


def test_malformed_json_huge_body_and_unknown_routes(served):
    url, _, _ = served
    code, answer = post(url, None, raw=b'{"messages": [')
    assert code == 400 and answer["error"]["code"] == "invalid_json"
    code, answer = post(url, None, raw=b"x" * 60_000)
    assert code == 413 and answer["error"]["code"] == "request_too_large"
    code, answer = get(url, "/v1/nothing")
    assert code == 404 and answer["error"]["code"] == "unknown_url"
    code, answer = get(url, "/v1/chat/completions")
    assert code == 405 and "error" in answer
    assert get(url, "/health")[0] == 200


def test_readmes_snippet_the_stable_name_chatforge_answers_like_the_checkpoints_own(served):
    url, engine, _ = served
    out = client(url).chat.completions.create(model="chatforge", messages=[{"role": "user", "content": "Hi!"}],
                                              temperature=0, max_tokens=8)
    assert out.choices[0].message.content == solo_reply(engine, "Hi!", 8)[0]
    assert out.model == MODEL_ID  # as OpenAI answers an alias with the snapshot it resolved to
    code, answer = post(url, {"messages": [{"role": "user", "content": "hi"}], "model": "chatforge-other"})
    assert code == 404 and f"'{MODEL_ID}' or 'chatforge'" in answer["error"]["message"]


def test_models_and_health(served):
    url, _, _ = served
    models = client(url).models.list()
    assert [m.id for m in models.data] == [MODEL_ID, "chatforge"]  # the checkpoint's own id first (the UI shows it)
    assert client(url).models.retrieve(MODEL_ID).id == MODEL_ID
    alias = client(url).models.retrieve("chatforge")
    assert alias.id == "chatforge" and alias.root == MODEL_ID
    code, health = get(url, "/health")
    assert code == 200 and health["status"] == "ok" and health["replicas"] == 1


def test_a_client_that_disconnects_mid_stream_does_not_block_the_next_request(served):
    url, _, pool = served
    import http.client
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", "/v1/chat/completions", body=json.dumps(
        {"messages": [{"role": "user", "content": "go on"}], "stream": True, "max_tokens": 200}),
        headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.readline().startswith(b"data: ")  # the stream has begun
    conn.close()  # the client walks away mid-reply
    code, answer = post(url, {"messages": [{"role": "user", "content": "next"}], "max_tokens": 3})
    assert code == 200 and answer["choices"][0]["message"]["content"] is not None


def test_api_key_guards_everything_but_health_and_the_page():
    tok = tiny_tokenizer()
    pool = WorkerPool([Engine(tiny_model(tok.vocab_size, sequence_len=CONTEXT), tok)])
    server = ServerThread(create_app(pool, MODEL_ID, Limits(context=CONTEXT), api_key="s3cret"))
    try:
        url = server.url
        assert get(url, "/v1/models")[0] == 401
        code, answer = get(url, "/v1/models", {"Authorization": "Bearer wrong"})
        assert code == 401 and answer["error"]["code"] == "invalid_api_key"
        assert post(url, {"messages": [{"role": "user", "content": "hi"}]})[0] == 401
        assert get(url, "/v1/nothing")[0] == 401  # unknown routes too: nothing leaks without the key
        assert get(url, "/health")[0] == 200
        with pytest.raises(openai.AuthenticationError):
            client(url, key="wrong").models.list()
        out = client(url, key="s3cret").chat.completions.create(
            model=MODEL_ID, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert out.usage.completion_tokens >= 1
    finally:
        server.stop()
        pool.close()


def test_a_busy_port_is_one_line_and_exit_2_before_the_model_loads(monkeypatch, capsys):
    import socket

    from chatforge import cli
    from chatforge.serve import command as serve_command

    def must_not_load(args):
        raise AssertionError("the model was loaded although the port is taken")

    monkeypatch.setattr(serve_command, "start_pool", must_not_load)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["serve", "--host", "127.0.0.1", "--port", str(port)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--port {port}" in err and "already in use" in err


@pytest.mark.slow
def test_cli_serves_a_checkpoint_and_logs_one_line_per_request_without_content(tmp_path):
    save_tiny_checkpoint("sft", "d2", sequence_len=CONTEXT)
    env = dict(os.environ, CHATFORGE_API_KEY="k", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "chatforge", "serve", "--port", "0", "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        lines = []
        for line in proc.stdout:  # bounded by the server's start (or its exit)
            lines.append(line)
            if "listening on" in line:
                break
        url = line.split("listening on ")[1].split()[0]
        out = client(url, key="k").chat.completions.create(
            model="chatforge", messages=[{"role": "user", "content": "my secret words"}], max_tokens=4)
        assert out.choices[0].message.content is not None and out.model == "chatforge-sft-d2"
        assert get(url, "/v1/models")[0] == 401  # the key came from CHATFORGE_API_KEY
    finally:
        proc.terminate()
        rest, _ = proc.communicate(timeout=30)
    log = "".join(lines) + rest
    request_lines = [x for x in log.splitlines() if "POST /v1/chat/completions 200" in x]
    assert len(request_lines) == 1 and "in=" in request_lines[0] and "out=4" in request_lines[0]
    assert "secret" not in log


def test_the_engine_process_runs_the_python_tool_and_streams_its_output():
    """The tool runs where the engine runs (the engine process, with its own sandbox helper); the
    reply shows the call and its output fenced, streamed or not."""
    from test_engine import scripted_tool_engine

    pool = ProcessPool(partial(scripted_tool_engine), max_batch=4)
    server = ServerThread(create_app(pool, MODEL_ID, Limits(context=128)))
    try:
        messages = [{"role": "user", "content": "what is 6 * 7"}]
        out = client(server.url).chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=60,
                                                         temperature=0)
        content = out.choices[0].message.content
        assert "```python\n6 * 7\n```" in content and "```output\n42\n```" in content
        assert content.endswith(" the answer is 42") and out.choices[0].finish_reason == "stop"
        stream = client(server.url).chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=60,
                                                            temperature=0, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == content
    finally:
        server.stop()
        pool.close()
