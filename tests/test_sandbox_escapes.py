"""The escape suite: every way out we know of, tried as an attacker would, each contained.

Contained means: no file written or deleted outside the call's folder, no process left after the
call, the caller (and the helper) alive, no secret read, no connection made, no forged verdict. Each
test checks the effect on the world, not the error message, so a layer that fails quietly fails here.
Run as root (CI is) these also show the root-specific holes are shut (privilege drop, RLIMIT_NPROC).
"""

import os
import select
import socket
import sys
import pytest

from chatforge.infer.sandbox import run_python, sandbox_status, shared
from chatforge.tasks.humaneval import check_completion

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the confined sandbox is Linux-only")


@pytest.fixture(scope="module", autouse=True)
def confined():
    ok, line = sandbox_status()
    if not ok:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the escape suite, but: {line}")
        pytest.skip(line)
    assert line.startswith("confined"), line


@pytest.fixture()
def outside(tmp_path):
    """A folder outside the sandbox with a file to protect, readable and writable by everyone."""
    os.chmod(tmp_path, 0o777)
    victim = tmp_path / "keep.txt"
    victim.write_text("precious")
    os.chmod(victim, 0o666)
    return tmp_path


def untouched(folder) -> bool:
    return sorted(p.name for p in folder.iterdir()) == ["keep.txt"] and (folder / "keep.txt").read_text() == "precious"


# ---- running programs ------------------------------------------------------------------------------

PROCESS_ESCAPES = {
    "os.system": "import os\nos.system('touch {m}')",
    "posix re-imported": "import sys\ndel sys.modules['posix']\nimport posix\nposix.system('touch {m}')",
    "os re-imported": "import sys\nfor k in ('os', 'posix'): sys.modules.pop(k)\nimport os\nos.system('touch {m}')",
    "ctypes system": "import ctypes\nctypes.CDLL(None).system(b'touch {m}')",
    "ctypes raw execve": "import ctypes\nctypes.CDLL(None).execv(b'/usr/bin/touch', (ctypes.c_char_p * 3)(b'touch', b'{m}', None))",
    "subprocess": "import subprocess\nsubprocess.run(['touch', '{m}'])",
    "posix_spawn": "import os\nos.posix_spawn('/usr/bin/touch', ['touch', '{m}'], {{}})",
    "execv": "import os\nos.execv('/usr/bin/touch', ['touch', '{m}'])",
    "fork then exec": "import os\nif os.fork() == 0:\n    os.execv('/usr/bin/touch', ['touch', '{m}'])",
}


@pytest.mark.parametrize("name", sorted(PROCESS_ESCAPES))
def test_no_program_runs(name, outside):
    marker = outside / "pwned"
    run_python(PROCESS_ESCAPES[name].format(m=marker))
    assert not marker.exists()
    assert untouched(outside)


# ---- files -----------------------------------------------------------------------------------------

FILE_ATTACKS = {
    "open for writing": "open({v!r}, 'w').write('gone')",
    "append": "open({v!r}, 'a').write('more')",
    "_io.FileIO": "import _io\n_io.FileIO({v!r}, 'w').write(b'gone')",
    "posix.open O_CREAT": "import posix\nposix.open({n!r}, posix.O_CREAT | posix.O_WRONLY, 0o644)",
    "remove": "import os\nos.remove({v!r})",
    "posix.unlink re-imported": "import sys\ndel sys.modules['posix']\nimport posix\nposix.unlink({v!r})",
    "rename away": "import os\nos.rename({v!r}, 'stolen')",
    "rename in": "open('x', 'w').write('planted')\nimport os\nos.rename('x', {n!r})",
    "hard link out": "open('x', 'w').write('planted')\nimport os\nos.link('x', {n!r})",
    "symlink": "import os\nos.symlink('/etc/passwd', {n!r})",
    "truncate": "import os\nos.truncate({v!r}, 0)",
    "chmod": "import os\nos.chmod({v!r}, 0)",
    "utime": "import os\nos.utime({v!r}, (0, 0))",
    "rmtree": "import shutil\nshutil.rmtree({d!r})",
    "mkdir": "import os\nos.mkdir({n!r})",
    "mkfifo": "import os\nos.mkfifo({n!r})",
}


@pytest.mark.parametrize("name", sorted(FILE_ATTACKS))
def test_nothing_outside_the_call_folder_changes(name, outside):
    victim = outside / "keep.txt"
    before = os.stat(victim)
    run_python(FILE_ATTACKS[name].format(v=str(victim), n=str(outside / "new"), d=str(outside)))
    assert untouched(outside)
    after = os.stat(victim)
    assert (after.st_mode, after.st_mtime_ns) == (before.st_mode, before.st_mtime_ns)


def test_shared_memory_and_tmp_are_out_of_reach():
    for path in ("/dev/shm/chatforge-escape", "/tmp/chatforge-escape", "/var/tmp/chatforge-escape"):
        run_python(f"open({path!r}, 'w').write('x')")
        assert not os.path.exists(path), path


def test_the_call_folder_is_private_to_the_call():
    """The host never sees a call's files: its folder is a tmpfs in the call's own mount namespace."""
    box = shared()
    r = box.run("open('mine.txt', 'w').write('x' * 1000)\nimport os\nos.getcwd()")
    assert r.ok
    folder = eval(r.value)
    assert not os.path.exists(os.path.join(folder, "mine.txt"))


# ---- secrets ---------------------------------------------------------------------------------------

def test_secrets_of_the_caller_stay_out_of_reach(monkeypatch):
    monkeypatch.setenv("CHATFORGE_API_KEY", "sk-escape-suite-secret")
    pid = os.getpid()
    attempts = [f"open('/proc/{pid}/environ', 'rb').read()", f"open('/proc/{pid}/cmdline', 'rb').read()",
                "import os\nopen(f'/proc/{os.getppid()}/environ', 'rb').read()",
                "open('/proc/self/environ', 'rb').read()", "open('/proc/1/environ', 'rb').read()",
                "import os\nos.listdir('/proc')", f"open('/proc/{pid}/mem', 'rb').read(10)",
                "open('/etc/shadow').read()", "import os\nos.listdir('/root')",
                "import os\nos.listdir(os.path.expanduser('~'))", "import os\nos.environ.copy()",
                "import gc\n[o for o in gc.get_objects() if isinstance(o, str) and 'sk-' in o]"]
    for code in attempts:
        r = run_python(code)
        assert "sk-escape-suite-secret" not in r.stdout + str(r.value) + str(r.error), code
        assert "root:" not in str(r.value), code


def test_runs_without_privileges_even_when_the_caller_is_root():
    r = run_python("import os\n(os.getuid(), os.geteuid(), os.getgid(), os.getgroups())")
    assert r.ok
    uid, euid, gid, groups = eval(r.value)
    if os.geteuid() == 0:
        assert uid == euid == gid == 65534 and groups == []
    r = run_python("open('/proc/self/status').read()")
    assert not r.ok  # not even its own /proc entry: Landlock gives it the stdlib and its folder only


# ---- processes and signals -------------------------------------------------------------------------

def python_processes_outside(ancestors: set) -> set:
    """Processes running this interpreter that descend from none of `ancestors` (escaped ones)."""
    exe = os.path.realpath(sys.executable)
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.path.realpath(f"/proc/{entry}/exe") != exe:
                continue
        except OSError:
            continue
        pid = int(entry)
        while pid > 1 and pid not in ancestors:
            try:
                pid = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                break
        if pid not in ancestors:
            found.add(int(entry))
    return found


def test_no_process_outlives_the_call():
    box = shared()
    box.run("1")
    ours = {os.getpid(), box.proc.pid}
    before = python_processes_outside(ours)
    code = ("import os, time\n"
            "for _ in range(60):\n"
            "    try:\n"
            "        if os.fork() == 0:\n"
            "            os.setsid()\n"
            "            if os.fork() == 0:\n"
            "                time.sleep(60)\n"
            "            os._exit(0)\n"
            "    except OSError:\n"
            "        pass\n"
            "import threading\n"
            "try:\n"
            "    threading.Thread(target=time.sleep, args=(60,)).start()\n"
            "except RuntimeError:\n"
            "    pass\n"
            "'done'")
    r = box.run(code, timeout=5)
    assert r.value == "'done'"
    assert python_processes_outside(ours) <= before


def test_the_caller_and_helper_survive_signals():
    box = shared()
    box.run("1")
    helper = box.proc.pid
    for code in ("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)",
                 "import os, signal\nos.kill(-1, signal.SIGKILL)",
                 f"import os, signal\nos.kill({os.getpid()}, signal.SIGKILL)",
                 f"import os, signal\nos.kill({helper}, signal.SIGKILL)",
                 f"import os, signal\nos.killpg({helper}, signal.SIGKILL)",
                 "import os, signal\nsignal.pidfd_send_signal(os.pidfd_open(os.getppid()), signal.SIGKILL)",
                 f"import os, signal\nsignal.pidfd_send_signal(os.pidfd_open({os.getpid()}), signal.SIGKILL)"):
        run_python(code)
        assert box.proc.pid == helper and box.proc.poll() is None, code
    assert run_python("6 * 7").value == "42"


# ---- network ---------------------------------------------------------------------------------------

def test_no_connection_is_made():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    port = server.getsockname()[1]
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    abstract.bind(b"\0chatforge-escape-suite")
    abstract.listen(8)
    try:
        for code in (f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)",
                     f"import sys\nsys.modules.pop('_socket', None)\nimport _socket\n_socket.socket().connect(('127.0.0.1', {port}))",
                     f"import urllib.request\nurllib.request.urlopen('http://127.0.0.1:{port}/', timeout=1)",
                     "import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect(b'\\0chatforge-escape-suite')",
                     "import ctypes\nassert ctypes.CDLL(None).socket(2, 1, 0) >= 0, 'no socket'"):
            r = run_python(code, timeout=3.0)
            assert not r.ok, code
        readable, _, _ = select.select([server, abstract], [], [], 0)
        assert readable == []  # nothing waits in either backlog
    finally:
        server.close()
        abstract.close()


def test_no_unix_socket_is_bound_on_disk():
    for path in ("/tmp/chatforge-escape.sock", "sock-here"):
        r = run_python(f"import socket\ns = socket.socket(socket.AF_UNIX)\ns.bind({path!r})")
        assert not r.ok
    assert not os.path.exists("/tmp/chatforge-escape.sock")


# ---- verdicts --------------------------------------------------------------------------------------

ADD = {"task_id": "t/0", "prompt": "def add(a, b):\n    \"\"\"Add two numbers.\"\"\"\n",
       "canonical_solution": "    return a + b\n", "entry_point": "add",
       "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"}

FORGERIES = {
    "report and exit": "import __main__, os; __main__.report(value=None, error=None); os._exit(0)",
    "os._exit(0)": "import os; os._exit(0)",
    "sys.exit(0)": "import sys; sys.exit(0)",
    "fake verdict on fd 3": "import os; os.write(3, b'0' * 32 + b'\\nN\\n'); os.close(3); os._exit(0)",
    "patched json and os.write": ("import json, os\nreal = os.write\njson.dumps = lambda *a, **k: '{}'\n"
                                  "os.write = lambda fd, data: real(fd, data.replace(b'\\nE\\n', b'\\nN\\n'))"),
    "exit at interpreter shutdown": "import atexit, os; atexit.register(lambda: os._exit(0))",
}


def test_the_right_answer_passes():
    assert check_completion(ADD, "    return a + b\n")


@pytest.mark.parametrize("name", sorted(FORGERIES))
def test_a_wrong_answer_cannot_forge_a_pass(name):
    completion = "def add(a, b):\n    return 42\n" + FORGERIES[name] + "\n"
    assert not check_completion(ADD, completion)
    # the forgery also fails on its own after the wrong function has run its check
    assert not check_completion(ADD, "def add(a, b):\n    return 42\n", )
