"""Rewards for RL: which questions to practise on, which to evaluate on, and how to score a reply.

Where it sits: `chatforge rl --task NAME` looks NAME up here. The RL loop knows nothing about
GSM8K; everything task-specific is one `RewardTask`:

    train(data_dir) -> a sequence of conversations (indexable, len()) the policy practises on
    test(data_dir)  -> the same for the periodic pass@k evaluation
    reward(conversation, reply_text) -> float; the loop treats reward > 0 as "solved" for pass@k

To plug in another verifiable task (unit tests for code, a checker for a puzzle), write a reward
function and call `register(RewardTask(...))` before `rl.main` runs; the tests register a synthetic
task this way. GSM8K is registered by default: reward 1.0 when the number after the reply's last
`####` equals the reference answer, else 0.0. No partial credit for format: a shaped reward is easy
to game, and the group-relative advantage already gives signal whenever some samples are right.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from chatforge.errors import UsageError


@dataclass(frozen=True)
class RewardTask:
    name: str
    train: Callable[..., object]      # data_dir -> conversations to practise on
    test: Callable[..., object]       # data_dir -> conversations for pass@k
    reward: Callable[[dict, str], float]
    description: str = ""


_REGISTRY: dict[str, RewardTask] = {}


def register(task: RewardTask, replace: bool = False) -> RewardTask:
    if task.name in _REGISTRY and not replace:
        raise ValueError(f"reward task {task.name!r} is already registered (pass replace=True to override it)")
    _REGISTRY[task.name] = task
    return task


def get(name: str) -> RewardTask:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UsageError(f"--task {name!r} has no reward registered; use one of: {', '.join(names())}") from None


def names() -> list[str]:
    return sorted(_REGISTRY)


# ---------------------------------------------------------------------------------------------
# GSM8K

def gsm8k_reward(conversation: dict, response: str) -> float:
    """1.0 when the reply's final `#### number` equals the reference answer, else 0.0."""
    from chatforge.tasks.gsm8k import answers_match, extract_answer

    return float(answers_match(extract_answer(response), conversation["answer"]))


def _gsm8k(split: str):
    def load(data_dir=None):
        from chatforge.tasks.gsm8k import GSM8K

        return GSM8K(split, data_dir)
    return load


register(RewardTask("gsm8k", train=_gsm8k("train"), test=_gsm8k("test"), reward=gsm8k_reward,
                    description="grade-school math; reward 1 for the right final answer"))
