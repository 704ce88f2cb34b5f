"""Custom JSONL conversations: valid lines load, bad lines are skipped with their line number and field."""

import json

import pytest

from chatforge.errors import DataError
from chatforge.tasks.custom import CustomJSON, validate_training_conversation

GOOD = {"messages": [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "Forge."}]}


def write(path, lines):
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_valid_lines_load_and_bad_ones_are_reported(tmp_path, capsys):
    bare_list = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [
        {"type": "text", "text": "2+2 is "}, {"type": "python", "text": "2+2"},
        {"type": "python_output", "text": "4"}]}]
    path = write(tmp_path / "me.jsonl", [
        GOOD,
        "{not json",
        {"messages": [{"role": "assistant", "content": "I speak first"}]},           # wrong role order
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]},  # empty
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [
            {"type": "image", "text": "x"}]}]},                                          # unknown part type
        {"messages": [{"role": "user", "content": "hi"}]},                              # no reply
        bare_list,
    ])
    task = CustomJSON(path)
    assert len(task) == 2
    assert task[0] == GOOD and task[1] == {"messages": bare_list}
    out = capsys.readouterr().out
    assert "line 2: not JSON" in out
    assert "line 3: conversation message 0: field 'role'" in out
    assert "line 4: conversation message 1: field 'content' is empty" in out
    assert "line 5: conversation message 1: field 'content[0].type'" in out
    assert "line 6: conversation message 0: field 'role'" in out and "last message" in out


def test_nothing_valid_fails_naming_the_file(tmp_path):
    path = write(tmp_path / "bad.jsonl", ["[]", "{}"])
    with pytest.raises(DataError, match="--extra .*bad.jsonl holds no valid conversation"):
        CustomJSON(path)
    with pytest.raises(DataError, match="no such file"):
        CustomJSON(tmp_path / "missing.jsonl")


def test_system_message_allowed_and_validated():
    conv = {"messages": [{"role": "system", "content": "Be brief."}, *GOOD["messages"]]}
    assert validate_training_conversation(conv) is conv
    with pytest.raises(DataError, match="message 0: field 'content' is empty"):
        validate_training_conversation({"messages": [{"role": "system", "content": ""}, *GOOD["messages"]]})


def test_held_out_lines_are_never_training_lines_even_when_repeated(tmp_path):
    convs = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
             for i in range(10)]
    task = CustomJSON(write(tmp_path / "c.jsonl", convs + convs[:3]))  # three conversations written twice
    assert task.distinct() == 10
    train, held = task.held_out(4, seed=1)
    train_lines = {json.dumps(c, sort_keys=True) for c in train}
    held_lines = [json.dumps(c, sort_keys=True) for c in held]
    assert len(set(held_lines)) == 4 and not train_lines & set(held_lines)
    assert len(train) + len(held) == 13 and len(train_lines) == 6
    assert [list(t) for t in task.held_out(4, seed=1)] == [list(train), list(held)]  # the seed decides
