"""bench tools on the CPU: the sandbox table and a batch whose scripted rows really call the tool."""

import argparse

from chatforge.bench import tools


def test_bench_tools_measures_scripted_calls_on_cpu(capsys):
    parser = argparse.ArgumentParser()
    tools.add_arguments(parser)
    args = parser.parse_args(["--depth", "2", "--batch-size", "6", "--tool-rate", "0.5", "--max-new-tokens", "80",
                              "--max-seq-len", "256", "--prompt-len", "16", "--vocab-size", "512", "--calls", "20",
                              "--device", "cpu"])
    result = tools.main(args)
    assert result["decode"]["tools"]["calls"] == 3  # half of the six rows, each one call
    assert result["decode"]["no tools"]["calls"] == 0
    assert 0 < result["sandbox"]["p50_ms"] <= result["sandbox"]["p99_ms"]
    out = capsys.readouterr().out
    assert "| one call at a time |" in out and "| calls in 50% of rows |" in out
