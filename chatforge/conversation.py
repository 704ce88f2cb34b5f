"""Conversations: the chat schema, its validation, and rendering to token ids plus a loss mask.

Where it sits: midtraining, SFT and RL turn each conversation into `(ids, mask)` with
`render_conversation`; the engine, chat CLI and server build prompts with `render_for_completion`.

A conversation is `{"messages": [...]}`; each message is `{"role": "system"|"user"|"assistant",
"content": ...}`. User and system content is a string. Assistant content is a string or a list of
parts `{"type": "text"|"python"|"python_output", "text": str}`: text the assistant says, a python
tool call it makes, and the tool's output that the engine pastes back in.

Layout and mask (1 = the model is trained to produce this token):

    <|bos|>                                                    0
    <|user_start|> user text <|user_end|>                      0
    <|assistant_start|>                                        0  (the engine writes it, not the model)
        text                                                   1
        <|python_start|> code <|python_end|>                   1  (the model decides to call the tool)
        <|output_start|> tool output <|output_end|>            0  (the sandbox produces it)
    <|assistant_end|>                                          1  (the model must learn to stop)

A system message (only allowed first) is folded into the first user message, separated by a blank
line: the vocabulary has no system tokens, and a small model follows one prompt block more easily.
"""

from __future__ import annotations

from chatforge.errors import DataError
from chatforge.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")
PART_TYPES = ("text", "python", "python_output")


def _fail(index: int | None, field: str, problem: str) -> DataError:
    where = "conversation" if index is None else f"conversation message {index}"
    return DataError(f"{where}: field '{field}' {problem}")


def validate_conversation(conversation) -> list[dict]:
    """The messages of a well-formed conversation, or DataError naming the message index and field.

    Rules: at least one message; `system` only as message 0; then user and assistant alternate,
    starting with user; user/system content is a string; assistant content is a string or parts.
    """
    if not isinstance(conversation, dict) or "messages" not in conversation:
        raise _fail(None, "messages", "is missing: a conversation is {\"messages\": [...]}")
    messages = conversation["messages"]
    if not isinstance(messages, list) or not messages:
        raise _fail(None, "messages", "must be a non-empty list of {role, content} objects")
    expected = "user"
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _fail(i, "role", f"cannot be read: the message is a {type(message).__name__}, not an object")
        role = message.get("role")
        if role not in ROLES:
            raise _fail(i, "role", f"is {role!r}; it must be one of {', '.join(ROLES)}")
        if role == "system":
            if i != 0:
                raise _fail(i, "role", "is 'system', which is only allowed as the first message")
            if len(messages) < 2 or not isinstance(messages[1], dict) or messages[1].get("role") != "user":
                raise _fail(i, "role", "is 'system', which must be followed by a user message")
        elif role != expected:
            raise _fail(i, "role", f"is {role!r} but {expected!r} was expected (user and assistant alternate, "
                                   "starting with user)")
        else:
            expected = "assistant" if role == "user" else "user"
        if "content" not in message:
            raise _fail(i, "content", "is missing")
        content = message["content"]
        if role == "assistant" and isinstance(content, list):
            _validate_parts(i, content)
        elif not isinstance(content, str):
            allowed = "a string or a list of parts" if role == "assistant" else "a string"
            raise _fail(i, "content", f"is a {type(content).__name__}; it must be {allowed}")
    return messages


def _validate_parts(index: int, parts: list) -> None:
    for j, part in enumerate(parts):
        if not isinstance(part, dict):
            raise _fail(index, f"content[{j}]", f"is a {type(part).__name__}; a part is {{type, text}}")
        if part.get("type") not in PART_TYPES:
            raise _fail(index, f"content[{j}].type", f"is {part.get('type')!r}; it must be one of "
                                                     f"{', '.join(PART_TYPES)}")
        if not isinstance(part.get("text"), str):
            raise _fail(index, f"content[{j}].text", "must be a string")


def _turns(messages: list[dict]) -> list[dict]:
    """Messages with a leading system message folded into the first user message."""
    if messages[0]["role"] != "system":
        return messages
    system, first_user = messages[0], messages[1]
    merged = dict(first_user, content=system["content"] + "\n\n" + first_user["content"])
    return [merged] + messages[2:]


class _Builder:
    """Accumulates ids and the aligned mask."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.mask: list[int] = []

    def special(self, name: str, train: int) -> None:
        self.ids.append(self.tokenizer.special_id(name))
        self.mask.append(train)

    def text(self, text: str, train: int) -> None:
        ids = self.tokenizer.encode(text)
        self.ids.extend(ids)
        self.mask.extend([train] * len(ids))

    def user(self, content: str) -> None:
        self.special("<|user_start|>", 0)
        self.text(content, 0)
        self.special("<|user_end|>", 0)

    def assistant(self, content) -> None:
        self.special("<|assistant_start|>", 0)
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        for part in parts:
            if part["type"] == "text":
                self.text(part["text"], 1)
            elif part["type"] == "python":
                self.special("<|python_start|>", 1)
                self.text(part["text"], 1)
                self.special("<|python_end|>", 1)
            else:  # python_output: written by the sandbox, not the model
                self.special("<|output_start|>", 0)
                self.text(part["text"], 0)
                self.special("<|output_end|>", 0)
        self.special("<|assistant_end|>", 1)

    def turns(self, turns: list[dict]) -> None:
        for message in turns:
            if message["role"] == "user":
                self.user(message["content"])
            else:
                self.assistant(message["content"])


def render_conversation(tokenizer: Tokenizer, conversation, max_tokens: int | None = None
                        ) -> tuple[list[int], list[int]]:
    """Token ids and the loss mask (1 = train on this token) of a whole conversation.

    With `max_tokens`, both lists are cut to that length together, so they stay aligned.
    """
    messages = validate_conversation(conversation)
    builder = _Builder(tokenizer)
    builder.special("<|bos|>", 0)
    builder.turns(_turns(messages))
    if max_tokens is not None:
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
        return builder.ids[:max_tokens], builder.mask[:max_tokens]
    return builder.ids, builder.mask


def render_for_completion(tokenizer: Tokenizer, conversation) -> list[int]:
    """The prompt ids for the assistant's next reply, ending with `<|assistant_start|>`.

    A conversation that ends with a user message is the prompt as it is. One that ends with an
    assistant message (an evaluation example carrying its reference answer) has that last reply
    left out, so the model is asked to produce it.
    """
    messages = validate_conversation(conversation)
    turns = _turns(messages)
    if turns[-1]["role"] == "assistant":
        turns = turns[:-1]
    builder = _Builder(tokenizer)
    builder.special("<|bos|>", 0)
    builder.turns(turns)
    builder.special("<|assistant_start|>", 0)
    return builder.ids
