"""The sandbox runs ordinary code correctly, within its limits, each call clean, and survives its helper.

The escape suite (hostile programs) is tests/test_sandbox_escapes.py.
"""

import json
import os
import signal
import sys
import time

import pytest

from chatforge.infer.sandbox import Sandbox, run_python, sandbox_status, shared


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


def test_common_modules_work():
    code = ("import statistics, fractions, decimal, collections, itertools, heapq, datetime, typing, json\n"
            "statistics.mean([1, 2, 3]), str(fractions.Fraction(1, 3) * 3), sorted(collections.Counter('aab'))")
    r = run_python(code)
    assert r.ok, r.error
    assert r.value == "(2, '1', ['a', 'b'])"


def test_infinite_loop_times_out():
    r = run_python("while True:\n    pass", timeout=1.0)
    assert not r.ok and r.timed_out and "TimeoutError" in r.error


def test_sleep_past_the_deadline_times_out():
    r = run_python("import time\ntime.sleep(30)", timeout=0.5)
    assert not r.ok and r.timed_out


def test_cpu_limit_ends_a_busy_program():
    r = run_python("while True:\n    pass", timeout=10.0, cpu_seconds=1)
    assert not r.ok and "TimeoutError" in r.error


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


def test_files_in_the_working_folder_work_and_are_capped():
    r = run_python("open('scratch.txt', 'w').write('hi')\nopen('scratch.txt').read()")
    assert r.ok and r.value == "'hi'"
    r = run_python("open('big', 'wb').write(b'x' * (4 << 20))", file_mb=1)
    assert not r.ok and ("File too large" in r.error or "No space" in r.error)


def test_environment_is_clean(monkeypatch):
    monkeypatch.setenv("CHATFORGE_SECRET_TOKEN", "hunter2")
    r = run_python("import os\nsorted(os.environ)")
    assert r.ok and r.value == "['HOME', 'PATH', 'TMPDIR']"


def test_each_call_starts_clean():
    """Nothing one call defines, imports, writes or changes is visible to the next."""
    first = run_python("import math, os, sys, random, json\n"
                       "leaked = 1\nmath.pi = 3\nos.environ['LEAK'] = '1'\nsys.modules['leak'] = math\n"
                       "json.loads = None\nopen('left.txt', 'w').write('x')\nrandom.seed(7)\nrandom.random()")
    assert first.ok, first.error
    second = run_python("import math, os, sys, random, json\n"
                        "('leaked' in globals(), math.pi, 'LEAK' in os.environ, 'leak' in sys.modules,\n"
                        " json.loads is None, os.listdir('.'), repr(random.random()))")
    assert second.ok, second.error
    leaked, pi, env, module, patched, files, rand = eval(second.value)
    assert (leaked, env, module, patched, files) == (False, False, False, False, [])
    assert pi == 3.141592653589793
    assert rand != first.value
    third = run_python("import random\nrepr(random.random())")
    assert third.value != second.value.rsplit(", ", 1)[1]  # each call draws its own seed


def test_calls_run_concurrently_and_keep_their_own_results():
    box = shared()
    futures = [box.submit(f"import time\ntime.sleep(0.3)\n{i} * 3") for i in range(4)]
    started = time.monotonic()
    values = [f.result().value for f in futures]
    assert values == [str(i * 3) for i in range(4)]
    assert time.monotonic() - started < 4 * 0.3  # at least two overlapped (2 cores: max_parallel >= 2)


def test_a_killed_helper_is_replaced():
    box = Sandbox()
    try:
        assert box.run("1 + 1").value == "2"
        old = box.proc.pid
        os.killpg(old, signal.SIGKILL)
        box.proc.wait()
        r = box.run("2 + 2")
        assert r.value == "4" and box.proc.pid != old
    finally:
        box.close()


def test_a_hung_helper_is_replaced_and_its_call_fails():
    box = Sandbox(answer_slack=0.5)
    try:
        assert box.run("1").ok
        os.killpg(box.proc.pid, signal.SIGSTOP)  # the helper and every keeper stop answering
        r = box.run("2", timeout=0.5)
        assert not r.ok and "stopped answering" in r.error
        assert box.run("3").value == "3"
    finally:
        box.close()


def test_off_mode_runs_nothing_and_says_why(monkeypatch):
    monkeypatch.setenv("CHATFORGE_SANDBOX", "off")
    box = Sandbox()
    r = box.run("print('ran')")
    assert not r.ok and r.stdout == "" and r.error.startswith("ToolUnavailable") and "CHATFORGE_SANDBOX" in r.error


def test_a_machine_without_the_boundary_turns_the_tool_off(tmp_path, capsys):
    """What a kernel without Landlock or namespaces looks like from here: the helper says why."""
    fake = tmp_path / "helper.py"
    fake.write_text("import json, socket, sys\n"
                    "s = socket.socket(fileno=int(sys.argv[3]))\n"
                    "s.send(json.dumps({'ready': False, 'reason': 'the kernel offers no Landlock'}).encode())\n")
    box = Sandbox(helper=str(fake))
    r = box.run("print('ran')")
    assert not r.ok and r.stdout == ""
    assert "the Python tool is off on this machine: the kernel offers no Landlock" in r.error
    assert "CHATFORGE_SANDBOX=unconfined" in r.error
    assert "kernel offers no Landlock" in capsys.readouterr().err  # said once, on stderr


def test_a_helper_that_crashes_at_start_says_why(tmp_path):
    fake = tmp_path / "helper.py"
    fake.write_text("raise SystemExit('cannot import the stdlib')\n")
    r = Sandbox(helper=str(fake)).run("1")
    assert not r.ok and "cannot import the stdlib" in r.error


def test_oversized_program_is_refused():
    r = run_python("x = 1\n" * 30_000)
    assert not r.ok and "at most" in r.error


def test_unknown_mode_is_a_usage_error(monkeypatch):
    from chatforge.errors import UsageError
    monkeypatch.setenv("CHATFORGE_SANDBOX", "yolo")
    with pytest.raises(UsageError, match="CHATFORGE_SANDBOX"):
        Sandbox()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the confined sandbox is Linux-only")
def test_status_line_names_the_boundary():
    ok, line = sandbox_status()
    assert ok, line
    assert "Landlock" in line and "seccomp" in line


def test_unconfined_mode_still_runs_code_in_a_fresh_process(monkeypatch):
    monkeypatch.setenv("CHATFORGE_SANDBOX", "unconfined")
    box = Sandbox()
    try:
        r = box.run("import os\nx = os.getpid()\nprint(json_ok := 1)\nsorted(os.environ)")
        assert r.ok and r.value == "['HOME', 'PATH', 'TMPDIR']"
        assert json.loads(json.dumps(r.stdout)) == "1\n"
    finally:
        box.close()


def test_a_call_cancelled_while_queued_is_dropped_and_the_sandbox_goes_on():
    box = Sandbox(max_parallel=1)
    try:
        first = box.submit("import time\ntime.sleep(0.3)\n1")
        queued = box.submit("2")  # waits behind the first (one call at a time)
        assert queued.cancel()    # a released row's call that was never sent
        assert first.result().value == "1" and queued.cancelled()
        assert box.run("3").value == "3"  # the reader thread survived the cancelled Future
    finally:
        box.close()
