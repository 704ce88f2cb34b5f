"""`chatforge bench serve --soak`: many clients, some of them rude, against a server for a while;
then a check that the server is as it was.

Each of --streams clients sends request after request until --duration is up, in a fixed
rotation: of every ten, two are streams it walks away from after the first chunk, one a plain
request it abandons before the reply, one a bad request (text/plain, a foreign Host, broken or
deeply nested JSON, loose types, a 65-bit seed, a body cut off), one a plain request and five
streams it reads to the end (one of the ten samples with a seed, the rest are greedy). Afterwards:

- no 5xx, and every bad request answered with a 4xx;
- every completed stream well formed (`data:` events, the role first, one finish_reason, the
  usage chunk, `[DONE]` last) and, like every plain reply, equal to the reply the server gives
  to the same request alone and not streamed (same prompt, temperature and seed);
- once the clients are gone: no busy slot, nothing waiting, no connection but the checker's own,
  within a few seconds;
- the server's resident memory grew by at most --max-rss-growth over the run (measured after a
  warm-up of the same load), and so did its engine processes' (serve/engine_process.py).

    chatforge bench serve --soak --duration 180 --streams 64 --max-new-tokens 128 --source sft
    chatforge bench serve --soak --duration 20 --streams 16 --max-new-tokens 16 --device cpu   # CPU

The CI test (tests/test_serve_hardening.py) runs `run_soak` at toy size on an in-process server.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
import urllib.parse
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from chatforge.runtime import print0

PROMPTS = ["Tell me about the sky.", "What is a cat?", "Say something about rivers.", "Why do bees buzz?",
           "Describe a train.", "What is 2 + 2?", "Name a prime number.", "How is bread made?"]
ROTATION = ["leave", "stream", "leave", "stream", "abandon", "sampled", "bad", "stream", "plain", "stream"]
SAMPLED = (0.8, 1234)  # temperature and seed of the sampled requests


@dataclass
class SoakReport:
    """What a soak saw; `failures()` says what was wrong, one line each."""
    seconds: float = 0.0
    outcomes: Counter = field(default_factory=Counter)   # kind -> count of requests as planned
    statuses: Counter = field(default_factory=Counter)   # HTTP status -> count (requests that got one)
    replies: dict = field(default_factory=dict)          # (prompt, temperature, seed) -> set of reply texts
    malformed: list[str] = field(default_factory=list)   # what was wrong with a stream or a reply
    mismatched: list[str] = field(default_factory=list)  # replies unlike the same request alone
    before: dict = field(default_factory=dict)           # server counters after the warm-up
    after: dict = field(default_factory=dict)            # ... once the clients were gone
    drained_s: float | None = None                       # seconds until no slot was busy and none waited
    max_rss_growth: float = 0.05
    # replies must equal the request sent alone bit for bit: true for an fp32 (CPU) server; in bf16 a
    # row's logits depend on what it was batched with, so a GPU server's replies may part ways late
    # (reported, with where, but not a failure)
    exact_replies: bool = True

    def rss_growth(self, key: str = "rss_bytes") -> float | None:
        """Growth of the server process's memory, or with key="engine_rss_bytes" the engine processes'."""
        a, b = self.before.get(key), self.after.get(key)
        return None if not a or not b else b / a - 1

    def failures(self) -> list[str]:
        out = []
        server_errors = sum(n for s, n in self.statuses.items() if s >= 500)
        if server_errors:
            out.append(f"{server_errors} requests got a 5xx")
        out += self.malformed[:5] + (self.mismatched[:5] if self.exact_replies else [])
        if self.drained_s is None:
            out.append(f"the server did not drain: {self.after}")
        elif self.after.get("connections", 0) > 1:
            out.append(f"{self.after['connections']} connections still open after the clients left")
        for key, whose in (("rss_bytes", "the server process's"), ("engine_rss_bytes", "the engine processes'")):
            growth = self.rss_growth(key)
            if growth is not None and growth > self.max_rss_growth:
                out.append(f"{whose} resident memory grew {growth:.1%} (at most {self.max_rss_growth:.0%} allowed)")
        return out


class _Client:
    """Raw HTTP to one server: what the soak's clients send, as bytes, so that they can misbehave."""

    def __init__(self, base_url: str, api_key: str | None):
        parts = urllib.parse.urlsplit(base_url)
        self.host, self.port = parts.hostname, parts.port or 80
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"

    def connect(self, timeout: float = 600) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def request(self, body, headers: dict | None = None, raw: bytes | None = None):
        """(connection, response) of a POST to /v1/chat/completions."""
        conn = self.connect()
        data = raw if raw is not None else json.dumps(body).encode()
        conn.request("POST", "/v1/chat/completions", body=data, headers={**self.headers, **(headers or {})})
        return conn, conn.getresponse()

    def get(self, path: str) -> tuple[int, bytes]:
        conn = self.connect(timeout=30)
        try:
            conn.request("GET", path, headers=self.headers)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def counters(self) -> dict:
        """The server's /health counters and, from /metrics, its resident memory."""
        status, body = self.get("/health")
        counters = json.loads(body) if status == 200 else {}
        status, body = self.get("/metrics")
        for line in body.decode().splitlines() if status == 200 else []:
            if line.startswith("process_resident_memory_bytes "):
                counters["rss_bytes"] = int(float(line.split()[1]))
            elif line.startswith("chatforge_engine_resident_memory_bytes "):
                counters["engine_rss_bytes"] = int(float(line.split()[1]))
        return counters


def request_body(prompt: int, max_tokens: int, sampled: bool, stream: bool) -> dict:
    temperature, seed = SAMPLED if sampled else (0.0, 7)
    body = {"messages": [{"role": "user", "content": PROMPTS[prompt % len(PROMPTS)]}], "max_tokens": max_tokens,
            "temperature": temperature, "seed": seed, "use_tools": False, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def reply_key(body: dict) -> tuple:
    return body["messages"][0]["content"], body["temperature"], body["seed"]


def parse_stream(raw: bytes) -> tuple[str | None, str | None]:
    """(the streamed text, None) for a well-formed OpenAI stream of one choice; else (None, what is wrong)."""
    events = raw.decode("utf-8", errors="replace").split("\n\n")
    if events and events[-1] == "":
        events.pop()
    if not events or events[-1] != "data: [DONE]":
        return None, "the stream does not end with data: [DONE]"
    if any(not e.startswith("data: ") for e in events):
        return None, "an event is not a data: line"
    try:
        chunks = [json.loads(e[6:]) for e in events[:-1]]
    except ValueError:
        return None, "an event is not JSON"
    if not chunks or chunks[0].get("choices", [{}])[0].get("delta", {}).get("role") != "assistant":
        return None, "the first chunk does not carry the assistant role"
    if len({c.get("id") for c in chunks}) != 1 or any(c.get("object") != "chat.completion.chunk" for c in chunks):
        return None, "chunks differ in id or are not chat.completion.chunk"
    text, finishes, usage = [], [], None
    for c in chunks:
        if c.get("usage"):
            usage = c["usage"]
        for choice in c.get("choices", []):
            if finishes and choice.get("delta", {}).get("content"):
                return None, "content after the finish_reason"
            text.append(choice.get("delta", {}).get("content") or "")
            if choice.get("finish_reason"):
                finishes.append(choice["finish_reason"])
    if len(finishes) != 1 or finishes[0] not in ("stop", "length"):
        return None, f"finish reasons {finishes}; expected one of stop or length"
    if usage is None or not isinstance(usage.get("completion_tokens"), int):
        return None, "no usage chunk although include_usage was asked"
    return "".join(text), None


def bad_requests(client: _Client, max_tokens: int) -> list:
    """Requests the server must answer with a 4xx: (name, function sending it -> status or None)."""
    good = json.dumps(request_body(0, max_tokens, False, False)).encode()

    def send(raw: bytes, headers: dict | None = None):
        conn, response = client.request(None, headers=headers, raw=raw)
        try:
            response.read()
            return response.status
        finally:
            conn.close()

    def cut_off_body():  # headers promise more than is sent, then the client leaves: no reply
        with socket.create_connection((client.host, client.port), timeout=30) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
                      b"\r\nContent-Length: %d\r\n\r\n" % len(good) + good[:len(good) // 2])

    return [
        ("text/plain", lambda: send(good, {"Content-Type": "text/plain"})),
        ("foreign Host", lambda: send(good, {"Host": "rebound.example"})),
        ("broken JSON", lambda: send(good[:-3])),
        ("deep JSON", lambda: send(b'{"messages": ' + b"[" * 5000 + b"]" * 5000 + b"}")),
        ("string max_tokens", lambda: send(good.replace(b'"max_tokens": %d' % max_tokens, b'"max_tokens": "10"'))),
        ("65-bit seed", lambda: send(good.replace(b'"seed": 7', b'"seed": %d' % 2 ** 64))),
        ("cut-off body", cut_off_body),
    ]


def _client_loop(client: _Client, index: int, deadline: float, max_tokens: int, report: SoakReport,
                 lock: threading.Lock) -> None:
    bad = bad_requests(client, max_tokens)
    turn = index  # clients start at different places in the rotation
    while time.monotonic() < deadline:
        kind = ROTATION[turn % len(ROTATION)]
        prompt = index + turn
        turn += 1
        outcome = _one(client, kind, prompt, max_tokens, bad[(index + turn) % len(bad)], report, lock)
        with lock:
            report.outcomes[kind] += 1
            if outcome is not None:
                report.statuses[outcome] += 1


def _one(client: _Client, kind: str, prompt: int, max_tokens: int, bad, report: SoakReport,
         lock: threading.Lock) -> int | None:
    """Send one request of `kind`; the status it got (None when the client left before one)."""
    def note(problem_list: list, line: str):
        with lock:
            problem_list.append(line)

    if kind == "bad":
        name, send = bad
        status = send()
        if status is not None and not 400 <= status < 500:
            note(report.malformed, f"bad request ({name}) got {status}, not a 4xx")
        return status
    stream = kind in ("stream", "leave", "sampled")
    body = request_body(prompt, max_tokens, kind == "sampled", stream)
    if kind == "abandon":  # sent, then the client leaves before the reply
        conn = client.connect()
        try:
            conn.request("POST", "/v1/chat/completions", body=json.dumps(body).encode(), headers=client.headers)
            time.sleep(0.01 * (prompt % 5))
        finally:
            conn.close()
        return None
    conn, response = client.request(body)
    try:
        if kind == "leave":
            response.readline()  # the first event has come: walk away mid-stream
            return response.status
        raw = response.read()
        if response.status != 200:
            return response.status
        if stream:
            text, problem = parse_stream(raw)
        else:
            reply = json.loads(raw)
            choice = reply["choices"][0]
            text = choice["message"]["content"]
            problem = None if choice["finish_reason"] in ("stop", "length") else f"finish_reason {choice}"
        if problem:
            note(report.malformed, f"{kind} request: {problem}")
        else:
            with lock:
                report.replies.setdefault(reply_key(body), set()).add(text)
        return response.status
    finally:
        conn.close()


def _drain(client: _Client, timeout: float) -> tuple[float | None, dict]:
    """(seconds until no slot is busy, nothing waits and only our connection is open, or None; the
    counters then)."""
    start = time.monotonic()
    while True:
        counters = client.counters()
        if counters.get("busy_slots") == 0 and counters.get("waiting") == 0 and counters.get("connections", 0) <= 1:
            return time.monotonic() - start, counters
        if time.monotonic() - start > timeout:
            return None, counters
        time.sleep(0.05)


def _load(client: _Client, clients: int, seconds: float, max_tokens: int, report: SoakReport) -> None:
    lock = threading.Lock()
    deadline = time.monotonic() + seconds
    with ThreadPoolExecutor(max_workers=clients) as pool:
        for future in [pool.submit(_client_loop, client, i, deadline, max_tokens, report, lock)
                       for i in range(clients)]:
            future.result()


def run_soak(base_url: str, clients: int = 64, duration: float = 180.0, max_tokens: int = 64,
             warmup: float | None = None, api_key: str | None = None, max_rss_growth: float = 0.05,
             drain_timeout: float = 10.0, exact_replies: bool = True) -> SoakReport:
    """Soak the server at `base_url` (see the module docstring); the report says what went wrong."""
    client = _Client(base_url, api_key)
    warmup = min(max(duration * 0.1, 1.0), 15.0) if warmup is None else warmup
    _load(client, clients, warmup, max_tokens, SoakReport())  # allocator, caches, thread stacks at this load
    _drain(client, drain_timeout)
    report = SoakReport(before=client.counters(), max_rss_growth=max_rss_growth, exact_replies=exact_replies)
    start = time.monotonic()
    _load(client, clients, duration, max_tokens, report)
    report.seconds = time.monotonic() - start
    report.drained_s, report.after = _drain(client, drain_timeout)
    for (content, temperature, seed), texts in report.replies.items():
        alone = {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
                 "temperature": temperature, "seed": seed, "use_tools": False}
        conn, response = client.request(alone)
        try:
            reference = json.loads(response.read())["choices"][0]["message"]["content"]
        finally:
            conn.close()
        for text in texts - {reference}:
            same = next((i for i, (a, b) in enumerate(zip(text, reference)) if a != b), min(len(text), len(reference)))
            report.mismatched.append(f"a reply to {content!r} (temperature {temperature}, seed {seed}) parts from "
                                     f"the same request alone at character {same} of {len(reference)}: "
                                     f"{text[same:same + 30]!r} vs {reference[same:same + 30]!r}")
    return report


def print_report(report: SoakReport) -> None:
    def mb(counters, key="rss_bytes"):
        return f"{counters[key] / 2 ** 20:.0f} MB" if counters.get(key) else "?"

    done = sum(report.outcomes.values())
    print0(f"soak: {done} requests in {report.seconds:.0f}s: " + ", ".join(f"{k} {v}" for k, v in
                                                                           sorted(report.outcomes.items())))
    print0("soak: statuses " + ", ".join(f"{s}: {n}" for s, n in sorted(report.statuses.items())))
    print0(f"{'':>8} {'busy slots':>10} {'waiting':>8} {'connections':>11} {'RSS':>9} {'engine RSS':>10}")
    for name, c in (("before", report.before), ("after", report.after)):
        print0(f"{name:>8} {c.get('busy_slots', '?'):>10} {c.get('waiting', '?'):>8} {c.get('connections', '?'):>11} "
               f"{mb(c):>9} {mb(c, 'engine_rss_bytes'):>10}")
    growth, engine_growth = report.rss_growth(), report.rss_growth("engine_rss_bytes")
    drained = "never" if report.drained_s is None else f"in {report.drained_s:.2f}s"
    engine = "" if engine_growth is None else f", engine processes {engine_growth:+.1%}"
    print0(f"soak: drained {drained}; RSS growth {'?' if growth is None else f'{growth:+.1%}'}{engine}; "
           f"{sum(len(t) for t in report.replies.values())} distinct replies checked against the same "
           f"request alone, {len(report.mismatched)} differ"
           f"{'' if report.exact_replies else ' (bf16: batch-dependent rounding, not a failure)'}; "
           f"{len(report.malformed)} malformed")
    if not report.exact_replies:
        for line in report.mismatched[:5]:
            print0(f"soak: note: {line}")
    for line in report.failures():
        print0(f"soak: FAILED: {line}")
