"""SmolTalk: the shared stand-in and a hand-made hub-layout parquet load, split and render back."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from chatforge.conversation import render_conversation
from chatforge.errors import DataError
from chatforge.tasks.smoltalk import SmolTalk
from chatforge.tokenizer import Tokenizer


def expected_text(conv):
    """The rendered layout written out by hand (a leading system message joins the first user turn)."""
    msgs = conv["messages"]
    out, system = "<|bos|>", ""
    for m in msgs:
        if m["role"] == "system":
            system = m["content"] + "\n\n"
        elif m["role"] == "user":
            out += f"<|user_start|>{system}{m['content']}<|user_end|>"
            system = ""
        else:
            out += f"<|assistant_start|>{m['content']}<|assistant_end|>"
    return out


def test_shared_stand_in_splits_and_renders_back(shared_data):
    train, test = SmolTalk("train", shared_data), SmolTalk("test", shared_data)
    assert "stand-in" in train.source and "conversations.jsonl.gz" in train.source
    assert 7000 < len(train) + len(test) <= 7980 and 300 < len(test) < 450
    firsts = {c["messages"][0]["content"] for c in test}
    assert sum(c["messages"][0]["content"] in firsts for c in train) < 10  # (a few prompts repeat in the data)
    sample = [train[i] for i in range(0, len(train), 500)] + [test[0]]
    tok = Tokenizer.train(iter([m["content"] for c in sample for m in c["messages"]]), 512)
    for conv in sample:
        ids, mask = render_conversation(tok, conv)
        assert tok.decode(ids) == expected_text(conv)
        assert len(ids) == len(mask) and mask[-1] == 1


def test_hub_parquet_layout(tmp_path):
    folder = tmp_path / "HuggingFaceTB" / "smol-smoltalk" / "default" / "train"
    folder.mkdir(parents=True)
    good = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}]
    bad = [{"role": "user", "content": "Hi"}, {"role": "user", "content": "again"}]
    pq.write_table(pa.table({"messages": [good, bad, good[1:]]}), folder / "0000.parquet")
    task = SmolTalk("train", tmp_path)
    assert len(task) == 2 and "stand-in" not in task.source
    assert task[0] == {"messages": good}
    tok = Tokenizer.train(iter(["Be kind. Hi Hello!"] * 20), 280)
    assert tok.decode(render_conversation(tok, task[0])[0]) == expected_text(task[0])
    pq.write_table(pa.table({"messages": [bad]}), folder / "0000.parquet")
    with pytest.raises(DataError, match="no valid conversation"):
        SmolTalk("train", tmp_path)
