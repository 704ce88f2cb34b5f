"""The `chatforge` command: help, version, env, and one-line errors with exit code 2."""

import json
import subprocess
import sys

import pytest

from chatforge import __version__
from chatforge.cli import COMMANDS


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "chatforge", *args], capture_output=True, text=True,
                          timeout=120, env=env)


def test_help_lists_every_stage():
    out = run_cli("--help")
    assert out.returncode == 0
    for name in COMMANDS:
        assert name in out.stdout


def test_version():
    out = run_cli("--version")
    assert out.returncode == 0 and __version__ in out.stdout


def test_env_reports_what_a_bug_report_needs(chatforge_home):
    out = run_cli("env", "--json", "--device", "cpu")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    for key in ("python", "torch", "cuda (torch build)", "device", "compute dtype", "gpus",
                "base directory", "free space", "python tool"):
        assert key in info
    assert str(chatforge_home) in info["base directory"]
    assert info["compute dtype"].startswith("float32 (")


@pytest.mark.parametrize("args, fragment", [
    (("nosuchstage",), "invalid choice"),
    (("env", "--nosuchflag"), "unrecognized arguments"),
    (("env", "--device", "tpu"), "invalid choice"),
])
def test_bad_usage_is_one_line_and_exit_2(args, fragment):
    out = run_cli(*args)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0]
    assert "Traceback" not in out.stderr


def test_cuda_without_gpu_is_one_line_and_exit_2():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = run_cli("env", "--device", "cuda")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "chatforge: error: --device cuda was asked for but no CUDA GPU is visible; use --device cpu or check nvidia-smi"
    ]


def test_unwritable_home_is_one_line_and_exit_2(tmp_path):
    import os

    blocker = tmp_path / "file"
    blocker.write_text("x")
    env = {**os.environ, "CHATFORGE_HOME": str(blocker / "sub")}
    out = run_cli("env", env=env)
    assert out.returncode == 2
    assert "CHATFORGE_HOME" in out.stderr and "Traceback" not in out.stderr
