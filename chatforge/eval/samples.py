"""Greedy samples: a glance at what a model says, during pretraining and in `chatforge eval base`
(completions of text) and in `chatforge eval chat` (replies to a few fixed questions)."""

from __future__ import annotations

import torch

from chatforge.conversation import render_for_completion

SAMPLE_PROMPTS = (
    "The capital of France is",
    "The chemical symbol of gold is",
    "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is",
    "The planets of the solar system are:",
    "My favorite color is",
    "If 5*x + 3 = 13, then x is",
)

# a fact, a little writing, arithmetic (a tool call, for a model that learned them) and its identity
CHAT_SAMPLE_PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "What is 12 times 7?",
    "Who are you?",
)
CHAT_SAMPLE_TOKENS = 64  # a glance at each reply, not all of it: the four cost one short generate call


@torch.no_grad()
def greedy_samples(model, tokenizer, runtime, prompts=SAMPLE_PROMPTS, max_new_tokens: int = 16) -> list[dict]:
    """Greedy continuations, re-running the whole prefix per token (a few short prompts: no KV cache).

    `model.forward` is called directly, so a model compiled in place runs eagerly here instead of
    recompiling for every length; rows are padded on the right to a multiple of 16 (FP8 matmuls
    need it), which a causal model's earlier positions never see.
    """
    was_training = model.training
    model.eval()
    limit = model.config.sequence_len
    out = []
    for prompt in prompts:
        ids = tokenizer.encode(prompt, prepend=tokenizer.bos_id)
        start = len(ids)
        for _ in range(max_new_tokens):
            context = ids[-limit:]
            padded = context + [tokenizer.bos_id] * (-len(context) % 16)
            with runtime.autocast():
                logits = model.forward(torch.tensor([padded], dtype=torch.long, device=runtime.device))
            ids.append(int(logits[0, len(context) - 1].argmax()))
        out.append({"prompt": prompt, "completion": tokenizer.decode(ids[start:])})
    model.train(was_training)
    return out


def chat_samples(engine, prompts=CHAT_SAMPLE_PROMPTS, max_new_tokens: int = CHAT_SAMPLE_TOKENS) -> list[dict]:
    """A chat model's greedy replies to one-turn conversations, in one batched engine call (tool calls
    run as in `chatforge chat`). A question whose prompt does not fit the model's context is left out."""
    from chatforge.infer.reply import response_text  # the engine's module: not an import of pretraining's

    tokenizer = engine.tokenizer
    rendered = [(prompt, render_for_completion(tokenizer, {"messages": [{"role": "user", "content": prompt}]}))
                for prompt in prompts]
    rendered = [(prompt, ids) for prompt, ids in rendered if len(ids) < engine.config.sequence_len]
    if not rendered:
        return []
    results = engine.generate_batch([ids for _, ids in rendered], max_tokens=max_new_tokens, temperature=0.0,
                                    seed=0)
    return [{"prompt": prompt, "reply": response_text(tokenizer, result.tokens)}
            for (prompt, _), result in zip(rendered, results)]
