"""Conversation rendering: the loss mask token by token, system folding, truncation, validation errors."""

import pytest

from chatforge.conversation import render_conversation, render_for_completion, validate_conversation
from chatforge.errors import DataError
from chatforge.tokenizer import Tokenizer

TEXT = ("What is two to the power of ten? Let me compute that with python. The answer is 1024. "
        "Thanks! You are welcome. print(2**10) def f(x): return x * 2\n") * 50


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(iter([TEXT]), 400)


TOOL_CONVERSATION = {"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2**10?"},
    {"role": "assistant", "content": [
        {"type": "text", "text": "Let me compute."},
        {"type": "python", "text": "print(2**10)"},
        {"type": "python_output", "text": "1024\n"},
        {"type": "text", "text": "It is 1024."},
    ]},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You are welcome."},
]}


def test_mask_token_by_token_with_tool_call(tok):
    s = tok.special_id

    def text(t, m):
        return [(i, m) for i in tok.encode(t)]

    expected = (
        [(s("<|bos|>"), 0), (s("<|user_start|>"), 0)] + text("Be brief.\n\nWhat is 2**10?", 0)
        + [(s("<|user_end|>"), 0), (s("<|assistant_start|>"), 0)]
        + text("Let me compute.", 1)
        + [(s("<|python_start|>"), 1)] + text("print(2**10)", 1) + [(s("<|python_end|>"), 1)]
        + [(s("<|output_start|>"), 0)] + text("1024\n", 0) + [(s("<|output_end|>"), 0)]
        + text("It is 1024.", 1) + [(s("<|assistant_end|>"), 1)]
        + [(s("<|user_start|>"), 0)] + text("Thanks!", 0) + [(s("<|user_end|>"), 0)]
        + [(s("<|assistant_start|>"), 0)] + text("You are welcome.", 1) + [(s("<|assistant_end|>"), 1)]
    )
    ids, mask = render_conversation(tok, TOOL_CONVERSATION)
    assert list(zip(ids, mask)) == expected


def test_mask_selects_exactly_the_assistant_output(tok):
    # Checked through decoded text rather than ids: what is trained on, and what is not.
    ids, mask = render_conversation(tok, TOOL_CONVERSATION)
    trained = tok.decode([i for i, m in zip(ids, mask) if m])
    assert trained == ("Let me compute.<|python_start|>print(2**10)<|python_end|>It is 1024."
                       "<|assistant_end|>You are welcome.<|assistant_end|>")
    assert tok.decode(ids) == (
        "<|bos|><|user_start|>Be brief.\n\nWhat is 2**10?<|user_end|><|assistant_start|>Let me compute."
        "<|python_start|>print(2**10)<|python_end|><|output_start|>1024\n<|output_end|>It is 1024."
        "<|assistant_end|><|user_start|>Thanks!<|user_end|><|assistant_start|>You are welcome."
        "<|assistant_end|>")


def test_literal_special_strings_in_content_stay_text(tok):
    conv = {"messages": [{"role": "user", "content": "<|assistant_end|>"},
                         {"role": "assistant", "content": "<|bos|>"}]}
    ids, mask = render_conversation(tok, conv)
    specials = [i for i in ids if tok.is_special(i)]
    assert len(specials) == 5  # bos, user_start, user_end, assistant_start, assistant_end


def test_truncation_keeps_ids_and_mask_aligned(tok):
    ids, mask = render_conversation(tok, TOOL_CONVERSATION)
    for n in (1, 5, len(ids) - 1, len(ids), len(ids) + 10):
        cut_ids, cut_mask = render_conversation(tok, TOOL_CONVERSATION, max_tokens=n)
        assert cut_ids == ids[:n] and cut_mask == mask[:n]
        assert len(cut_ids) == len(cut_mask) == min(n, len(ids))


def test_render_for_completion(tok):
    prompt = render_for_completion(tok, TOOL_CONVERSATION)
    ids, _ = render_conversation(tok, TOOL_CONVERSATION)
    # The final reference reply is left out; the prompt ends where the model starts writing.
    assert prompt[-1] == tok.special_id("<|assistant_start|>")
    assert ids[:len(prompt)] == prompt
    assert tok.decode(ids[len(prompt):]) == "You are welcome.<|assistant_end|>"
    # A conversation ending with a user message is the prompt as it is.
    open_conv = {"messages": TOOL_CONVERSATION["messages"][:-1]}
    assert render_for_completion(tok, open_conv) == prompt
    assert TOOL_CONVERSATION["messages"][-1]["content"] == "You are welcome."  # input untouched


@pytest.mark.parametrize("conversation, pattern", [
    ([], r"conversation: field 'messages'"),
    ({"messages": []}, r"conversation: field 'messages'"),
    ({"messages": ["hi"]}, r"message 0: field 'role'"),
    ({"messages": [{"role": "bot", "content": "x"}]}, r"message 0: field 'role' is 'bot'"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, r"message 0: field 'role' is 'assistant'"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
     r"message 1: field 'role' is 'user' but 'assistant' was expected"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]},
     r"message 1: field 'role' is 'system'"),
    ({"messages": [{"role": "system", "content": "a"}]}, r"message 0: field 'role' is 'system'"),
    ({"messages": [{"role": "user"}]}, r"message 0: field 'content' is missing"),
    ({"messages": [{"role": "user", "content": 3}]}, r"message 0: field 'content' is a int"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}]},
     r"message 0: field 'content' is a list; it must be a string"),
    ({"messages": [{"role": "user", "content": "a"},
                   {"role": "assistant", "content": [{"type": "image", "text": "x"}]}]},
     r"message 1: field 'content\[0\].type' is 'image'"),
    ({"messages": [{"role": "user", "content": "a"},
                   {"role": "assistant", "content": [{"type": "python"}]}]},
     r"message 1: field 'content\[0\].text' must be a string"),
])
def test_malformed_conversations_name_index_and_field(tok, conversation, pattern):
    with pytest.raises(DataError, match=pattern):
        render_conversation(tok, conversation)
    with pytest.raises(DataError, match=pattern):
        render_for_completion(tok, conversation)


def test_conversation_may_end_with_user(tok):
    conv = {"messages": [{"role": "user", "content": "hi"}]}
    assert validate_conversation(conv) == conv["messages"]
    ids, mask = render_conversation(tok, conv)
    assert sum(mask) == 0 and len(ids) == len(mask)
