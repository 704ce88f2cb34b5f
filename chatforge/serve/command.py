"""`chatforge serve`: its arguments, the engines it loads, the port it binds, and running the app
of serve/app.py on it (in the foreground, or in a background thread for tests and notebooks).
What the server answers and how is serve/app.py's docstring."""

from __future__ import annotations

import argparse
import os
import time

from chatforge.errors import UsageError
from chatforge.flags import add_compile_flag, add_flag
from chatforge.runtime import add_runtime_arguments, print0
from chatforge.serve.app import STAGES, Limits, create_app
from chatforge.serve.guard import Connections, check_exposure, default_allowed_hosts, server_config
from chatforge.serve.workers import WorkerPool


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", default="sft", choices=STAGES, help="which stage's checkpoint (default: sft)")
    parser.add_argument("--tag", default=None, help="checkpoint tag, e.g. d20 (default: the most recent)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 picks a free one)")
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' on every route but /health and the UI "
                             "(default: $CHATFORGE_API_KEY; none means open)")
    parser.add_argument("--allow-no-key", action="store_true",
                        help="serve a --host other than loopback without --api-key (refused otherwise)")
    parser.add_argument("--allowed-hosts", action="append", default=[], metavar="NAME",
                        help="also answer requests whose Host header is NAME (repeatable; '*' for any; default: "
                             "IP addresses, localhost, the --host name and, on 0.0.0.0, this machine's names)")
    parser.add_argument("--cors-origin", action="append", default=[],
                        help="allow browser calls from this origin (repeatable; '*' for any; default: CORS off)")
    parser.add_argument("--log-content", action="store_true", help="also log the messages and replies")
    parser.add_argument("--replicas", type=int, default=None, help="engine replicas (default: one per GPU, or 1)")
    parser.add_argument("--max-batch", type=int, default=32, help="most prompts decoded together per replica")
    parser.add_argument("--scheduling", choices=("continuous", "batch"), default="continuous",
                        help="continuous (default): requests join the running decode at the next step, long "
                             "prompts are prefilled in chunks between steps; batch: whole batches run to the end")
    parser.add_argument("--continuous-batching", dest="scheduling", action="store_const", const="continuous",
                        help=argparse.SUPPRESS)  # the default now; kept so older command lines still run
    parser.add_argument("--no-continuous-batching", dest="scheduling", action="store_const", const="batch",
                        help="the same as --scheduling batch")
    parser.add_argument("--max-queue", type=int, default=256, help="most waiting requests before 429s")
    parser.add_argument("--engine", choices=("process", "thread"), default="process",
                        help="where each replica's decode loop runs: process (default), a process of its own, so "
                             "HTTP work never holds the GIL it needs; thread: inside the server process")
    parser.add_argument("--max-messages", type=int, default=256, help="most messages in one request")
    parser.add_argument("--max-message-chars", type=int, default=32_000, help="longest message, in characters")
    parser.add_argument("--max-body-bytes", type=int, default=1_000_000, help="largest request body (413 past it)")
    parser.add_argument("--max-n", type=int, default=8, help="most choices (n) in one request")
    add_flag(parser, "--max-new-tokens", "--default-max-tokens", type=int, default=512,
             help="reply length when a request sets no max_tokens (default: 512)")
    parser.add_argument("--max-connections", type=int, default=1024,
                        help="most open connections; past it an idle or slow one is closed, else a 503")
    parser.add_argument("--read-timeout", type=float, default=20.0,
                        help="seconds a client has to send a request's headers, and then its body (408)")
    add_compile_flag(parser, "the decode step", "off (on compiles on CUDA only)")
    add_runtime_arguments(parser)


def replica_devices(args) -> list[str]:
    """The device of each replica: GPU i for replica i on CUDA, one replica elsewhere."""
    import torch

    from chatforge.runtime import pick_device

    device = pick_device(args.device)[0]
    if device.type == "cuda":
        count = torch.cuda.device_count()
        replicas = args.replicas or count
        if not 1 <= replicas <= count:
            raise UsageError(f"--replicas {replicas} must be between 1 and the {count} visible GPUs")
        return [f"cuda:{i}" for i in range(replicas)]
    if args.replicas not in (None, 1):
        raise UsageError(f"--replicas {args.replicas}: only one replica runs on {device.type}")
    return [str(device)]


def checkpoint_engine(source: str, tag: str | None, step: int | None, dtype, compile_: bool, devices: list[str],
                      index: int):
    """Replica `index`'s Engine from the checkpoint (an engine process's recipe, hence module level)."""
    import torch

    from chatforge.infer.engine import Engine

    return Engine.from_checkpoint(source, tag=tag, step=step, device=torch.device(devices[index]), dtype=dtype,
                                  compile=compile_)


def load_engines(args) -> list:
    """One Engine per replica, in this process (--engine thread)."""
    devices = replica_devices(args)
    return [checkpoint_engine(args.source, args.tag, args.step, args.dtype, args.compile == "on", devices, i)
            for i in range(len(devices))]


def start_pool(args):
    """The replicas' pool: engine processes (serve/engine_process.py), or threads over engines loaded here."""
    continuous = args.scheduling == "continuous"
    if args.engine == "thread":
        return WorkerPool(load_engines(args), max_batch=args.max_batch, max_queue=args.max_queue,
                          continuous=continuous)
    from functools import partial

    from chatforge.serve.engine_process import ProcessPool

    devices = replica_devices(args)
    recipe = partial(checkpoint_engine, args.source, args.tag, args.step, args.dtype, args.compile == "on", devices)
    return ProcessPool(recipe, replicas=len(devices), max_batch=args.max_batch, max_queue=args.max_queue,
                       continuous=continuous)


def check_args(args) -> None:
    for flag in ("max_batch", "max_queue", "max_messages", "max_message_chars", "max_body_bytes", "max_n",
                 "max_new_tokens", "max_connections"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} {getattr(args, flag)} must be at least 1")
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port {args.port} must be between 0 and 65535")
    if not args.read_timeout > 0:
        raise UsageError(f"--read-timeout {args.read_timeout} must be above 0 seconds")
    refusal = check_exposure(args.host, _api_key(args), args.allow_no_key)
    if refusal:
        raise UsageError(refusal)


def _api_key(args) -> str | None:
    return args.api_key or os.environ.get("CHATFORGE_API_KEY") or None


def build_server(args):
    """(app, pool) for the arguments; `main` runs the app with uvicorn."""
    check_args(args)
    pool = start_pool(args)
    engines = pool.engines
    meta = engines[0].meta
    model_id = f"chatforge-{args.source}-{meta.get('tag') or args.tag or 'model'}"
    limits = Limits(context=engines[0].config.sequence_len, max_messages=args.max_messages,
                    max_message_chars=args.max_message_chars, max_body_bytes=args.max_body_bytes, max_n=args.max_n,
                    default_max_tokens=args.max_new_tokens)
    api_key = _api_key(args)
    hosts = default_allowed_hosts(args.host, args.allowed_hosts)
    app = create_app(pool, model_id, limits, api_key=api_key, cors_origins=args.cors_origin,
                     log_content=args.log_content, allowed_hosts=hosts,
                     connections=Connections(max_open=args.max_connections, read_timeout=args.read_timeout))
    cors = ", ".join(args.cors_origin) if args.cors_origin else "off"
    where = "engine process" if args.engine == "process" else "engine thread"
    print0(f"serve: {model_id} step {meta.get('step')} on {', '.join(str(e.device) for e in engines)} ({where}); "
           f"auth {'on' if api_key else 'off'}; CORS {cors}; Host {'any' if '*' in hosts else ', '.join(hosts)} "
           "and IP addresses")
    return app, pool


def bind_port(host: str, port: int):
    """A socket bound to host:port, or one line saying why not.

    Bound before the model loads, so a busy port costs a second rather than the load (and uvicorn's
    multi-line `[Errno 98]`); uvicorn then serves on this very socket, so nothing can take the port
    in between. Options as uvicorn's own bind (SO_REUSEADDR: a restart need not wait out TIME_WAIT).
    """
    import errno
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise UsageError(f"--port {port}: {host}:{port} is already in use (another server?); stop it, or "
                             "pick another --port (0 takes any free one)") from None
        if exc.errno == errno.EACCES:
            raise UsageError(f"--port {port}: binding {host}:{port} is not permitted (ports below 1024 need "
                             "root); pick a --port above 1023") from None
        raise UsageError(f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc}); "
                         "use an address of this machine, e.g. 127.0.0.1 or 0.0.0.0") from None
    return sock


def main(args) -> int:
    check_args(args)
    sock = bind_port(args.host, args.port)
    try:
        app, pool = build_server(args)
    except BaseException:
        sock.close()
        raise
    return run_server(app, pool, sock, lambda host, port: (
        f"serve: listening on http://{host}:{port}  (web UI at /, API at /v1)"))


def run_server(app, pool, sock, announce) -> int:
    """Run `app` on the bound socket `sock` behind the connection guard until stopped, printing
    announce(host, port) once it listens (scripts wait for that line), then close pool and socket."""
    import uvicorn

    server = uvicorn.Server(server_config(app, app.state.connections))
    original_startup = server.startup

    async def startup(sockets=None):
        await original_startup(sockets)
        for s in server.servers:
            for listening in s.sockets:
                print0(announce(*listening.getsockname()[:2]))

    server.startup = startup
    try:
        server.run(sockets=[sock])
    finally:
        pool.close()
        sock.close()
    return 0


class ServerThread:
    """uvicorn serving `app` on a loopback port in a background thread (tests, notebooks).

    `url` is the base address once started; `stop()` shuts the server down and joins the thread."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        import socket
        import threading

        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(server_config(app, app.state.connections, timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="chatforge-server", daemon=True)
        self.thread.start()
        for _ in range(500):  # bounded: uvicorn starts in well under a second
            if self.server.started or not self.thread.is_alive():
                break
            time.sleep(0.01)
        if not self.server.started:
            raise RuntimeError("the server thread did not start")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()
