"""The stage scaffold: the step cadence, resume-or-refuse, summaries that say what was not measured."""

import argparse

import pytest

from chatforge.errors import UsageError
from chatforge.train import stage
from tiny_chat import save_tiny_checkpoint


def test_cadence_of_evaluations_checkpoints_and_steps():
    events = []
    stage.run_steps(0, 5, lambda s: events.append(("step", s)), evals=[(2, lambda s: events.append(("eval", s)))],
                    save_every=3, save_at=lambda s: events.append(("save", s)))
    assert events == [("eval", 0), ("step", 0), ("step", 1), ("eval", 2), ("step", 2), ("save", 3), ("step", 3),
                      ("eval", 4), ("step", 4), ("eval", 5), ("save", 5)]


def test_a_resumed_run_neither_evaluates_nor_saves_its_first_step_again():
    events = []
    stage.run_steps(3, 5, lambda s: events.append(("step", s)), evals=[(1, lambda s: events.append(("eval", s)))],
                    save_every=1, save_at=lambda s: events.append(("save", s)))
    assert events == [("step", 3), ("eval", 4), ("save", 4), ("step", 4), ("eval", 5), ("save", 5)]


def test_a_run_on_disk_is_resumed_or_refused():
    save_tiny_checkpoint("mid", "d2")
    assert stage.resume_or_refuse("mid", "d2", resume=True, fresh_from="base/d2") == 1
    assert stage.resume_or_refuse("mid", "other", resume=True, fresh_from="base/d2") is None
    with pytest.raises(UsageError, match=r"already holds step 1; pass --resume"):
        stage.resume_or_refuse("mid", "d2", resume=False, fresh_from="base/d2")


def test_write_summary_names_a_loss_that_was_not_measured(capsys):
    rt = argparse.Namespace(is_main=True)
    summary = {"wall_time_s": 1.0, "final_train_loss": 2.25, "final_val_loss": None}
    path = stage.write_loss_summary("mid", "t", "midtrain.json", summary, rt)
    out = capsys.readouterr().out
    assert "None" not in out and "final train loss 2.2500, val loss not measured (no validation ran" in out
    assert '"final_val_loss": "no validation ran in this run"' in path.read_text()


def test_an_evaluation_can_skip_the_end_when_its_interval_is_zero():
    events = []
    stage.run_steps(0, 3, lambda s: None, evals=[(0, lambda s: events.append(("bpb", s)), False),
                                                 (0, lambda s: events.append(("val", s)))])
    assert events == [("val", 3)]


def test_ctrl_c_finishes_the_step_saves_and_says_how_to_continue():
    import os
    import signal

    from chatforge.errors import Interrupted

    events = []

    def take_step(s):
        if s == 1:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in the middle of step 1
        events.append(("step", s))

    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (CI may ignore SIGINT)
    try:
        with pytest.raises(Interrupted, match=r"after step 2 of 6: saved step 2; run the same command with --resume"):
            stage.run_steps(0, 6, take_step, save_every=-1, save_at=lambda s: events.append(("save", s)))
        assert events == [("step", 0), ("step", 1), ("save", 2)]  # step 1 ran to its end; nothing after the save
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back
    finally:
        signal.signal(signal.SIGINT, before)


class Clock:
    """A wall clock the steps (and saves) advance by hand."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_without_save_every_a_run_saves_by_the_clock(monkeypatch):
    clock, events = Clock(), []
    monkeypatch.setattr(stage, "monotonic", clock)

    def take_step(s):
        clock.now += 100  # 100 s per step: 5 minutes is 3 steps
        events.append(("step", s))

    stage.run_steps(0, 10, take_step, save_every=None, save_minutes=5, save_at=lambda s: events.append(("save", s)))
    assert [s for kind, s in events if kind == "save"] == [3, 6, 9, 10]

    events.clear()  # --save-every wins over the clock
    stage.run_steps(0, 10, take_step, save_every=4, save_minutes=5, save_at=lambda s: events.append(("save", s)))
    assert [s for kind, s in events if kind == "save"] == [4, 8, 10]

    events.clear()  # a slow save stretches the interval, so saving stays a small share of the run

    def slow_save(s):
        clock.now += 50  # 19 x 50 s: the next save comes 950 s later, not 300 s
        events.append(("save", s))

    stage.run_steps(0, 25, take_step, save_every=None, save_minutes=5, save_at=slow_save)
    assert [s for kind, s in events if kind == "save"] == [3, 13, 23, 25]


def test_a_run_killed_after_a_periodic_save_resumes_from_it(tmp_path, monkeypatch):
    """Pretraining without --save-every: killed at step 5 (no Ctrl-C, nothing saved on the way out),
    the checkpoint the clock wrote just before (step 5) is where --resume starts; old ones are pruned."""
    from test_pretrain import run, tiny_flags, write_corpus

    from chatforge import paths
    from chatforge.model import checkpoint
    from chatforge.tokenizer import Tokenizer
    from chatforge.train import loop

    corpus = write_corpus(tmp_path, num_docs=100)
    Tokenizer.train(iter(corpus.read_text().splitlines()), 384).save(paths.tokenizer_dir())
    clock, real_step = Clock(), loop.optimizer_step
    monkeypatch.setattr(stage, "monotonic", clock)

    def ten_minute_step(*args, **kwargs):  # every step takes 10 minutes of wall clock
        if args[6] == 5 and kill["armed"]:
            raise RuntimeError("power cut")
        clock.now += 600
        return real_step(*args, **kwargs)

    kill = {"armed": True}
    monkeypatch.setattr(loop, "optimizer_step", ten_minute_step)
    flags = tiny_flags(corpus, "--num-iterations", "8", "--eval-every", "0")
    with pytest.raises(RuntimeError, match="power cut"):
        run(*flags)
    assert checkpoint.list_steps("base", "d2") == [3, 4, 5]  # one a step, the newest three kept
    kill["armed"] = False
    summary = run(*flags, "--resume")
    assert summary["resumed_from_step"] == 5
    assert checkpoint.list_steps("base", "d2") == [6, 7, 8]
    assert "stories.jsonl" in checkpoint.read_meta(checkpoint.resolve("base", "d2")[2])["data"]
