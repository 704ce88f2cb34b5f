"""--device-batch-size auto: the search's decisions against a fake GPU (a memory model that raises
torch.OutOfMemoryError above its limit), the sizes it may pick, and the flags."""

import argparse

import pytest
import torch

from chatforge.errors import UsageError
from chatforge.train import autobatch
from chatforge.train.autobatch import GIB, Line, power_of_two_sizes, search


class FakeGPU:
    """peak = fixed + per_row x rows; more than `limit` bytes raises as CUDA's allocator does."""

    def __init__(self, fixed_gib: float, per_row_gib: float, limit_gib: float):
        self.fixed, self.per_row, self.limit = fixed_gib * GIB, per_row_gib * GIB, limit_gib * GIB
        self.calls = []

    def __call__(self, rows: int) -> int:
        self.calls.append(rows)
        peak = self.fixed + self.per_row * rows
        if peak > self.limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory trying {rows} rows")
        return int(peak)

    def most_rows(self, usable_gib: float) -> int:
        return int((min(usable_gib * GIB, self.limit) - self.fixed) // self.per_row)


def largest_power_of_two_at_most(n: int) -> int:
    return 1 << (n.bit_length() - 1)


def test_sizes_are_the_powers_of_two_that_divide_a_steps_rows():
    assert power_of_two_sizes(256) == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert power_of_two_sizes(24) == [1, 2, 4, 8]          # 16 would leave a partial micro-step
    assert power_of_two_sizes(7) == [1]
    assert power_of_two_sizes(256, cap=32) == [1, 2, 4, 8, 16, 32]
    for n in (1, 12, 96, 1000):
        assert all(n % s == 0 for s in power_of_two_sizes(n))


@pytest.mark.parametrize("limit_gib", [24, 40, 80, 141])
def test_without_a_probe_it_halves_from_the_top_to_the_largest_that_fits(limit_gib):
    gpu = FakeGPU(fixed_gib=6, per_row_gib=1.1, limit_gib=limit_gib)
    sizes = power_of_two_sizes(256)
    choice = search(gpu, sizes, budget=limit_gib * GIB, headroom=0.0)
    expected = largest_power_of_two_at_most(gpu.most_rows(limit_gib))
    assert choice.rows == expected
    assert choice.peak == gpu(expected) and choice.peak <= limit_gib * GIB
    assert gpu.calls[0] == 256 and all(a == 2 * b for a, b in zip(gpu.calls, gpu.calls[1:-1]))


def test_the_headroom_rejects_a_size_that_only_just_fits():
    gpu = FakeGPU(fixed_gib=4, per_row_gib=1, limit_gib=100)
    choice = search(gpu, [1, 2, 4, 8, 16], budget=20 * GIB, headroom=0.1)  # 16 rows peak 20 GiB > 18 usable
    assert choice.rows == 8
    assert "16 peaks 20.0 GiB" in choice.reason()


def test_an_over_predicting_probe_starts_low_then_climbs_while_the_real_line_says_it_fits():
    gpu = FakeGPU(fixed_gib=6, per_row_gib=0.5, limit_gib=24)          # truth: 32 rows fit (22 GiB)
    eager = Line(fixed=6 * GIB, per_row=1.0 * GIB)                       # eager keeps twice the activations
    choice = search(gpu, power_of_two_sizes(256), budget=24 * GIB, probe=eager, headroom=0.0)
    assert choice.rows == 32
    assert gpu.calls == [16, 32]  # 64 is predicted at 38 GiB from the 32-row measurement: never compiled
    assert choice.skipped == (64, pytest.approx(38 * GIB))
    assert "64 predicted 38.0 GiB" in choice.reason() and "peak 22.0 GiB" in choice.reason()


def test_an_under_predicting_probe_falls_back_by_halving():
    gpu = FakeGPU(fixed_gib=6, per_row_gib=2.0, limit_gib=24)           # truth: 8 rows fit
    optimistic = Line(fixed=6 * GIB, per_row=0.5 * GIB)
    choice = search(gpu, power_of_two_sizes(64), budget=24 * GIB, probe=optimistic, headroom=0.0)
    assert choice.rows == 8
    assert gpu.calls == [32, 16, 8]
    assert "16 OOM at 24.0 GiB free" in choice.reason()


def test_a_cap_is_named_in_the_reason():
    gpu = FakeGPU(fixed_gib=6, per_row_gib=1.0, limit_gib=24)
    choice = search(gpu, [1, 2, 4, 8, 16, 32], budget=24 * GIB, headroom=0.0)
    choice.capped = True
    assert choice.rows == 16
    assert choice.reason().startswith("auto: 32 OOM at a 24 GiB cap; peak 22.0 GiB")


def test_the_whole_steps_rows_fitting_says_so():
    gpu = FakeGPU(fixed_gib=1, per_row_gib=0.1, limit_gib=141)
    choice = search(gpu, [1, 2, 4, 8], budget=141 * GIB)
    assert choice.rows == 8 and choice.largest and gpu.calls == [8]
    assert "the whole step's rows" in choice.reason()


def test_nothing_fitting_is_one_clear_line():
    gpu = FakeGPU(fixed_gib=30, per_row_gib=1, limit_gib=24)
    with pytest.raises(UsageError, match="even a micro-batch of 1 row"):
        search(gpu, [1, 2, 4], budget=24 * GIB)


def test_the_probe_line_goes_through_both_points():
    line = Line.through((1, 10 * GIB), (2, 13 * GIB))
    assert line.predict(1) == 10 * GIB and line.predict(4) == 19 * GIB
    assert line.refit(4, 27 * GIB).per_row == 5 * GIB


def test_off_cuda_auto_keeps_the_stages_default():
    class CPU:
        device = torch.device("cpu")

    def no_trial():
        raise AssertionError("no search off CUDA")

    assert autobatch.resolve("auto", 64, CPU(), no_trial, fallback=32) == (32, "auto: off CUDA the default 32")
    assert autobatch.resolve(8, 64, CPU(), no_trial, fallback=32) == (8, "given")


def test_the_flag_takes_auto_or_a_positive_integer():
    parser = argparse.ArgumentParser()
    autobatch.add_arguments(parser, "off CUDA 32")
    assert parser.parse_args([]).device_batch_size is None
    assert parser.parse_args(["--device-batch-size", "auto"]).device_batch_size == "auto"
    args = parser.parse_args(["--device-batch-size", "16", "--memory-limit-gb", "24"])
    assert (args.device_batch_size, args.memory_limit_gb) == (16, 24.0)
    for bad in ("0", "big"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--device-batch-size", bad])


def test_a_memory_limit_off_cuda_names_the_flag():
    with pytest.raises(UsageError, match="--memory-limit-gb"):
        autobatch.apply_memory_limit(24, torch.device("cpu"))
    assert autobatch.apply_memory_limit(None, torch.device("cpu")) is None


def test_a_choice_taken_down_by_another_rank_says_so_not_that_its_own_sizes_failed():
    from chatforge.train.autobatch import GIB, Choice

    choice = Choice(rows=8, peak=None, budget=80 * GIB, tried=[(16, 40 * GIB), (32, None)], seconds=12.0,
                    note="16 fit on this rank; 8 is the smallest of 2 ranks' choices", agreed_down=True)
    line = choice.reason()
    assert line.startswith("auto: 16 fit on this rank; 8 is the smallest of 2 ranks' choices")
    assert "OOM" not in line and "over" not in line
