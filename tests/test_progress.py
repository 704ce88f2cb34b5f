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
