"""Progress lines when not on a terminal, and the metrics JSONL with provenance."""

import io
import json

from chatforge import progress


def test_progress_prints_periodic_lines_with_rate_and_eta_when_not_a_tty():
    stream = io.StringIO()
    p = progress.Progress(total=10, desc="work", unit="step", interval=0.0, stream=stream)
    for _ in range(4):
        p.update(1, loss="1.23")
    p.close()
    lines = stream.getvalue().strip().splitlines()
    assert len(lines) == 5
    assert "4/10 (40%)" in lines[3] and "eta" in lines[3] and "step/s" in lines[3] and "loss 1.23" in lines[3]
    assert "done in" in lines[-1]


def test_progress_is_quiet_on_other_ranks(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    stream = io.StringIO()
    p = progress.Progress(total=3, desc="work", interval=0.0, stream=stream)
    p.update(3)
    p.close()
    assert stream.getvalue() == ""


def test_metrics_logger_writes_jsonl_and_provenance(chatforge_home):
    log = progress.MetricsLogger("pretrain", args={"depth": 4}, run_id="t1")
    log.log(step=1, loss=2.5)
    log.log(step=2, loss=2.0)
    records = progress.read_metrics(chatforge_home / "runs" / "t1" / "metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in records] == [(1, 2.5), (2, 2.0)]
    meta = json.loads((chatforge_home / "runs" / "t1" / "meta.json").read_text())
    assert meta["args"] == {"depth": 4} and meta["torch"] and meta["stage"] == "pretrain"


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_lines_every_interval_with_an_eta_that_leaves_out_the_compile_steps():
    clock, stream = FakeClock(), io.StringIO()
    p = progress.Progress(total=100, desc="pretrain", unit="step", interval=30, stream=stream, warmup=3,
                          clock=clock)
    clock.now = 100.0  # step 1 includes compilation
    p.update(1, loss="5.0000")
    for step in range(2, 101):
        clock.now += 1.0  # then one second per step
        p.update(1, loss=f"{5 - step / 100:.4f}", **{"tok/s": "1,024"})
    p.close()
    lines = stream.getvalue().strip().splitlines()
    # a line at step 1 (30 s since the start), then one every 30 s: steps 31, 61, 91; then the last
    assert [line.split(" | ")[0] for line in lines] == [
        "pretrain: step 1/100 (1%)", "pretrain: step 31/100 (31%)", "pretrain: step 61/100 (61%)",
        "pretrain: step 91/100 (91%)", "pretrain: step 100/100 (100%)"]
    assert "eta ?" in lines[0]  # no honest rate yet: the only step timed is the compiling one
    # 69 steps left at one second each; counting the 100 s compile would say about 4 minutes
    assert "eta 1m09s" in lines[1] and "1.0 step/s" in lines[1] and "loss 4.6900" in lines[1]
    assert "tok/s 1,024" in lines[1]
    assert "done in 3m19s" in lines[-1]


def test_report_prints_a_line_now_and_restarts_the_interval():
    clock, stream = FakeClock(), io.StringIO()
    p = progress.Progress(total=10, desc="mid", unit="step", interval=30, stream=stream, initial=4, clock=clock)
    clock.now = 5.0
    p.update(1, loss="2.0000")
    assert stream.getvalue() == ""
    p.report()  # e.g. right after an eval
    clock.now = 34.0
    p.update(1, loss="1.5000")
    assert stream.getvalue().splitlines() == ["mid: step 5/10 (50%) | eta 25s | 0.2 step/s | loss 2.0000"]
    clock.now = 35.0
    p.update(1, loss="1.0000")
    assert stream.getvalue().splitlines()[-1].startswith("mid: step 7/10 (70%)")
