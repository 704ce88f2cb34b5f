"""Identity conversations: the model learns what it is, how big it is, who made it, what it can't do.

Written by code from facts and templates (no outside model): each example draws one to three topics,
a phrasing of the user's question for each, and a phrasing of the answer, from a generator seeded by
(seed, index) — so example i is the same on every run and the set changes only with `seed`.

The facts default to chatforge's own; `facts_from_model(model_config, num_params)` fills the size
from a checkpoint (midtrain and SFT do this), and any fact can be replaced (a user's model name or
maker). For a fuller persona, write conversations in a JSONL file and pass it with `--extra`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

from chatforge.tasks.base import Task


@dataclass(frozen=True)
class IdentityFacts:
    name: str = "chatforge"
    maker: str = "someone who trained me from scratch with chatforge, an open-source project"
    parameters: str = "a few hundred million"
    layers: int | None = None
    context: int | None = None


def human_count(n: int) -> str:
    """420_000_000 -> 'about 420 million' (the precision a person would say aloud)."""
    for unit, size in (("billion", 10**9), ("million", 10**6), ("thousand", 10**3)):
        if n >= size:
            value = n / size
            return f"about {value:.1f} {unit}" if value < 10 else f"about {round(value)} {unit}"
    return str(n)


def facts_from_model(model_config: dict, num_params: int, **overrides) -> IdentityFacts:
    """Facts with the size of an actual model (its GPTConfig as a dict and its parameter count)."""
    return replace(IdentityFacts(), parameters=human_count(num_params), layers=model_config.get("n_layer"),
                   context=model_config.get("sequence_len"), **overrides)


GREETINGS = ("Hi!", "Hello.", "Hey there.", "Good morning!", "hi", "Hello, nice to meet you.")
GREETING_REPLIES = (
    "Hello! I'm {name}. How can I help you today?",
    "Hi! I'm {name}, a small language model. What would you like to talk about?",
    "Hey! {name} here. Ask me anything and I'll do my best.",
)

QUESTIONS = {
    "who": ("Who are you?", "What are you?", "What is your name?", "What should I call you?",
            "Introduce yourself.", "are you chatgpt?", "Which model am I talking to?"),
    "maker": ("Who made you?", "Who created you?", "Who trained you?", "Which company built you?",
              "Where do you come from?"),
    "size": ("How big are you?", "How many parameters do you have?", "How large is your model?",
             "Are you a large model?"),
    "limits": ("What can't you do?", "What are your limitations?", "Can you browse the internet?",
               "Do you remember our previous chats?", "Should I trust everything you say?"),
    "tools": ("Can you do math?", "How do you compute arithmetic?", "Can you run code?"),
}

ANSWERS = {
    "who": (
        "I'm {name}, a small language model trained to chat. I'm not ChatGPT or any other company's "
        "assistant; I was trained with chatforge.",
        "My name is {name}. I'm a chat assistant built with chatforge: a Transformer trained from raw text, "
        "then fine-tuned on conversations.",
        "You're talking to {name}, a small open-source chat model made with chatforge.",
    ),
    "maker": (
        "I was made by {maker}. chatforge takes a model from raw text to a chat assistant: tokenizer, "
        "pretraining, fine-tuning and evaluation.",
        "{maker_cap} trained me. No big company was involved: chatforge is meant to let one person build "
        "their own small ChatGPT-like model.",
    ),
    "size": (
        "I have {parameters} parameters{shape}. That is small next to the big commercial models, which "
        "have hundreds of billions.",
        "I'm a small model: {parameters} parameters{shape}. Small enough to train on a single GPU node in hours.",
    ),
    "limits": (
        "I can't browse the internet, I don't remember earlier conversations, and I only know what was in "
        "my training text. I'm a small model, so I often make mistakes: please check anything important.",
        "Plenty. I have no internet access and no memory between chats, my knowledge stops at my training "
        "data, and being small I get facts and reasoning wrong more often than larger models.",
    ),
    "tools": (
        "I can use a Python tool for arithmetic: I write a short expression, it runs in a sandbox, and I read "
        "the result. Without it my mental math is unreliable.",
        "A little. For exact calculations I call a Python tool and use its output; for long programs I'm "
        "not reliable.",
    ),
}


class Identity(Task):
    """`size` synthetic conversations about the model itself."""

    name = "Identity"

    def __init__(self, size: int = 1000, facts: IdentityFacts | None = None, seed: int = 0, **slice_args):
        super().__init__(**slice_args)
        self.size, self.facts, self.seed = size, facts or IdentityFacts(), seed

    def num_examples(self) -> int:
        return self.size

    def _fields(self) -> dict:
        f = self.facts
        bits = [f"{f.layers} layers" if f.layers else "", f"a context of {f.context} tokens" if f.context else ""]
        shape = ", ".join(b for b in bits if b)
        return {"name": f.name, "maker": f.maker, "maker_cap": f.maker[:1].upper() + f.maker[1:],
                "parameters": f.parameters, "shape": f" ({shape})" if shape else ""}

    def get_example(self, index: int) -> dict:
        rng = random.Random(f"identity-{self.seed}-{index}")
        fields = self._fields()
        messages = []
        if rng.random() < 0.3:
            messages += [{"role": "user", "content": rng.choice(GREETINGS)},
                         {"role": "assistant", "content": rng.choice(GREETING_REPLIES).format(**fields)}]
        for topic in rng.sample(sorted(QUESTIONS), rng.randint(1, 3)):
            question = rng.choice(QUESTIONS[topic])
            if rng.random() < 0.2:
                question = question.lower()
            messages += [{"role": "user", "content": question},
                         {"role": "assistant", "content": rng.choice(ANSWERS[topic]).format(**fields)}]
        return {"messages": messages}
