"""`chatforge serve`: an OpenAI-compatible chat API and a ChatGPT-like web UI on the engine.

    chatforge serve                                   # latest sft checkpoint, http://127.0.0.1:8000
    chatforge serve --source rl --port 8080 --api-key secret
    chatforge serve --host 0.0.0.0 --api-key secret --cors-origin https://my.site   # reachable from elsewhere

One engine replica per GPU (all visible GPUs unless --replicas), or one on CPU, behind one request
queue (serve/workers.py): concurrent requests with the same sampling settings are decoded together,
joining the running decode at its next step (--scheduling batch: whole batches), the others wait
their turn; a client that disconnects, streaming or not, frees its place in the queue at once and
its slot at the next decode step.

## The API

`POST /v1/chat/completions` — the OpenAI Chat Completions request and response:
- `messages`: `[{role, content}]`, roles `system` (or `developer`), `user`, `assistant`; user and
  system content is a string or a list of `{"type": "text", "text": ...}` parts; assistant content
  may also carry chatforge's own parts (`{"type": "python"|"python_output", "text": ...}`), which is
  how the web UI sends back a reply that used the tool. The last message must be from the user.
- `model` (optional; when given it must be one of the ids `GET /v1/models` lists: the checkpoint's
  own, e.g. `chatforge-sft-d20`, or the stable alias `chatforge`, which names whatever this server
  serves, so client code need not change when the checkpoint does), `temperature` [0, 2]
  (default 1; 0 is greedy), `top_p` (0, 1], `top_k` (extension, >= 1), `max_tokens` or
  `max_completion_tokens` [1, context] (default: --max-new-tokens), `n` [1, --max-n], `seed`
  (64 bits),
  `stop` (a string or up to 4; the reply is cut before it), `stream`, `stream_options.include_usage`,
  `use_tools` (extension, default true: the engine runs the python the model writes).
- Reply: `choices[i].message.content` is the text, with a tool call and its output shown as fenced
  blocks (```` ```python ```` and ```` ```output ````); `choices[i].message.chatforge_parts` has the
  same reply as conversation parts. `finish_reason` is `stop` or `length`; `usage` counts tokens
  (completion tokens include the tool output the engine fed in).
- `stream: true`: server-sent events, one `chat.completion.chunk` per step and choice
  (`delta.content`, plus `delta.chatforge_pieces`: `[{kind, text, open}]` for the UI), a final chunk
  per choice with its `finish_reason`, a usage chunk when asked, then `data: [DONE]`.

`GET /v1/models` (and `/v1/models/{id}`): the one model served, listed under both its ids (the
alias's card names the checkpoint in `root`); replies always carry the checkpoint's id in `model`,
as OpenAI answers an alias with the snapshot it resolved to. `GET /health` (never needs the key):
status, replicas, `busy` (replicas generating), `busy_slots` (rows decoding for clients still
there), `waiting` (queued requests whose clients are still there), `connections` (open now),
`evicted` and `refused` (connections closed at --max-connections), and `timing`: seconds and
counts per phase of the serving path since start, what `chatforge bench serve` prints as its
breakdown. `GET /metrics`: the same and the
server's resident memory in the Prometheus text format. `GET /`: the web UI (static files, no
build step, offline).

Types are strict, as OpenAI's: a number must be a JSON number (an integer where one is meant) and a
flag a JSON boolean; `"10"` or `true` for `max_tokens` is a 400.

Errors use OpenAI's shape `{"error": {"message", "type", "param", "code"}}`:
400 malformed JSON (nested past ~200 levels included), a wrong type, a bad role, an empty or too
long message, too many messages, a prompt that does not fit the context (code
`context_length_exceeded`), a value out of range, a Host header the server does not answer to
(code `invalid_host`); 401 a missing or wrong key (code `invalid_api_key`); 404 an unknown route or
model; 405 a wrong method; 408 a body slower than --read-timeout; 413 a body over --max-body-bytes;
415 a body not sent as `Content-Type: application/json`; 429 the queue is full (--max-queue);
503 every one of --max-connections is busy with a request.

Auth: with --api-key (or CHATFORGE_API_KEY) every API route needs `Authorization: Bearer <key>`;
/health and the UI's static files stay open (they reveal nothing; the page asks for the key).
CORS is off unless --cors-origin names the allowed origins (its headers are on 401s too). Against
other web pages the user visits (serve/guard.py): the API takes only JSON bodies, which a page
cannot send cross-site without a CORS preflight; a Host header other than the names the server
answers to is refused (DNS rebinding); and a --host other than loopback needs --api-key unless
--allow-no-key says it should be open. Against slow or many clients: --read-timeout for a request's
headers and body, --max-connections open at once. One log line per request: id, method, path,
status (499: the client left first), tokens in/out, time to first token, latency; the conversation
only with --log-content.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pydantic_core
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from chatforge.conversation import render_for_completion, validate_conversation
from chatforge.errors import ChatforgeError
from chatforge.runtime import print0
from chatforge.serve.guard import Connections, HostCheck, default_allowed_hosts, metrics_text, resident_bytes
from chatforge.serve.workers import Delta, EngineUnavailable, Job, QueueFull, WorkerPool

STATIC_DIR = Path(__file__).parent / "static"
STAGES = ("sft", "mid", "base", "rl")
ROLE_ALIASES = {"developer": "system"}
OPEN_PATHS = ("/health", "/", "/static/")  # no key needed (see the docstring)
STABLE_MODEL_ID = "chatforge"  # answers for any checkpoint: README's client snippet relies on it
SEED_RANGE = (-(2 ** 63), 2 ** 64 - 1)  # what a 64-bit seed can hold, signed or not


@dataclass
class Limits:
    """What one request may ask for; out of range means a 400 naming the field."""
    context: int                     # the model's sequence length: prompt + reply must fit
    max_messages: int = 256
    max_message_chars: int = 32_000
    max_body_bytes: int = 1_000_000
    max_n: int = 8
    max_stops: int = 4
    default_max_tokens: int = 512
    max_temperature: float = 2.0


class ApiError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or ("server_error" if status >= 500 else "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _json_response(status: int, body: dict, headers: dict | None = None):
    return JSONResponse(body, status_code=status, headers=headers)


# ---- request parsing ----------------------------------------------------------------------------

# strict: a number must be a JSON number and a flag a JSON boolean ("10" and true are not 10), as
# OpenAI's API answers; an integer is still a valid float
class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: str
    text: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    include_usage: bool = False


class ChatRequest(BaseModel):
    """The request body; other OpenAI fields are accepted and ignored (extra="allow")."""
    model_config = ConfigDict(extra="allow", strict=True)
    messages: list[Message]
    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    n: int = 1
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    use_tools: bool = True


def _validation_error(exc) -> ApiError:
    """pydantic's first complaint as a 400 naming the field (FastAPI would answer 422)."""
    err = exc.errors()[0]
    loc = [str(x) for x in err.get("loc", ()) if x not in ("body",)]
    param = ".".join(loc).replace(".[", "[") or None
    if err.get("type") == "json_invalid":
        return ApiError(400, f"the request body is not valid JSON ({err.get('msg')}); send a JSON object",
                        code="invalid_json")
    return ApiError(400, f"{param or 'body'}: {err.get('msg')}", param=param, code="invalid_value")


def _message_text(i: int, role: str, content) -> str | list[dict]:
    """A message's content as chatforge's conversation wants it."""
    param = f"messages[{i}].content"
    if content is None:
        raise ApiError(400, f"{param} is missing; every message needs content", param=param)
    if isinstance(content, str):
        return content
    if role == "assistant":
        parts = []
        for j, part in enumerate(content):
            if part.type not in ("text", "python", "python_output") or part.text is None:
                raise ApiError(400, f"{param}[{j}] must be {{type: text|python|python_output, text: str}}",
                               param=f"{param}[{j}]")
            parts.append({"type": part.type, "text": part.text})
        return parts
    texts = []
    for j, part in enumerate(content):
        if part.type != "text" or part.text is None:
            raise ApiError(400, f"{param}[{j}] has type {part.type!r}; this model reads only text parts",
                           param=f"{param}[{j}]")
        texts.append(part.text)
    return "\n".join(texts)


def unknown_model(name: str, model_ids: tuple[str, ...]) -> ApiError:
    served = " or ".join(repr(m) for m in model_ids)
    return ApiError(404, f"model {name!r} does not exist here; this server answers to {served}",
                    param="model", code="model_not_found")


def parse_request(data, limits: Limits, model_ids: tuple[str, ...], tokenizer) -> tuple[object, list[int], Job]:
    """Validate a decoded JSON body: (the request, its prompt ids, a Job ready to submit).

    `model_ids` are the names a request may give in `model` (the checkpoint's id first)."""
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object with a 'messages' list", code="invalid_json")
    try:
        req = ChatRequest.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc) from None
    if req.model is not None and req.model not in model_ids:
        raise unknown_model(req.model, model_ids)
    if not req.messages:
        raise ApiError(400, "messages is empty; send at least one user message", param="messages")
    if len(req.messages) > limits.max_messages:
        raise ApiError(400, f"messages has {len(req.messages)} entries; at most {limits.max_messages} are allowed "
                            "(start a new conversation)", param="messages", code="too_many_messages")
    messages = []
    for i, m in enumerate(req.messages):
        role = ROLE_ALIASES.get(m.role, m.role)
        if role not in ("system", "user", "assistant"):
            raise ApiError(400, f"messages[{i}].role is {m.role!r}; use system, user or assistant",
                           param=f"messages[{i}].role")
        content = _message_text(i, role, m.content)
        size = len(content) if isinstance(content, str) else sum(len(p["text"]) for p in content)
        if size > limits.max_message_chars:
            raise ApiError(400, f"messages[{i}].content is {size} characters; at most {limits.max_message_chars} "
                                "are allowed", param=f"messages[{i}].content", code="message_too_long")
        if role != "assistant" and not content.strip():
            raise ApiError(400, f"messages[{i}].content is empty; write something", param=f"messages[{i}].content")
        messages.append({"role": role, "content": content})
    if messages[-1]["role"] != "user":
        raise ApiError(400, f"the last message is from {messages[-1]['role']!r}; the last message must be the user's",
                       param=f"messages[{len(messages) - 1}].role")
    try:
        validate_conversation({"messages": messages})
    except ChatforgeError as exc:
        raise ApiError(400, str(exc), param="messages") from None
    prompt = render_for_completion(tokenizer, {"messages": messages})
    if len(prompt) >= limits.context:
        raise ApiError(400, f"the messages are {len(prompt)} tokens but the model's context is {limits.context}; "
                            "shorten or drop earlier messages", param="messages", code="context_length_exceeded")

    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    field = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    if max_tokens is None:
        max_tokens = min(limits.default_max_tokens, limits.context)
    elif not 1 <= max_tokens <= limits.context:
        raise ApiError(400, f"{field} is {max_tokens}; it must be between 1 and the context, {limits.context}",
                       param=field, code="invalid_value")
    temperature = 1.0 if req.temperature is None else req.temperature
    if not 0 <= temperature <= limits.max_temperature:
        raise ApiError(400, f"temperature is {temperature}; it must be between 0 and {limits.max_temperature}",
                       param="temperature", code="invalid_value")
    if req.top_p is not None and not 0 < req.top_p <= 1:
        raise ApiError(400, f"top_p is {req.top_p}; it must be in (0, 1]", param="top_p", code="invalid_value")
    if req.top_k is not None and req.top_k < 1:
        raise ApiError(400, f"top_k is {req.top_k}; it must be at least 1", param="top_k", code="invalid_value")
    if req.seed is not None and not SEED_RANGE[0] <= req.seed <= SEED_RANGE[1]:
        raise ApiError(400, f"seed is {req.seed}; it must fit in 64 bits", param="seed", code="invalid_value")
    if not 1 <= req.n <= limits.max_n:
        raise ApiError(400, f"n is {req.n}; it must be between 1 and {limits.max_n}", param="n", code="invalid_value")
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > limits.max_stops or any(not s or len(s) > 200 for s in stops):
        raise ApiError(400, f"stop must be at most {limits.max_stops} non-empty strings of up to 200 characters",
                       param="stop", code="invalid_value")
    job = Job(prompt=prompt, max_tokens=max_tokens, n=req.n, temperature=temperature, top_k=req.top_k,
              top_p=req.top_p, seed=req.seed, stop=tuple(stops), use_tools=req.use_tools)
    return req, prompt, job


# ---- responses ----------------------------------------------------------------------------------

class ReplyParts:
    """Collects one choice's pieces into the readable text and the conversation parts."""

    def __init__(self):
        self.shown: list[str] = []
        self.parts: list[dict] = []

    def add(self, piece) -> None:
        self.shown.append(piece.shown)
        if piece.open or (piece.text and (not self.parts or self.parts[-1]["type"] != piece.kind)):
            self.parts.append({"type": piece.kind, "text": ""})
        if piece.text:
            self.parts[-1]["text"] += piece.text

    def content(self) -> str:
        return "".join(self.shown)


def _piece_json(piece) -> dict:
    return {"kind": piece.kind, "text": piece.text, "open": piece.open}


class ClientGone(Exception):
    """Put on a job's queue when its client closed the connection before the reply was complete."""


async def _next_delta(job: Job) -> Delta:
    """The job's next Delta; a 499 (seen only in the log) once the client has gone."""
    delta = await job.queue.get()
    if isinstance(delta.error, ClientGone):
        raise ApiError(499, "the client closed the connection before its reply was complete", code="client_closed")
    return delta


def watch_disconnect(request, job: Job, wake: bool) -> asyncio.Task:
    """A task that cancels `job` the moment its client disconnects, so the worker drops its rows at
    its next decode step (or its place in the queue); with `wake`, `_next_delta` then stops waiting.

    Once the body is read, uvicorn's `receive()` returns only on a disconnect or after the response
    was sent (a no-op cancel then). A streamed reply is also stopped by Starlette's own listener."""
    async def watch():
        while (await request.receive())["type"] != "http.disconnect":
            pass
        if wake:
            job.queue.put_nowait(Delta(error=ClientGone()))
        job.cancel()
    return asyncio.ensure_future(watch())


def _raise_job_error(exc: Exception):
    if isinstance(exc, EngineUnavailable):
        raise ApiError(503, str(exc), code="engine_unavailable", type_="server_error")
    if isinstance(exc, ChatforgeError):
        raise ApiError(400, str(exc))
    raise ApiError(500, f"generation failed ({type(exc).__name__}); see the server log")


# ---- the app ------------------------------------------------------------------------------------

def create_app(pool: WorkerPool, model_id: str, limits: Limits, api_key: str | None = None,
               cors_origins: list[str] | None = None, log_content: bool = False,
               allowed_hosts: list[str] | None = None, connections: Connections | None = None):
    """The FastAPI app serving `pool`'s engines (uvicorn runs it with `server_config`; tests run it
    in a thread).

    `model_id` is the checkpoint's name; requests may also say STABLE_MODEL_ID. `allowed_hosts`: the
    Host names answered besides IP literals (default: localhost; ["*"]: any). `connections`: the
    connection cap and read timeout (kept on `app.state.connections` for the server's protocol)."""
    tokenizer = pool.engine.tokenizer
    connections = connections or Connections()
    model_ids = (model_id,) if model_id == STABLE_MODEL_ID else (model_id, STABLE_MODEL_ID)
    created = int(time.time())
    app = FastAPI(title="chatforge", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.connections = connections

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        # a body left unread (too large, too slow, cut off) leaves nothing to keep the connection for
        close = {"Connection": "close"} if exc.status in (408, 413, 499) else None
        return _json_response(exc.status, exc.body(), headers=close)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc):
        err = _validation_error(exc)
        return _json_response(err.status, err.body())

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        if exc.status_code == 404:
            err = ApiError(404, f"there is no route {request.method} {request.url.path}; see GET /v1/models, "
                                "POST /v1/chat/completions, GET /health", code="unknown_url")
        elif exc.status_code == 405:
            err = ApiError(405, f"{request.method} is not allowed on {request.url.path}", code="method_not_allowed")
        else:
            err = ApiError(exc.status_code, str(exc.detail))
        return _json_response(err.status, err.body(), headers=getattr(exc, "headers", None))

    def model_card(name: str) -> dict:
        return {"id": name, "object": "model", "created": created, "owned_by": "chatforge",
                "root": model_id, "context_length": limits.context}

    def counters() -> dict:
        return {"busy": pool.busy(), "busy_slots": pool.busy_slots(), "waiting": pool.waiting(),
                "connections": connections.count(), "evicted": connections.evicted, "refused": connections.refused}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id, "replicas": len(pool.engines), **counters(),
                "timing": await asyncio.to_thread(pool.timing_report)}  # an engine process is asked

    @app.get("/metrics")
    async def metrics():
        engine_rss = getattr(pool, "engine_resident_bytes", lambda: None)()  # engine processes, when apart
        return PlainTextResponse(metrics_text({**counters(), "rss_bytes": resident_bytes(), "engine_rss_bytes": engine_rss}),
                                 media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card(name) for name in model_ids]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        if name not in model_ids:
            raise unknown_model(name, model_ids)
        return model_card(name)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        _require_json(request)
        body = await _read_body(request, limits.max_body_bytes, connections.read_timeout)
        # off the event loop: tokenizing a long prompt takes long enough to stall every other client
        data, (req, prompt, job) = await asyncio.to_thread(_parse_body, body, limits, model_ids, tokenizer)
        state = request.scope.setdefault("state", {})
        state["tokens_in"], state["job"] = len(prompt), job
        if log_content:
            state["content"] = {"messages": data.get("messages")}
        try:
            pool.submit(job)
        except QueueFull as exc:
            raise ApiError(429, str(exc), code="queue_full", type_="server_busy") from None
        except EngineUnavailable as exc:
            _raise_job_error(exc)
        state["watcher"] = watch_disconnect(request, job, wake=not req.stream)  # held: tasks are weakly kept
        rid = "chatcmpl-" + state["request_id"]
        header = {"id": rid, "created": int(time.time()), "model": model_id, "system_fingerprint": None}
        usage = lambda: {"prompt_tokens": len(prompt), "completion_tokens": job.completion_tokens,  # noqa: E731
                         "total_tokens": len(prompt) + job.completion_tokens}
        replies = [ReplyParts() for _ in range(job.n)]
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(_sse(job, header, replies, usage, include_usage, state),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        finish = [None] * job.n
        try:
            while not all(finish):
                delta = await _next_delta(job)
                if delta.error is not None:
                    _raise_job_error(delta.error)
                for piece in delta.pieces:
                    replies[delta.choice].add(piece)
                if delta.finish_reason:
                    finish[delta.choice] = delta.finish_reason
        finally:
            job.cancel()  # a no-op when finished; frees the slot when the client went away
            state["watcher"].cancel()
        if log_content:
            state["content"]["reply"] = [r.content() for r in replies]
        choices = [{"index": i, "message": {"role": "assistant", "content": r.content(), "chatforge_parts": r.parts},
                    "logprobs": None, "finish_reason": finish[i]} for i, r in enumerate(replies)]
        return {**header, "object": "chat.completion", "choices": choices, "usage": usage()}

    if STATIC_DIR.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

        @app.get("/")
        async def index():
            return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    # the last added runs first: log, Host check, CORS (so a 401 carries its headers too), auth
    if api_key:
        app.add_middleware(BearerAuth, api_key=api_key)
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware
        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(HostCheck, allowed=default_allowed_hosts("127.0.0.1", []) if allowed_hosts is None
                       else allowed_hosts, refuse=_wrong_host)
    app.add_middleware(RequestLog, log_content=log_content)  # outermost: sees every answer
    return app


def _wrong_host(host: str):
    err = ApiError(400, f"Host {host!r} is not a name this server answers to (a guard against DNS rebinding); "
                        "start it with --allowed-hosts NAME to allow it", code="invalid_host")
    return _json_response(400, err.body())


def _require_json(request) -> None:
    """Only JSON bodies: a cross-site form or text/plain POST needs no CORS preflight, so without this
    any web page could drive the server."""
    media = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media != "application/json":
        raise ApiError(415, f"Content-Type is {media or 'missing'!r}; send the body as JSON with "
                            "'Content-Type: application/json'", code="unsupported_media_type")


def _parse_body(body: bytes, limits: Limits, model_ids: tuple[str, ...], tokenizer):
    """(the decoded JSON, parse_request's result) of a request body; run in a thread."""
    try:
        data = pydantic_core.from_json(body)  # nesting past ~200 levels, bad UTF-8, lone surrogates: errors
    except ValueError as exc:
        raise ApiError(400, f"the request body is not valid JSON ({exc}); send a JSON object",
                       code="invalid_json") from None
    return data, parse_request(data, limits, model_ids, tokenizer)


async def _read_body(request, limit: int, timeout: float) -> bytes:
    """The body, refused with 413 past `limit` bytes (by Content-Length, or while reading) and 408
    when it takes over `timeout` seconds; a client that leaves mid-body gets a 499 in the log."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is {declared} bytes; at most {limit} are accepted (--max-body-bytes)",
                       code="request_too_large")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise ApiError(413, f"the request body is over {limit} bytes (--max-body-bytes)",
                                   code="request_too_large")
                chunks.append(chunk)
    except TimeoutError:
        raise ApiError(408, f"the request body took over {timeout:g} s to arrive (--read-timeout)",
                       code="request_timeout") from None
    except ClientDisconnect:
        raise ApiError(499, "the client closed the connection before its body was complete",
                       code="client_closed") from None
    return b"".join(chunks)


async def _sse(job: Job, header: dict, replies: list, usage, include_usage: bool, state: dict):
    """The streamed reply: OpenAI chunks as server-sent events, ending with [DONE].

    Every delta waiting when the client's turn comes is sent in one event per choice, so a client
    (or an event loop) that falls behind gets fewer, larger chunks instead of falling further behind."""
    head = "data: " + json.dumps({**header, "object": "chat.completion.chunk"})[:-1] + ', "choices": '
    timing = job.loop_timing

    def event(choices, **extra) -> str:
        tail = "".join(f", {json.dumps(k)}: {json.dumps(v)}" for k, v in extra.items())
        return head + json.dumps(choices) + tail + "}\n\n"

    try:
        yield event([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None} for i in range(job.n)])
        finished = 0
        while finished < job.n:
            deltas = [job.queue.get_nowait() if not job.queue.empty() else await _next_delta(job)]
            while not job.queue.empty():
                deltas.append(job.queue.get_nowait())
            start = time.perf_counter()
            failed = next((d.error for d in deltas if d.error is not None), None)
            if failed is not None:
                try:
                    _raise_job_error(failed)
                except ApiError as err:
                    yield "data: " + json.dumps(err.body()) + "\n\n"
                break
            pieces: dict[int, list] = {}
            ends = []
            for delta in deltas:
                pieces.setdefault(delta.choice, []).extend(delta.pieces)
                if delta.finish_reason:
                    ends.append(delta)
            out = []
            for choice, chosen in pieces.items():
                if not chosen:
                    continue
                for piece in chosen:
                    replies[choice].add(piece)
                out.append(event([{"index": choice, "logprobs": None, "finish_reason": None,
                                   "delta": {"content": "".join(p.shown for p in chosen),
                                             "chatforge_pieces": [_piece_json(p) for p in chosen]}}]))
            for delta in ends:
                finished += 1
                out.append(event([{"index": delta.choice, "delta": {}, "logprobs": None,
                                   "finish_reason": delta.finish_reason}]))
            if timing is not None:
                timing.add("SSE chunks (event loop)", time.perf_counter() - start, len(out))
            if out:
                yield "".join(out)
        if include_usage:
            yield event([], usage=usage())
        if "content" in state:
            state["content"]["reply"] = [r.content() for r in replies]
        yield "data: [DONE]\n\n"
    finally:
        job.cancel()


class BearerAuth:
    """ASGI middleware: every route but OPEN_PATHS needs `Authorization: Bearer <key>`."""

    def __init__(self, app, api_key: str):
        self.app, self.key = app, api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] == "OPTIONS" or _is_open(scope["path"]):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.key):
            return await self.app(scope, receive, send)
        err = ApiError(401, "missing or wrong API key; send the header 'Authorization: Bearer <key>' with the "
                            "server's --api-key", code="invalid_api_key")
        await _json_response(401, err.body(), headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)


def _is_open(path: str) -> bool:
    return path in ("/health", "/") or path.startswith("/static/")


class RequestLog:
    """ASGI middleware: one line per request when its answer has been sent (streams included)."""

    def __init__(self, app, log_content: bool = False):
        self.app, self.log_content = app, log_content

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = scope.setdefault("state", {})
        state["request_id"] = uuid.uuid4().hex[:24]
        start, status, logged = time.perf_counter(), [500], [False]

        def log():
            if logged[0]:
                return
            logged[0] = True
            job = state.get("job")
            line = (f"serve: {state['request_id']} {scope['method']} {scope['path']} {status[0]} "
                    f"in={state.get('tokens_in', 0)} out={job.completion_tokens if job else 0} ")
            if job is not None and job.ttft is not None:
                line += f"ttft={job.ttft:.3f}s "
            line += f"latency={time.perf_counter() - start:.3f}s"
            if self.log_content and "content" in state:
                line += " content=" + json.dumps(state["content"], ensure_ascii=False)
            print0(line)

        async def logging_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                log()

        try:
            await self.app(scope, receive, logging_send)
        finally:
            log()
