"""Run untrusted, model-written Python in a separate, limited process.

The engine calls `run_python` when a model writes `<|python_start|> code <|python_end|>` (the
calculator of GSM8K-style answers), and the HumanEval evaluation runs candidate programs with it.
Nothing the code does may hurt the caller, so the defence is in layers:

1. A fresh interpreter (`python -I`: no user site, no PYTHON* variables) in its own session, so a
   wall-clock timeout can SIGKILL the whole process group, with a clean environment (a minimal PATH
   and nothing else) and an empty temporary working directory that is removed afterwards.
2. Kernel limits set in the child before the code runs: address space (memory bombs end in
   MemoryError), CPU seconds, file size, open files, core dumps, and processes (fork bombs; note
   that root ignores RLIMIT_NPROC, hence layers 3 and 4).
3. When the caller is root and the interpreter's files are readable by everyone, the child drops to
   the `nobody` user, so the kernel itself forbids deleting the caller's files and RLIMIT_NPROC
   applies. When `unshare` can create a network namespace, the child runs inside an empty one (no
   interfaces, not even loopback). Both are best effort and skipped where the system forbids them.
4. Python-level guards installed before the user's code: process creation (os.fork, os.system,
   os.exec*, posix_spawn, subprocess, multiprocessing, ctypes), sockets, and file removal, renaming
   or writing outside the working directory raise PermissionError. On their own these can be
   bypassed by determined code; together with layers 1-3 they contain the programs a language model
   writes by accident (infinite loops, huge prints, `rm -rf`-style cleanups, network calls).

Output is capped: stdout and stderr share one pipe read up to `max_output` bytes; a program that
prints more is stopped and its result marked truncated. The result carries the value of a final
expression statement, repr'd as a REPL would show it.
"""

from __future__ import annotations

import json
import math
import os
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache

DEFAULT_MAX_OUTPUT = 16_384
NOBODY_UID = 65534
# Modules a tool call commonly needs, imported before privileges are dropped (so they load even
# when the interpreter's files are unreadable to `nobody`) and to keep each call fast.
PRELOADED_MODULES = ("math", "re", "json", "random", "statistics", "fractions", "decimal", "itertools",
                     "functools", "collections", "string", "datetime", "heapq", "bisect", "cmath")


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


# The child's program. It receives a JSON header line and then the user's code on stdin, sets its
# limits, drops privileges, installs the guards, runs the code, and writes one JSON result to the
# file descriptor named in the header. It must stay self-contained (it runs under `python -I`).
_RUNNER = r'''
import ast, json, os, resource, signal, sys
header = json.loads(sys.stdin.readline())
code = sys.stdin.read()
sys.stdin.close()
result_fd = header["result_fd"]
workdir = header["workdir"]

result_file = os.fdopen(result_fd, "wb")  # opened now: the guards below refuse raw descriptors

def report(**fields):
    result_file.write(json.dumps(fields).encode())
    result_file.close()

for name in header["preload"]:
    try:
        __import__(name)
    except ImportError:
        pass

def limit(kind, value):
    try:
        resource.setrlimit(kind, (value, value))
    except (ValueError, OSError):
        pass

limit(resource.RLIMIT_CORE, 0)
try:  # SIGXCPU at the soft limit, SIGKILL a second later if the code ignores it
    resource.setrlimit(resource.RLIMIT_CPU, (header["cpu_seconds"], header["cpu_seconds"] + 1))
except (ValueError, OSError):
    pass
limit(resource.RLIMIT_FSIZE, header["file_bytes"])
limit(resource.RLIMIT_NOFILE, 64)
limit(resource.RLIMIT_AS, header["memory_bytes"])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an oversized write raises OSError instead of killing
if header["drop_to"] is not None:
    os.setgroups([])
    os.setgid(header["drop_to"])
    os.setuid(header["drop_to"])
limit(resource.RLIMIT_NPROC, 0)
os.chdir(workdir)

def install_guards():
    import builtins, importlib, shutil, socket, _socket
    def denied(what):
        def refuse(*args, **kwargs):
            raise PermissionError(f"{what} is disabled in the sandbox")
        return refuse
    import posix
    for mod in (os, posix):
        for name in ("system", "popen", "fork", "forkpty", "vfork", "execv", "execve", "execl", "execle",
                     "execlp", "execlpe", "execvp", "execvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe",
                     "spawnv", "spawnve", "spawnvp", "spawnvpe", "posix_spawn", "posix_spawnp", "kill",
                     "killpg", "setuid", "setgid", "chroot", "register_at_fork"):
            if hasattr(mod, name):
                setattr(mod, name, denied(f"os.{name}"))
    real = os.path.realpath
    root = real(workdir)
    def inside(path):
        try:
            p = real(os.fsdecode(path)) if not isinstance(path, int) else None
        except (TypeError, ValueError):
            return False
        return p is not None and (p == root or p.startswith(root + os.sep))
    def path_guard(name, nargs=1):
        original = getattr(os, name)
        def guarded(*args, **kwargs):
            paths = args[:nargs]
            if kwargs.get("dir_fd") is not None or kwargs.get("src_dir_fd") is not None \
                    or not all(inside(p) for p in paths):
                raise PermissionError(f"os.{name} outside the sandbox's working directory is not allowed")
            return original(*args, **kwargs)
        return guarded
    for name, nargs in (("remove", 1), ("unlink", 1), ("rmdir", 1), ("removedirs", 1), ("rename", 2),
                        ("renames", 2), ("replace", 2), ("truncate", 1), ("chmod", 1), ("chown", 1),
                        ("lchown", 1), ("link", 2), ("symlink", 2), ("utime", 1)):
        if hasattr(os, name):
            guarded = path_guard(name, nargs)
            setattr(os, name, guarded)
            setattr(posix, name, guarded)
    real_rmtree = shutil.rmtree
    def rmtree(path, *args, **kwargs):
        if not inside(path) or real(os.fsdecode(path)) == root:
            raise PermissionError("shutil.rmtree outside the sandbox's working directory is not allowed")
        return real_rmtree(path, *args, **kwargs)
    shutil.rmtree = rmtree
    real_open = builtins.open
    def guarded_open(file, mode="r", *args, **kwargs):
        if isinstance(file, int):
            if file > 2:
                raise PermissionError("opening raw file descriptors is not allowed in the sandbox")
        elif any(c in mode for c in "wax+") and not inside(file):
            raise PermissionError(f"writing {file!r} outside the sandbox's working directory is not allowed")
        return real_open(file, mode, *args, **kwargs)
    builtins.open = guarded_open
    import io
    io.open = guarded_open
    real_os_open = os.open
    def guarded_os_open(path, flags, *args, **kwargs):
        writes = flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND)
        if kwargs.get("dir_fd") is not None or (writes and not inside(path)):
            raise PermissionError("os.open for writing outside the sandbox's working directory is not allowed")
        return real_os_open(path, flags, *args, **kwargs)
    os.open = guarded_os_open
    no_net = denied("network access")
    for mod in (socket, _socket):
        for name in ("socket", "socketpair", "fromfd", "create_connection", "create_server",
                     "getaddrinfo", "gethostbyname", "gethostbyname_ex", "gethostbyaddr"):
            if hasattr(mod, name):
                setattr(mod, name, no_net)
    for name in ("subprocess", "_posixsubprocess", "multiprocessing", "_multiprocessing", "ctypes", "_ctypes",
                 "pty", "socket", "_socket", "ssl", "_ssl", "select", "selectors"):
        sys.modules[name] = None
    for name in list(sys.modules):
        if name.startswith(("multiprocessing.", "ctypes.")):
            sys.modules[name] = None

import traceback
namespace = {"__name__": "__main__", "__builtins__": __builtins__}
cushion = bytearray(4 << 20)  # freed on failure so a memory bomb's error can still be reported

def run_user_code():
    tree = ast.parse(code, filename="<sandbox>")
    last = None
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = ast.Expression(tree.body.pop().value)
    exec(compile(tree, "<sandbox>", "exec"), namespace)
    if last is not None:
        value = eval(compile(last, "<sandbox>", "eval"), namespace)
        if value is not None:
            return repr(value)[: header["max_value"]]
    return None

try:
    sys.stdout.reconfigure(encoding="utf-8", errors="backslashreplace")
    sys.stderr.reconfigure(encoding="utf-8", errors="backslashreplace")
    install_guards()
    value = run_user_code()
except SyntaxError as exc:
    sys.stdout.flush()
    report(value=None, error=f"SyntaxError: {exc.msg} (line {exc.lineno})")
except BaseException as exc:
    del cushion
    namespace.clear()
    try:
        sys.stdout.flush()
    except BaseException:
        pass
    text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    report(value=None, error=text[: header["max_value"]] or type(exc).__name__)
else:
    sys.stdout.flush()
    report(value=value, error=None)
'''


@lru_cache(maxsize=1)
def network_namespace_available() -> bool:
    """Whether `unshare -n` can give the child an empty network namespace (needs privileges)."""
    exe = shutil.which("unshare")
    if exe is None or not sys.platform.startswith("linux"):
        return False
    try:
        return subprocess.run([exe, "-n", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _readable_by_everyone(path: str) -> bool:
    """Every directory from / down to `path` is searchable by others (so `nobody` can import from it)."""
    path = os.path.realpath(path)
    while True:
        try:
            mode = os.stat(path).st_mode
        except OSError:
            return False
        if not mode & stat.S_IXOTH:
            return False
        parent = os.path.dirname(path)
        if parent == path:
            return True
        path = parent


@lru_cache(maxsize=1)
def privilege_drop_uid() -> int | None:
    """The uid the child becomes (nobody) when we run as root and it could still import the stdlib."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return None
    stdlib = os.path.dirname(os.__file__)
    if all(_readable_by_everyone(p) for p in (stdlib, sys.prefix, os.path.dirname(sys.executable))):
        return NOBODY_UID
    return None


def run_python(code: str, timeout: float = 5.0, memory_mb: int = 256, max_output: int = DEFAULT_MAX_OUTPUT,
               cpu_seconds: int | None = None, file_mb: int = 16) -> SandboxResult:
    """Run `code` in a fresh limited process and return what it printed, its final value or its error."""
    cpu_seconds = cpu_seconds if cpu_seconds is not None else max(1, math.ceil(timeout))
    workdir = tempfile.mkdtemp(prefix="chatforge-sandbox-")
    drop_to = privilege_drop_uid()
    result_r, result_w = os.pipe()
    try:
        if drop_to is not None:
            os.chown(workdir, drop_to, drop_to)
        cmd = [sys.executable, "-I", "-c", _RUNNER]
        if network_namespace_available():
            cmd = [shutil.which("unshare"), "-n", "--"] + cmd
        header = {"result_fd": result_w, "workdir": workdir, "cpu_seconds": int(cpu_seconds),
                  "memory_bytes": int(memory_mb) << 20, "file_bytes": int(file_mb) << 20,
                  "drop_to": drop_to, "max_value": max_output, "preload": list(PRELOADED_MODULES)}
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                cwd=workdir, env={"PATH": "/usr/bin:/bin"}, pass_fds=(result_w,),
                                start_new_session=True, close_fds=True)
        os.close(result_w)
        result_w = -1
        try:
            proc.stdin.write((json.dumps(header) + "\n" + code).encode("utf-8", "surrogatepass"))
            proc.stdin.close()
        except BrokenPipeError:
            pass
        out, result_bytes, timed_out, truncated = _collect(proc, result_r, timeout, max_output)
        _kill_group(proc)
        proc.wait()
    finally:
        if result_w >= 0:
            os.close(result_w)
        os.close(result_r)
        shutil.rmtree(workdir, ignore_errors=True)
    stdout = out.decode("utf-8", "replace")
    if timed_out:
        return SandboxResult(False, stdout, None, f"TimeoutError: timed out after {timeout:g}s", timed_out=True,
                             truncated=truncated)
    if truncated:
        return SandboxResult(False, stdout, None,
                             f"OutputLimitError: the program printed more than {max_output} bytes and was stopped",
                             truncated=True)
    try:
        report = json.loads(result_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        if proc.returncode == -signal.SIGXCPU:
            return SandboxResult(False, stdout, None, f"TimeoutError: CPU time limit of {cpu_seconds}s exceeded",
                                 timed_out=True)
        return SandboxResult(False, stdout, None, _death_reason(proc.returncode))
    return SandboxResult(report["error"] is None, stdout, report["value"], report["error"])


def _collect(proc: subprocess.Popen, result_fd: int, timeout: float, max_output: int):
    """Read stdout (capped) and the result pipe until both close, the deadline passes, or output overflows."""
    deadline = time.monotonic() + timeout
    out, result = bytearray(), bytearray()
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ, "out")
    sel.register(result_fd, selectors.EVENT_READ, "result")
    open_streams = 2
    try:
        while open_streams:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                _kill_group(proc)
                return bytes(out), bytes(result), True, False
            for key, _ in sel.select(remaining):
                fd = key.fd
                chunk = os.read(fd, 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                    open_streams -= 1
                elif key.data == "out":
                    out += chunk
                    if len(out) > max_output:
                        _kill_group(proc)
                        return bytes(out[:max_output]), bytes(result), False, True
                elif len(result) < 4 * max_output + 4096:
                    result += chunk
    finally:
        sel.close()
        proc.stdout.close()
    # Both pipes closed: the process is exiting; give it what is left of the deadline to do so.
    try:
        proc.wait(max(0.0, deadline - time.monotonic()) + 1.0)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        return bytes(out), bytes(result), True, False
    return bytes(out), bytes(result), False, False


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _death_reason(returncode: int | None) -> str:
    if returncode is not None and returncode < 0:
        sig = -returncode
        if sig == signal.SIGKILL:
            return "RuntimeError: the program was killed (it exceeded a memory or CPU limit)"
        return f"RuntimeError: the program was killed by signal {signal.Signals(sig).name}"
    return f"RuntimeError: the sandbox process exited with code {returncode} without a result"
