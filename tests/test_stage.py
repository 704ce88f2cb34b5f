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
