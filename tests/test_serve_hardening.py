"""The server against clients that leave, stall, flood, or come from another web page; and the soak.

A real uvicorn on a loopback port (ServerThread) with the tiny random model; raw sockets where a
client must misbehave."""

import http.client
import json
import logging
import socket
import threading
import time
import urllib.error
import urllib.request
from functools import partial

import pytest
from tiny_chat import refuse_to_load, tiny_engine, tiny_model, tiny_tokenizer

from chatforge.bench.soak import run_soak
from chatforge.infer.engine import Engine
from chatforge.serve import app as serve_app
from chatforge.serve import command as serve_command
from chatforge.serve.app import Limits, create_app
from chatforge.serve.command import ServerThread
from chatforge.serve.engine_process import TIMING_EVERY, ProcessPool
from chatforge.serve.guard import Connections, check_exposure, default_allowed_hosts, host_allowed, resident_bytes
from chatforge.serve.workers import WorkerPool

CONTEXT = 1024
HI = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


class Served:
    """A server on the tiny model; `forwards` counts the model's forward passes (engine="thread"),
    or its engine runs in a process of its own as `chatforge serve` runs it (engine="process")."""

    def __init__(self, continuous=False, max_batch=32, max_queue=256, limits=None, engine="thread", **app_kwargs):
        if engine == "process":
            self.pool = ProcessPool(partial(tiny_engine, CONTEXT), max_batch=max_batch, max_queue=max_queue,
                                    continuous=continuous)
        else:
            tok = tiny_tokenizer()
            self.engine = Engine(tiny_model(tok.vocab_size, sequence_len=CONTEXT), tok)
            self.forwards = 0
            forward = self.engine.model.forward

            def counted(*args, **kwargs):
                self.forwards += 1
                return forward(*args, **kwargs)

            self.engine.model.forward = counted
            self.pool = WorkerPool([self.engine], max_batch=max_batch, max_queue=max_queue, continuous=continuous)
        self.app = create_app(self.pool, "chatforge-test", limits or Limits(context=CONTEXT), **app_kwargs)
        self.server = ServerThread(self.app)
        self.url = self.server.url
        self.host, self.port = "127.0.0.1", int(self.url.rsplit(":", 1)[1])

    def close(self):
        self.server.stop()
        self.pool.close()

    def raw(self, data: bytes) -> socket.socket:
        s = socket.create_connection((self.host, self.port), timeout=30)
        s.sendall(data)
        return s

    def open_request(self, body: dict, headers=None) -> http.client.HTTPConnection:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        conn.request("POST", "/v1/chat/completions", body=json.dumps(body),
                     headers={"Content-Type": "application/json", **(headers or {})})
        return conn

    def health(self) -> dict:
        return get(self.url, "/health")[1]

    def wait_for(self, condition, timeout=20.0):
        """Poll /health until condition(health) holds; the health dict then."""
        deadline = time.monotonic() + timeout
        while True:
            h = self.health()
            if condition(h):
                return h
            assert time.monotonic() < deadline, f"timed out waiting; /health says {h}"
            time.sleep(0.01)


@pytest.fixture
def served():
    servers = []

    def make(**kwargs):
        servers.append(Served(**kwargs))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


@pytest.fixture(scope="module")
def shared():
    """One server for the tests that only send requests."""
    s = Served()
    yield s
    s.close()


def post(url, body=None, headers=None, raw=None):
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url + "/v1/chat/completions", data=data, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), dict(e.headers)


def get(url, path, headers=None):
    req = urllib.request.Request(url + path, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            body = r.read()
            return r.status, (json.loads(body) if "json" in r.headers["content-type"] else body.decode())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


LONG = {"messages": [{"role": "user", "content": "go on"}], "max_tokens": 900, "temperature": 0, "use_tools": False}


# ---- clients that leave -------------------------------------------------------------------------

@pytest.mark.parametrize("continuous", [False, True], ids=["batches", "continuous"])
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_a_client_that_leaves_frees_its_slot_within_one_decode_step(served, stream, continuous):
    s = served(continuous=continuous)
    jobs = []
    submit = s.pool.submit

    def capture(job):
        cancel = job.cancel

        def cancel_and_note():
            if not job.cancelled.is_set():
                job.forwards_at_cancel = s.forwards
            cancel()

        job.cancel = cancel_and_note
        jobs.append(job)
        submit(job)

    s.pool.submit = capture
    conn = s.open_request({**LONG, "stream": stream})
    s.wait_for(lambda h: h["busy_slots"] == 1 and jobs[0].completion_tokens >= 3)  # tokens are flowing
    conn.close()  # the client walks away while its (900-token) reply is being generated
    s.wait_for(lambda h: h["busy"] == 0 and h["busy_slots"] == 0)
    job = jobs[0]
    # the step in flight when it left, and (engine pipelining) the one launched ahead of it: no more
    assert s.forwards - job.forwards_at_cancel <= 2
    assert job.completion_tokens < 200
    assert post(s.url, HI)[0] == 200


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_a_client_that_leaves_stops_its_rows_in_the_engine_process(served, stream):
    """As above, across the pipe: the cancel reaches the engine process, which decodes no further."""
    s = served(continuous=True, engine="process")
    conn = s.open_request({**LONG, "stream": stream})
    s.wait_for(lambda h: h["busy_slots"] == 1 and h["timing"].get("decode launch", {}).get("n", 0) >= 3)
    conn.close()
    s.wait_for(lambda h: h["busy"] == 0 and h["busy_slots"] == 0)
    steps, deadline = -1, time.monotonic() + 30
    while time.monotonic() < deadline:  # until the engine's reports show no more steps
        time.sleep(3 * TIMING_EVERY)
        steps, before = s.health()["timing"]["decode launch"]["n"], steps
        if steps == before:
            break
    assert steps == before and steps < 300  # it stopped, far short of the 900 tokens asked for
    assert post(s.url, HI)[0] == 200


def test_a_dead_engine_process_fails_its_requests_and_then_answers_503(served):
    s = served(continuous=True, engine="process")
    conn = s.open_request(LONG)
    s.wait_for(lambda h: h["busy_slots"] == 1)
    [replica] = s.pool.replicas
    replica.process.kill()
    response = conn.getresponse()
    body = json.loads(response.read())
    assert response.status == 503 and "engine process" in body["error"]["message"]
    code, body, _ = post(s.url, HI)
    assert code == 503 and "restart the server" in body["error"]["message"]
    assert s.health()["busy_slots"] == 0


def test_an_engine_process_that_cannot_load_raises_its_error_in_the_server():
    from chatforge.errors import UsageError

    with pytest.raises(UsageError, match="no such checkpoint, on purpose"):
        ProcessPool(partial(refuse_to_load, "no such checkpoint, on purpose"))


@pytest.mark.parametrize("engine", ["thread", "process"])
def test_clients_that_left_hold_no_place_in_the_queue(served, engine):
    s = served(max_batch=1, max_queue=2, engine=engine)
    running = s.open_request(LONG)  # holds the only slot
    s.wait_for(lambda h: h["busy_slots"] == 1)
    waiting = [s.open_request({**HI, "stream": True}) for _ in range(2)]
    s.wait_for(lambda h: h["waiting"] == 2)
    for conn in waiting:
        conn.close()
    s.wait_for(lambda h: h["waiting"] == 0)
    after = [s.open_request(HI) for _ in range(2)]  # the queue has room for both again
    s.wait_for(lambda h: h["waiting"] == 2)
    running.close()
    for conn in after:
        response = conn.getresponse()
        assert response.status == 200, response.read()
        conn.close()
    s.wait_for(lambda h: h["busy_slots"] == 0 and h["waiting"] == 0)


@pytest.mark.parametrize("engine", ["thread", "process"])
def test_health_and_metrics_count_slots_queue_and_connections(served, engine):
    s = served(engine=engine)
    idle = [socket.create_connection((s.host, s.port)) for _ in range(3)]
    h = s.wait_for(lambda h: h["connections"] == 4)  # three idle ones and this request's
    assert (h["busy_slots"], h["waiting"], h["busy"]) == (0, 0, 0)
    for sock in idle:
        sock.close()
    s.wait_for(lambda h: h["connections"] == 1)
    code, text = get(s.url, "/metrics")
    assert code == 200
    values = dict(line.split() for line in text.splitlines() if not line.startswith("#"))
    assert values["chatforge_slots_busy"] == "0" and values["chatforge_requests_waiting"] == "0"
    assert values["chatforge_connections_open"] == "1"
    assert int(values["process_resident_memory_bytes"]) == pytest.approx(resident_bytes(), rel=0.2)


# ---- cross-site -----------------------------------------------------------------------------------

@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                                          None])
def test_only_json_bodies_are_taken_so_a_cross_site_form_cannot_drive_the_server(served, content_type):
    s = served()
    headers = {"Content-Type": content_type} if content_type else {}
    req = urllib.request.Request(s.url + "/v1/chat/completions", data=json.dumps(HI).encode(), method="POST",
                                 headers=headers)
    if content_type is None:
        req.remove_header("Content-type")
        req.add_unredirected_header("Content-Type", "")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=30)
    assert err.value.code == 415
    assert json.loads(err.value.read())["error"]["code"] == "unsupported_media_type"
    assert s.forwards == 0  # nothing was generated
    assert post(s.url, HI, {"Content-Type": "application/json; charset=utf-8"})[0] == 200


def test_a_foreign_host_header_is_refused_dns_rebinding(served):
    s = served(allowed_hosts=default_allowed_hosts("127.0.0.1", ["chat.my.lan"]))
    for host in ("rebound.attacker.example", "rebound.attacker.example:8000", "localhost.attacker.example"):
        code, answer, _ = post(s.url, HI, {"Host": host})
        assert code == 400 and answer["error"]["code"] == "invalid_host", host
        assert get(s.url, "/v1/models", {"Host": host})[0] == 400
    assert s.forwards == 0
    for host in (f"localhost:{s.port}", f"127.0.0.1:{s.port}", "[::1]:80", "chat.my.lan", "app.localhost"):
        assert post(s.url, HI, {"Host": host})[0] == 200, host


def test_which_host_names_are_answered_by_default():
    assert default_allowed_hosts("127.0.0.1", []) == ["localhost"]
    assert "box.example" in default_allowed_hosts("box.example", [])
    assert socket.gethostname().lower() in default_allowed_hosts("0.0.0.0", [])
    assert host_allowed("10.1.2.3:8000", ["localhost"]) and host_allowed("LOCALHOST.", ["localhost"])
    assert not host_allowed("evil.example", ["localhost"]) and host_allowed("evil.example", ["*"])


def test_serving_beyond_loopback_needs_a_key_or_an_explicit_flag(monkeypatch, capsys):
    from chatforge import cli

    assert check_exposure("127.0.0.1", None, False) is None and check_exposure("localhost", None, False) is None
    assert check_exposure("0.0.0.0", "key", False) is None and check_exposure("0.0.0.0", None, True) is None

    class Loaded(Exception):
        pass

    def load(args):
        raise Loaded

    monkeypatch.setattr(serve_command, "start_pool", load)
    monkeypatch.delenv("CHATFORGE_API_KEY", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["serve", "--host", "0.0.0.0", "--port", "0"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--api-key" in err and "--allow-no-key" in err
    with pytest.raises(Loaded):  # told explicitly: it goes on to load the model
        cli.main(["serve", "--host", "0.0.0.0", "--port", "0", "--allow-no-key"])
    monkeypatch.setenv("CHATFORGE_API_KEY", "k")
    with pytest.raises(Loaded):
        cli.main(["serve", "--host", "0.0.0.0", "--port", "0"])


def test_a_401_carries_the_cors_headers_when_cors_is_on(served):
    s = served(api_key="s3cret", cors_origins=["https://ui.example"])
    origin = {"Origin": "https://ui.example"}
    code, answer, headers = post(s.url, HI, origin)
    assert code == 401 and answer["error"]["code"] == "invalid_api_key"
    assert headers.get("access-control-allow-origin") == "https://ui.example"
    code, _, headers = post(s.url, HI, {**origin, "Authorization": "Bearer s3cret"})
    assert code == 200 and headers.get("access-control-allow-origin") == "https://ui.example"


# ---- slow, partial and many clients ---------------------------------------------------------------

class ErrorLog(logging.Handler):
    """uvicorn's error log (where an app's traceback would go), kept for the test."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.records = []
        logging.getLogger("uvicorn.error").addHandler(self)

    def emit(self, record):
        self.records.append(record)

    def close(self):
        logging.getLogger("uvicorn.error").removeHandler(self)
        super().close()


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"


def test_slow_headers_and_bodies_time_out_and_a_client_gone_mid_body_is_no_500(served, capsys):
    s = served(connections=Connections(read_timeout=0.5))
    errors = ErrorLog()
    try:
        start = time.monotonic()
        slow_head = s.raw(HEAD[:30])
        assert read_all(slow_head) == b"" and time.monotonic() - start < 5  # closed, unanswered
        slow_body = s.raw(HEAD + b"Content-Length: 100\r\n\r\n{\"messa")
        reply = read_all(slow_body).decode()
        assert reply.startswith("HTTP/1.1 408") and '"request_timeout"' in reply
        gone = s.raw(HEAD + b"Content-Length: 100\r\n\r\n{\"messa")
        gone.close()  # mid-body
        s.wait_for(lambda h: h["connections"] == 1)
        assert post(s.url, HI)[0] == 200
    finally:
        errors.close()
    assert errors.records == []  # no traceback, no "Exception in ASGI application"
    log = capsys.readouterr().out
    assert " 499 " in log and " 500 " not in log


def test_many_slow_clients_neither_grow_memory_nor_block_health(served):
    s = served(connections=Connections(max_open=32, read_timeout=30))
    socks = [s.raw(HEAD[:20]) for _ in range(50)]  # warm: the connection table at its cap
    s.wait_for(lambda h: h["evicted"] >= 18)
    before = resident_bytes()
    worst = 0.0
    for _ in range(10):
        socks += [s.raw(HEAD[:20] + b"x" * 100) for _ in range(50)]  # 500 slow clients that never finish
        start = time.monotonic()
        h = s.health()
        worst = max(worst, time.monotonic() - start)
        assert h["connections"] <= 33
    assert worst < 1.0  # /health always got in: the oldest slow client made room
    assert resident_bytes() - before < 30 * 2 ** 20
    h = s.health()
    assert h["evicted"] >= 500 and h["connections"] <= 33
    assert post(s.url, HI)[0] == 200
    for sock in socks:
        sock.close()


def test_busy_connections_at_the_cap_get_a_503_not_a_hang(served):
    s = served(max_batch=1, connections=Connections(max_open=2, read_timeout=30))
    busy = [s.open_request(LONG) for _ in range(2)]  # both connections wait for a reply: none can go
    deadline = time.monotonic() + 20
    while not (s.pool.busy_slots() == 1 and s.pool.queue.waiting() == 1):  # both requests are in
        assert time.monotonic() < deadline
        time.sleep(0.01)
    extra = s.raw(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    reply = read_all(extra).decode()
    extra.close()
    assert reply.startswith("HTTP/1.1 503") and '"too_many_connections"' in reply
    for conn in busy:
        conn.close()


# ---- the event loop stays free --------------------------------------------------------------------

def test_health_answers_while_long_prompts_are_tokenized(served, monkeypatch):
    render = serve_app.render_for_completion

    def slow_render(tokenizer, conversation):  # a long prompt's tokenization, without needing 8 MB
        time.sleep(1.5)
        return render(tokenizer, conversation)

    monkeypatch.setattr(serve_app, "render_for_completion", slow_render)
    s = served()
    threads = [threading.Thread(target=post, args=(s.url, HI)) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.3)  # the four are being tokenized
    start = time.monotonic()
    assert s.health()["status"] == "ok"
    assert time.monotonic() - start < 0.5
    for t in threads:
        t.join()


# ---- strict types ---------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [
    ("max_tokens", "10"), ("max_tokens", True), ("max_tokens", 10.5), ("temperature", True), ("temperature", "0.5"),
    ("n", "2"), ("stream", "yes"), ("stream", 1), ("use_tools", 0), ("top_k", 1.5), ("seed", "7"),
    ("seed", 2 ** 64), ("seed", -(2 ** 63) - 1), ("stop", 5), ("stream_options", {"include_usage": "true"}),
])
def test_loose_types_and_a_seed_past_64_bits_are_400s(shared, field, value):
    code, answer, _ = post(shared.url, {**HI, field: value})
    assert code == 400, answer
    assert answer["error"]["param"].split(".")[0] == field


def test_json_nested_thousands_deep_is_a_400_and_integers_stay_numbers(shared):
    s = shared
    for depth in (300, 5000):
        code, answer, _ = post(s.url, raw=b'{"messages": ' + b"[" * depth + b"]" * depth + b"}")
        assert code == 400 and answer["error"]["code"] == "invalid_json"
    for ok in ({"temperature": 0}, {"seed": 2 ** 64 - 1}, {"seed": -(2 ** 63)}, {"top_p": 1}):
        assert post(s.url, {**HI, **ok})[0] == 200, ok


# ---- the soak -------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("continuous,engine", [(False, "thread"), (True, "thread"), (True, "process")],
                         ids=["batches", "continuous", "process"])
def test_soak_64_clients_leaving_abandoning_and_misbehaving(served, continuous, engine):
    s = served(continuous=continuous, limits=Limits(context=256), engine=engine)
    report = run_soak(s.url, clients=64, duration=5, warmup=2, max_tokens=16, max_rss_growth=0.05)
    assert report.failures() == []
    assert report.outcomes["leave"] > 50 and report.outcomes["abandon"] > 20 and report.outcomes["bad"] > 20
    assert sum(len(t) for t in report.replies.values()) >= 8  # completed replies were compared
    assert (report.after["busy_slots"], report.after["waiting"]) == (0, 0)
    assert (report.after.get("engine_rss_bytes") is not None) == (engine == "process")  # its memory is checked too


@pytest.mark.slow
def test_bench_serve_soak_is_one_command_and_prints_counters_before_and_after(capsys):
    from tiny_chat import save_tiny_checkpoint

    from chatforge import cli

    save_tiny_checkpoint("sft", "d2", sequence_len=256)
    cli.main(["bench", "serve", "--soak", "--duration", "3", "--streams", "8", "--max-new-tokens", "8",
              "--device", "cpu"])  # a failed check would exit 1
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.split()[:1] in (["before"], ["after"])}
    assert rows["after"][:3] == ["0", "0", "1"]  # busy slots, waiting, connections
    assert "FAILED" not in out and "drained in" in out


def test_a_gpu_soak_reports_replies_that_part_ways_but_only_an_exact_one_fails_on_them():
    from chatforge.bench.soak import SoakReport

    def report(exact):
        r = SoakReport(exact_replies=exact, drained_s=0.0)
        r.mismatched.append("a reply to 'x' parts from the same request alone at character 40 of 60")
        return r

    assert any("character 40" in line for line in report(True).failures())
    assert report(False).failures() == []


@pytest.mark.slow
def test_bench_serve_reports_the_engine_ratio_and_what_a_long_prompt_did_to_running_streams(capsys):
    from chatforge import cli

    cli.main(["bench", "serve", "--depth", "1", "--vocab-size", "512", "--max-seq-len", "512", "--device", "cpu",
              "--streams", "4", "--requests", "8", "--max-new-tokens", "48", "--long-prompt", "30"])
    out = capsys.readouterr().out
    [row] = [line for line in out.splitlines() if line.startswith("| 4 | 8 |")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert int(cells[3].replace(",", "")) > 0 and cells[5].endswith("%")  # server tok/s and its share of the engine's
    [long] = [line for line in out.splitlines() if line.startswith("long prompt at 4 streams")]
    assert "prompt tokens, first token in" in long and "without a token" in long
    assert "| prefill: forward launch (host) |" in out  # the breakdown splits the prefill


def test_the_bench_random_server_counts_and_caps_connections_as_serve_does(monkeypatch):
    """`bench serve --depth D` (and its --soak) talk to bench/random_server.py: it must run with the
    same connection guard, or the soak's connection checks pass against a server that has none."""
    import uvicorn

    from chatforge.bench import random_server

    servers = []

    class Recorded(uvicorn.Server):
        def __init__(self, config):
            super().__init__(config)
            servers.append(self)

    monkeypatch.setattr(uvicorn, "Server", Recorded)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = ["--depth", "1", "--vocab-size", "512", "--max-seq-len", "64", "--port", str(port), "--device", "cpu"]
    thread = threading.Thread(target=random_server.main, args=(argv,), daemon=True)
    thread.start()
    try:
        for _ in range(2000):  # bounded: a depth-1 model loads in about a second
            if servers and servers[0].started:
                break
            time.sleep(0.01)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=30) as response:
            health = json.loads(response.read())
        assert health["connections"] == 1  # this very request, counted by the guard
    finally:
        if servers:
            servers[0].should_exit = True
        thread.join(30)
