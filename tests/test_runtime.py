"""Device and dtype choice, rank-0 printing, and a real two-process gloo run under torchrun."""

import subprocess
import sys
import textwrap

import pytest
import torch

from chatforge import runtime
from chatforge.errors import UsageError


def test_auto_device_on_cpu_machine_is_cpu_with_reason():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    dev, reason = runtime.pick_device("auto")
    assert dev.type in ("cpu", "mps")
    assert reason


def test_explicit_cpu_device():
    dev, reason = runtime.pick_device("cpu")
    assert dev == torch.device("cpu")
    assert "--device" in reason


def test_cuda_without_gpu_is_a_usage_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(UsageError, match="no CUDA GPU"):
        runtime.pick_device("cuda")


def test_unknown_device_is_a_usage_error():
    with pytest.raises(UsageError, match="--device"):
        runtime.pick_device("tpu")


def test_dtype_defaults_to_fp32_on_cpu_and_can_be_overridden():
    cpu = torch.device("cpu")
    assert runtime.pick_dtype(cpu)[0] == torch.float32
    assert runtime.pick_dtype(cpu, "bf16") == (torch.bfloat16, "asked for with --dtype")
    with pytest.raises(UsageError, match="fp16"):
        runtime.pick_dtype(cpu, "fp16")


def test_dist_env_reads_torchrun_variables(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert runtime.dist_env() == (3, 1, 4)


def test_print0_is_silent_on_other_ranks(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    runtime.print0("hidden")
    monkeypatch.setenv("RANK", "0")
    runtime.print0("shown")
    assert capsys.readouterr().out == "shown\n"


def test_single_process_runtime_is_not_distributed():
    rt = runtime.init_runtime(device="cpu", seed=0, announce=False)
    assert not rt.distributed and rt.is_main and rt.world_size == 1


@pytest.mark.slow
def test_torchrun_two_cpu_ranks_all_reduce(tmp_path):
    script = tmp_path / "allreduce.py"
    script.write_text(textwrap.dedent("""
        import torch, torch.distributed as dist
        from chatforge.runtime import init_runtime, shutdown, print0
        rt = init_runtime(device="cpu", announce=False)
        t = torch.tensor([float(rt.rank + 1)])
        dist.all_reduce(t)
        assert rt.world_size == 2 and dist.get_backend() == "gloo"
        print(f"rank {rt.rank} sum {t.item()}", flush=True)
        print0("only rank zero says this")
        shutdown()
    """))
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)],
        capture_output=True, text=True, timeout=180,
    )
    assert out.returncode == 0, out.stderr
    assert "rank 0 sum 3.0" in out.stdout and "rank 1 sum 3.0" in out.stdout
    assert out.stdout.count("only rank zero says this") == 1
