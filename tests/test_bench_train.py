"""`chatforge bench train` runs end to end on CPU with a toy model and reports its figures."""

import argparse

from chatforge.bench.train import add_arguments, main


def test_bench_train_runs_a_toy_on_cpu(capsys):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--depth", "2", "--max-seq-len", "32", "--batch-size", "2", "--vocab-size", "256",
                              "--head-dim", "32", "--window-pattern", "SL", "--steps", "2", "--warmup", "1",
                              "--compile", "off", "--device", "cpu"])
    result = main(args)
    assert result["tokens_per_s"] > 0 and result["mfu"] is None and result["peak_memory_gib"] is None
    assert 0 < result["loss"] < 20
    out = capsys.readouterr().out
    assert "| depth | params |" in out and "n/a" in out


def test_bench_train_compares_the_plain_loss_with_accumulation(capsys):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--depth", "2", "--seq-len", "32", "--batch-size", "2", "--vocab-size", "256",
                              "--head-dim", "32", "--micro-steps", "3", "--loss", "plain", "--steps", "1",
                              "--warmup", "0", "--no-compile", "--device", "cpu"])
    result = main(args)
    assert result["loss_path"] == "plain" and result["micro_steps"] == 3
    # the figure counts every micro-step's tokens
    assert abs(result["tokens_per_s"] * result["step_time_s"] - 3 * 2 * 32) < 1e-6
    assert "| plain | 3 |" in capsys.readouterr().out
