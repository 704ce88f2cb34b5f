"""The sandbox contains hostile programs and still runs ordinary code correctly."""

import os
import select
import socket

import pytest

from chatforge.infer.sandbox import run_python


def test_final_expression_value_and_prints():
    r = run_python("import math\nprint('root', math.sqrt(16))\nmath.factorial(10) + 2 ** 10")
    assert r.ok and r.error is None
    assert r.stdout == "root 4.0\n"
    assert r.value == repr(3628800 + 1024)
    assert r.as_text() == "root 4.0\n3629824"


def test_regex_and_non_ascii_output():
    r = run_python("import re\nprint('héllo ✓')\nre.findall(r'\\d+', 'a12b3c456')")
    assert r.ok and r.stdout == "héllo ✓\n" and r.value == "['12', '3', '456']"


def test_statement_only_code_has_no_value():
    r = run_python("x = 3\ny = x * 7")
    assert r.ok and r.value is None and r.stdout == ""


def test_exception_is_reported():
    r = run_python("print('before')\n1 / 0")
    assert not r.ok
    assert r.stdout == "before\n"
    assert r.error == "ZeroDivisionError: division by zero"


def test_syntax_error_is_reported():
    r = run_python("def f(:\n  pass")
    assert not r.ok and r.error.startswith("SyntaxError")


def test_infinite_loop_times_out():
    r = run_python("while True:\n    pass", timeout=1.0)
    assert not r.ok and r.timed_out and "TimeoutError" in r.error


def test_fork_bomb_is_contained():
    r = run_python("import os\nwhile True:\n    os.fork()", timeout=2.0)
    assert not r.ok and "PermissionError" in r.error
    r = run_python("import posix\nwhile True:\n    posix.fork()", timeout=2.0)
    assert not r.ok and "PermissionError" in r.error


@pytest.mark.parametrize("code", ["import subprocess\nsubprocess.run(['ls'])",
                                  "import multiprocessing\nmultiprocessing.Process(target=print).start()",
                                  "import os\nos.posix_spawn('/bin/ls', ['ls'], {})",
                                  "import ctypes\nctypes.CDLL(None).fork()"])
def test_process_creation_is_refused(code):
    r = run_python(code)
    assert not r.ok and r.error


def test_memory_bomb_is_contained():
    r = run_python("x = bytearray(4 * 1024 ** 3)", memory_mb=256)
    assert not r.ok and "MemoryError" in r.error
    r = run_python("chunks = []\nwhile True:\n    chunks.append('x' * 10 ** 7)", memory_mb=256, timeout=5.0)
    assert not r.ok and "MemoryError" in r.error


def test_huge_print_is_truncated():
    r = run_python("print('x' * 10 ** 7)", max_output=1000)
    assert not r.ok and r.truncated and len(r.stdout) == 1000
    r = run_python("while True:\n    print('y' * 100)", max_output=2000, timeout=5.0)
    assert not r.ok and r.truncated and not r.timed_out and len(r.stdout) == 2000


def test_os_system_is_refused(tmp_path):
    marker = tmp_path / "marker"
    r = run_python(f"import os\nos.system('touch {marker}')")
    assert not r.ok and "PermissionError" in r.error
    assert not marker.exists()


def test_files_outside_the_sandbox_survive(tmp_path):
    victim = tmp_path / "keep.txt"
    victim.write_text("precious")
    for code in (f"import os\nos.remove({str(victim)!r})",
                 f"import os\nos.unlink({str(victim)!r})",
                 f"import shutil\nshutil.rmtree({str(tmp_path)!r})",
                 f"open({str(victim)!r}, 'w').write('gone')",
                 f"import pathlib\npathlib.Path({str(victim)!r}).unlink()",
                 f"import os\nos.rename({str(victim)!r}, 'stolen')"):
        r = run_python(code)
        assert not r.ok and "PermissionError" in r.error, code
        assert victim.read_text() == "precious"


def test_working_directory_is_private_and_removed():
    r = run_python("import os\nopen('scratch.txt', 'w').write('hi')\nos.remove('scratch.txt')\nos.getcwd()")
    assert r.ok
    workdir = eval(r.value)
    assert "chatforge-sandbox-" in workdir
    assert not os.path.exists(workdir)


def test_environment_is_clean(monkeypatch):
    monkeypatch.setenv("CHATFORGE_SECRET_TOKEN", "hunter2")
    r = run_python("import os\nsorted(k for k in os.environ if k not in ('LC_CTYPE',))")
    assert r.ok and r.value == "['PATH']"


def test_socket_to_a_local_listener_never_connects():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    try:
        for code in (f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)",
                     f"import _socket\ns = _socket.socket()\ns.connect(('127.0.0.1', {port}))",
                     f"import urllib.request\nurllib.request.urlopen('http://127.0.0.1:{port}/', timeout=1)"):
            r = run_python(code, timeout=3.0)
            assert not r.ok and r.error, code
        # The child has exited; a connection it made would be waiting in the backlog now.
        readable, _, _ = select.select([server], [], [], 0)
        assert readable == []
    finally:
        server.close()
