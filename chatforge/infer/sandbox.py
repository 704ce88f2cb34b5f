"""Run untrusted, model-written Python behind a boundary the kernel enforces, in milliseconds.

The engine calls the sandbox when a model writes `<|python_start|> code <|python_end|>` (the
calculator of GSM8K-style answers), and HumanEval runs candidate programs with it. The code may be
hostile (a prompt can talk a model into anything), so it never shares the server's process,
memory, files, environment or network:

- One helper process per server process (`sandbox_helper.py`, started on first use) keeps a warm
  interpreter with the usual modules loaded, inside its own network/IPC/UTS/mount namespaces, and
  forks a fresh child per call. Each call runs as PID 1 of a new PID namespace in a private tmpfs
  working folder, as `nobody` (or with no capability inside a user namespace when the server is not
  root), under Landlock (reads the standard library and its folder, nothing else), seccomp-bpf (no
  exec, fork, sockets, ptrace, pidfds, mounts, ...) and rlimits. Nothing a call defines, imports,
  writes or changes is visible to the next: each is a new fork of a helper that never runs user code.
  helper's docstring lists every layer and what they leave open.
- Calls run concurrently (up to `max_parallel` at once, the rest queue) and `submit_python` returns
  a Future, so the engine can let a row wait for its tool while the other rows decode.
- A helper that dies or stops answering is replaced; the calls it held end with an error result.

Where the kernel cannot provide the boundary (not Linux, no Landlock, namespaces refused) the tool is
off: each call returns an error saying why, and one line says so on stderr. `CHATFORGE_SANDBOX`
chooses: `confined` (the default), `unconfined` (the same helper with only the process, rlimit and
clean-environment layers, for a machine you are willing to lose), or `off`.
"""

from __future__ import annotations

import atexit
import collections
import itertools
import json
import math
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

DEFAULT_MAX_OUTPUT = 16_384
MAX_CODE_BYTES = 128 * 1024   # one request must fit one socket message
MODES = ("confined", "unconfined", "off")
START_TIMEOUT = 30.0          # seconds for a helper to import its modules and say it is ready
ANSWER_SLACK = 10.0           # beyond a call's own timeout before the helper is declared hung
HELPER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_helper.py")


@dataclass
class SandboxResult:
    ok: bool              # the code ran to the end without an exception or a limit being hit
    stdout: str           # what it printed (stdout and stderr interleaved), at most max_output bytes
    value: str | None     # repr of the final expression statement's value, None when there is none
    error: str | None     # "ZeroDivisionError: division by zero", "timed out after 5s", ...
    timed_out: bool = False
    truncated: bool = False

    def as_text(self) -> str:
        """What a model sees as the tool's output: printed text, then the value or the error."""
        parts = [self.stdout.rstrip("\n")] if self.stdout.strip() else []
        if self.error:
            parts.append(self.error)
        elif self.value is not None:
            parts.append(self.value)
        return "\n".join(parts)


class SandboxUnavailable(RuntimeError):
    """The machine cannot provide the boundary; the message says why and how to enable it knowingly."""


def sandbox_mode() -> str:
    mode = os.environ.get("CHATFORGE_SANDBOX", "confined").strip().lower() or "confined"
    if mode not in MODES:
        from chatforge.errors import UsageError
        raise UsageError(f"CHATFORGE_SANDBOX={mode!r} is not one of {', '.join(MODES)}")
    return mode


class Sandbox:
    """A helper process and the calls in flight on it; thread-safe, one per process (`shared()`)."""

    def __init__(self, mode: str | None = None, max_parallel: int | None = None, helper: str = HELPER,
                 answer_slack: float = ANSWER_SLACK):
        """helper: the helper program (a stand-in in tests); answer_slack: seconds past a call's own
        timeout after which a silent helper is declared hung and replaced."""
        self.mode = mode or sandbox_mode()
        self.helper, self.answer_slack = helper, answer_slack
        self.max_parallel = max_parallel or max(2, min(16, 2 * (os.cpu_count() or 1)))
        self.lock = threading.Lock()
        self.ids = itertools.count()
        self.waiting: collections.deque = collections.deque()   # (id, message, Future, timeout) not yet sent
        self.in_flight: dict[int, tuple[Future, float]] = {}    # id -> (Future, answer-by time)
        self.proc: subprocess.Popen | None = None
        self.sock: socket.socket | None = None
        self.mount_dir: str | None = None
        self.features: dict = {}
        self.unavailable: str | None = "the Python tool is off (CHATFORGE_SANDBOX=off)" if self.mode == "off" else None
        self.closed = False

    # ---- the public calls ------------------------------------------------------------------------

    def submit(self, code: str, timeout: float = 5.0, memory_mb: int = 256, max_output: int = DEFAULT_MAX_OUTPUT,
               cpu_seconds: int | None = None, file_mb: int = 16) -> Future:
        """Queue a call; the Future's result is a SandboxResult (never an exception). Cancelling the
        Future before the call is sent drops it."""
        future: Future = Future()
        data = code.encode("utf-8", "surrogatepass")
        if len(data) > MAX_CODE_BYTES:
            future.set_result(SandboxResult(False, "", None, f"ValueError: the program is {len(data)} bytes; "
                                            f"the sandbox takes at most {MAX_CODE_BYTES}"))
            return future
        max_output = max(1, min(int(max_output), 32_768))
        # the CPU limit is a backstop a second past the wall-clock one: a busy loop meets the wall first
        cpu = cpu_seconds if cpu_seconds is not None else math.ceil(timeout) + 1
        with self.lock:
            self._ensure_started()
            if self.unavailable is not None:
                future.set_result(SandboxResult(False, "", None, f"ToolUnavailable: {self.unavailable}"))
                return future
            call_id = next(self.ids)
            header = {"id": call_id, "timeout": float(timeout), "cpu_seconds": int(cpu),
                      "memory_bytes": int(memory_mb) << 20, "file_bytes": int(file_mb) << 20,
                      "max_output": max_output, "nonce": secrets.token_hex(16)}
            head = json.dumps(header).encode()
            self.waiting.append((call_id, len(head).to_bytes(4, "little") + head + data, future, float(timeout)))
            self._send_waiting()
        return future

    def run(self, code: str, **limits) -> SandboxResult:
        return self.submit(code, **limits).result()

    def close(self) -> None:
        with self.lock:
            self.closed = True
            self._stop("the sandbox was closed")

    # ---- the helper's life -----------------------------------------------------------------------

    def _ensure_started(self) -> None:
        """A live helper, or `unavailable` saying why there is none. Holds the lock."""
        if self.unavailable is None and self.proc is not None and self.proc.poll() is not None:
            self._restart("the sandbox helper died")
        if self.unavailable is None and self.proc is None:
            self._start()

    def _start(self) -> None:
        """Start a helper and wait for its first message (ready, or why not). Holds the lock."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.mount_dir = tempfile.mkdtemp(prefix="chatforge-sandbox-")
        os.chmod(self.mount_dir, 0o755)  # only ever a mount point; the helper mounts each call's tmpfs on it
        spare = max(1, min(8, self.max_parallel // 2))  # confined runners kept ready for the next calls
        cmd = [sys.executable, "-I", "-S", "-B", self.helper, self.mode, self.mount_dir, str(theirs.fileno()), str(spare)]
        errors = tempfile.TemporaryFile()  # what a helper that fails to start says goes into the reason
        try:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=errors, pass_fds=(theirs.fileno(),),
                                         env={"PATH": "/usr/bin:/bin"}, cwd="/", start_new_session=True)
        finally:
            theirs.close()
        ours.settimeout(START_TIMEOUT)
        try:
            hello = json.loads(ours.recv(1 << 16) or b"{}")
        except (OSError, ValueError):
            hello = {}
        if "ready" not in hello:
            self.proc.poll()
            errors.seek(0)
            said = errors.read().decode("utf-8", "replace").strip().splitlines()
            hello = {"ready": False, "reason": "the helper did not start" + (f" ({said[-1]})" if said else "")}
        errors.close()
        ours.settimeout(None)
        self.sock, self.features = ours, hello
        if not hello.get("ready"):
            reason = hello.get("reason", "the helper did not start")
            self._stop(reason)
            self.unavailable = (f"the Python tool is off on this machine: {reason}. It runs model-written code "
                                "only behind Linux namespaces, Landlock and seccomp; set CHATFORGE_SANDBOX=unconfined "
                                "to run it without that boundary (only on a machine you are willing to lose)")
            _say_once(self.unavailable)
            return
        threading.Thread(target=self._read, args=(ours, self.proc), daemon=True, name="chatforge-sandbox").start()

    def _stop(self, why: str) -> None:
        """Kill the helper and every call it runs; their Futures get an error result. Holds the lock."""
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            self.proc.wait()
            self.proc = None
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.mount_dir is not None:
            shutil.rmtree(self.mount_dir, ignore_errors=True)
            self.mount_dir = None
        failed = [f for f, _ in self.in_flight.values()] + [item[2] for item in self.waiting]
        self.in_flight.clear()
        self.waiting.clear()
        for future in failed:
            if not future.done():  # a queued call may have been cancelled
                future.set_result(SandboxResult(False, "", None, f"RuntimeError: {why}; the call was dropped"))

    def _send_waiting(self) -> None:
        while self.waiting and len(self.in_flight) < self.max_parallel and self.sock is not None:
            call_id, message, future, timeout = self.waiting.popleft()
            if not future.set_running_or_notify_cancel():
                continue  # cancelled while it waited (a released row): never sent
            self.in_flight[call_id] = (future, time.monotonic() + timeout + self.answer_slack)
            try:
                self.sock.send(message)
            except OSError:
                self._restart("the sandbox helper stopped accepting calls")
                return

    def _restart(self, why: str) -> None:
        self._stop(why)
        if not self.closed:
            self._start()

    def _read(self, sock: socket.socket, proc: subprocess.Popen) -> None:
        """Deliver answers; replace a helper that died or let a call overrun its deadline."""
        sock.settimeout(0.25)
        while True:
            try:
                data = sock.recv(1 << 18)
            except socket.timeout:
                data = None
            except OSError:
                data = b""
            with self.lock:
                if self.sock is not sock:
                    return  # replaced or closed meanwhile
                if data:
                    answer = json.loads(data)
                    entry = self.in_flight.pop(answer.pop("id"), None)
                    if entry is not None:
                        entry[0].set_result(SandboxResult(**answer))
                    self._send_waiting()
                elif proc.poll() is not None or data == b"":
                    self._restart("the sandbox helper died")
                    return
                elif any(deadline < time.monotonic() for _, deadline in self.in_flight.values()):
                    self._restart("the sandbox helper stopped answering")
                    return


_said: set = set()


def _say_once(line: str) -> None:
    if line not in _said:
        _said.add(line)
        print(line, file=sys.stderr, flush=True)


_shared: Sandbox | None = None
_shared_lock = threading.Lock()


def shared() -> Sandbox:
    """This process's sandbox (started on first use, stopped at exit, not inherited across fork)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = Sandbox()
        return _shared


def _forget_after_fork() -> None:
    global _shared, _shared_lock
    _shared, _shared_lock = None, threading.Lock()


def _close_at_exit() -> None:
    if _shared is not None:
        _shared.close()


os.register_at_fork(after_in_child=_forget_after_fork)
atexit.register(_close_at_exit)


def submit_python(code: str, **limits) -> Future:
    """Start `code` in the sandbox; a Future of its SandboxResult."""
    return shared().submit(code, **limits)


def run_python(code: str, timeout: float = 5.0, memory_mb: int = 256, max_output: int = DEFAULT_MAX_OUTPUT,
               cpu_seconds: int | None = None, file_mb: int = 16) -> SandboxResult:
    """Run `code` in a fresh confined process and return what it printed, its final value or its error."""
    return shared().run(code, timeout=timeout, memory_mb=memory_mb, max_output=max_output,
                        cpu_seconds=cpu_seconds, file_mb=file_mb)


def sandbox_status() -> tuple[bool, str]:
    """(whether the tool runs here, a line that says how or why not), starting the helper if needed."""
    box = shared()
    with box.lock:
        box._ensure_started()
        if box.unavailable is not None:
            return False, box.unavailable
        f = box.features
        if box.mode == "unconfined":
            return True, "unconfined (CHATFORGE_SANDBOX=unconfined): a fresh process with rlimits, no kernel boundary"
        who = "nobody" if f.get("root") else "no capabilities in a user namespace"
        return True, (f"confined: namespaces, Landlock ABI {f.get('landlock_abi')}, seccomp ({f.get('arch')}), "
                      f"runs as {who}")
