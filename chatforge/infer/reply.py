"""Token ids of one assistant reply -> its parts: text, tool code (`python`), tool output.

The engine streams ids; the chat CLI prints them, the server sends them as text with fenced tool
blocks, and pass@k scores the decoded reply. All three split a reply the same way, here: at
`<|python_start|>`/`<|python_end|>` and `<|output_start|>`/`<|output_end|>`, decoding UTF-8
incrementally (a character split across tokens comes out whole), other special tokens dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

from chatforge.infer.engine import IncrementalDecoder

KINDS = ("text", "python", "python_output")


@dataclass
class ReplyEvent:
    """`text`: more characters of the current part (kind says which); `open`/`close`: a tool block of
    that kind starts/ends. A block the model never closed is closed before the next opens and at the end."""
    event: str   # "text", "open" or "close"
    kind: str    # one of KINDS
    text: str = ""


class ReplyParser:
    def __init__(self, tokenizer):
        special = tokenizer.special_id
        self.tokenizer = tokenizer
        self.opens = {special("<|python_start|>"): "python", special("<|output_start|>"): "python_output"}
        self.closes = {special("<|python_end|>"), special("<|output_end|>")}
        self.decoder = IncrementalDecoder(tokenizer)
        self.kind = "text"

    def push(self, token: int) -> list[ReplyEvent]:
        if token in self.opens:
            out = self._end_block()
            self.kind = self.opens[token]
            return out + [ReplyEvent("open", self.kind)]
        if token in self.closes:
            return self._end_block()
        if self.tokenizer.is_special(token):
            return []
        text = self.decoder.push(token)
        return [ReplyEvent("text", self.kind, text)] if text else []

    def finish(self) -> list[ReplyEvent]:
        return self._end_block()

    def _end_block(self) -> list[ReplyEvent]:
        """Flush held characters and close the open tool block, if any."""
        text = self.decoder.flush()
        out = [ReplyEvent("text", self.kind, text)] if text else []
        if self.kind != "text":
            out.append(ReplyEvent("close", self.kind))
            self.kind = "text"
        return out


def response_text(tokenizer, tokens: list[int]) -> str:
    """The decoded reply of a generated row, without the token that ended it (what rewards score)."""
    ends = {tokenizer.special_id("<|assistant_end|>"), tokenizer.bos_id}
    if tokens and tokens[-1] in ends:
        tokens = tokens[:-1]
    return tokenizer.decode(tokens)
