"""The reply parser: tool blocks split out, characters whole, unclosed blocks closed."""

from chatforge.infer.reply import ReplyParser, response_text
from tiny_chat import tiny_tokenizer


def events(tok, ids):
    parser = ReplyParser(tok)
    out = [e for t in ids for e in parser.push(t)] + parser.finish()
    merged = []
    for e in out:  # neighbouring text events of one kind read as one
        if merged and e.event == "text" and merged[-1][0] == "text" and merged[-1][1] == e.kind:
            merged[-1] = ("text", e.kind, merged[-1][2] + e.text)
        else:
            merged.append((e.event, e.kind, e.text))
    return merged


def test_tool_blocks_are_split_out():
    tok = tiny_tokenizer()
    sp = tok.special_id
    ids = (tok.encode("let me compute ") + [sp("<|python_start|>")] + tok.encode("6 * 7") + [sp("<|python_end|>"),
           sp("<|output_start|>")] + tok.encode("42") + [sp("<|output_end|>")] + tok.encode(" so 42 ✓")
           + [sp("<|assistant_end|>")])
    assert events(tok, ids) == [("text", "text", "let me compute "), ("open", "python", ""),
                                ("text", "python", "6 * 7"), ("close", "python", ""),
                                ("open", "python_output", ""), ("text", "python_output", "42"),
                                ("close", "python_output", ""), ("text", "text", " so 42 ✓")]
    assert response_text(tok, ids) == tok.decode(ids[:-1])


def test_an_unclosed_block_is_closed_before_the_next_and_at_the_end():
    tok = tiny_tokenizer()
    sp = tok.special_id
    ids = [sp("<|python_start|>")] + tok.encode("1 +") + [sp("<|python_start|>")] + tok.encode("2")
    assert events(tok, ids) == [("open", "python", ""), ("text", "python", "1 +"), ("close", "python", ""),
                                ("open", "python", ""), ("text", "python", "2"), ("close", "python", "")]


def test_characters_split_across_tokens_come_out_whole():
    tok = tiny_tokenizer()
    text = "東京 😀 naïve"
    parser = ReplyParser(tok)
    pieces = [e.text for t in tok.encode(text) for e in parser.push(t)] + [e.text for e in parser.finish()]
    assert "".join(pieces) == text and all("\ufffd" not in p for p in pieces)
