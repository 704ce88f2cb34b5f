"""The reward registry: GSM8K's default reward, plugging a task in, and the error for an unknown one."""

import pytest

from chatforge.errors import UsageError
from chatforge.train import rewards

CONV = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "#### 4"}],
        "answer": "1200"}


def test_gsm8k_reward_reads_the_last_final_answer():
    assert rewards.gsm8k_reward(CONV, "3 boxes of 400 is 1,200.\n#### 1,200") == 1.0
    assert rewards.gsm8k_reward(CONV, "#### 1200.0") == 1.0
    assert rewards.gsm8k_reward(CONV, "#### 7 ... no wait #### 1200") == 1.0
    assert rewards.gsm8k_reward(CONV, "#### 1200 ... no wait #### 7") == 0.0
    assert rewards.gsm8k_reward(CONV, "the answer is 1200") == 0.0  # no #### marker: no credit


def test_gsm8k_is_registered_by_default():
    task = rewards.get("gsm8k")
    assert "gsm8k" in rewards.names() and task.reward is rewards.gsm8k_reward


def test_a_new_task_plugs_in_and_duplicates_are_refused():
    task = rewards.RewardTask("echo-test", train=lambda d=None: [], test=lambda d=None: [],
                              reward=lambda conv, text: float(text == "x"))
    rewards.register(task, replace=True)
    assert rewards.get("echo-test").reward({}, "x") == 1.0
    with pytest.raises(ValueError, match="already registered"):
        rewards.register(task)


def test_unknown_task_names_the_flag_and_the_choices():
    with pytest.raises(UsageError, match=r"--task 'nope'.*gsm8k"):
        rewards.get("nope")


def test_gsm8k_rewards_the_reference_answers_of_the_real_data(shared_data):
    from chatforge.tasks.gsm8k import GSM8K

    task = rewards.get("gsm8k")
    train = task.train(shared_data)
    assert isinstance(train, GSM8K) and len(train) == 7473
    for i in (0, 1, 100):
        conv = train[i]
        reference = "".join(p["text"] for p in conv["messages"][-1]["content"])
        assert task.reward(conv, reference) == 1.0
        assert task.reward(conv, "#### -123456789") == 0.0
