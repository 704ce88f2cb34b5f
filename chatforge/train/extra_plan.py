"""How SFT sizes a run around `--extra` conversations when no flag says otherwise.

SFT's own recipe polishes a mid model: one pass over ~23k conversations in which each --extra file
counts twice, at 2% of the base run's learning rates. A file of twenty conversations that gives the
model a name is lost in that: a few dozen of its lines among thousands, nudged by tiny steps. So a
small file (at most SMALL_FILE conversations, all --extra files together) sizes the run:

- weights: its conversations make up EXTRA_SHARE (3/4) of the run; the stage's other tasks are
  scaled down to fill the rest, so the chat format and general skills keep being rehearsed;
- steps: at least MIN_STEPS optimizer steps, every line seen at least twice: twenty lines are seen
  dozens of times, which is what a small model needs to take a fact in;
- learning rate: the base run's (--init-lr-frac 1.0, as midtraining): a short run needs full-size
  steps to move the model at all.

A larger file is a data set, and the stage's usual recipe applies. Either way the validation loss is
measured on lines held out of the --extra files (a tenth, at most MAX_HELD_OUT), never on training
lines; a file with fewer than MIN_LINES_TO_HOLD_OUT distinct conversations holds none out and says
so. Flags given explicitly win: --num-iterations or --epochs (the steps), --init-lr-frac, and
--mixture full (SFT's usual recipe); --mixture extra keeps the sizing, with the file alone.
"""

from __future__ import annotations

import math
from typing import Callable

from chatforge.errors import DownloadError
from chatforge.runtime import print0

SMALL_FILE = 1000
EXTRA_SHARE = 0.75
MIN_STEPS = 60
SMALL_FILE_LR_FRAC = 1.0
HELD_OUT_FRAC, MAX_HELD_OUT, MIN_LINES_TO_HOLD_OUT = 0.1, 100, 10


def hold_out(extras: list, seed: int) -> tuple[list, list]:
    """(training tasks, held-out tasks) of the --extra files (CustomJSON), each file split on its own."""
    train, val = [], []
    for task in extras:
        distinct = task.distinct()
        if distinct < MIN_LINES_TO_HOLD_OUT:
            print0(f"--extra {task.path}: {distinct} distinct conversation(s), too few to hold any out for "
                   f"validation (it takes {MIN_LINES_TO_HOLD_OUT}); all of them are trained on")
            train.append(task)
            continue
        kept, held = task.held_out(max(1, min(MAX_HELD_OUT, round(HELD_OUT_FRAC * distinct))), seed)
        train.append(kept)
        val.append(held)
        print0(f"--extra {task.path}: {len(held)} of its {len(task)} lines held out for validation, never trained on")
    return train, val


def is_small(extras: list) -> bool:
    return 0 < sum(len(task) for task in extras) <= SMALL_FILE


def extra_weight(lines: int, examples_per_step: int, share: float) -> int:
    """Passes over `lines` training lines: enough for MIN_STEPS steps at `share` of each, at least 2."""
    return max(2, math.ceil(MIN_STEPS * examples_per_step * share / max(1, lines)))


def others_scale(extra_examples: int, other_examples: int) -> float:
    """The factor on the other tasks' weights that leaves them 1 - EXTRA_SHARE of the run (at most 1)."""
    wanted = extra_examples * (1 - EXTRA_SHARE) / EXTRA_SHARE
    return min(1.0, wanted / other_examples) if other_examples else 1.0


def optional(make: Callable, what: str):
    """A filler task of a run sized around --extra: one whose data is neither here nor downloadable
    (offline) is left out with a note rather than failing the run it only seasons."""
    try:
        return make()
    except DownloadError as exc:
        print0(f"{what}: left out, its data is not here and cannot be downloaded ({exc})")
        return None
