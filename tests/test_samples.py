"""Greedy samples equal a plain greedy decode and leave the model's mode as it was."""

import torch

from chatforge.eval.samples import greedy_samples
from chatforge.model.gpt import GPT, GPTConfig
from chatforge.runtime import init_runtime


def test_greedy_samples_match_an_unpadded_greedy_decode():
    rt = init_runtime("cpu", "fp32", announce=False)
    from chatforge.tokenizer import Tokenizer

    tokenizer = Tokenizer.train(iter(["the cat sat on the mat. " * 20, "a dog ran in the park. " * 20]), 300)
    torch.manual_seed(3)
    model = GPT(GPTConfig(sequence_len=32, vocab_size=tokenizer.vocab_size, n_layer=1, n_head=2, n_kv_head=2,
                          n_embd=16))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    model.train()
    got = greedy_samples(model, tokenizer, rt, prompts=["the cat"], max_new_tokens=5)
    assert model.training  # mode restored
    ids = tokenizer.encode("the cat", prepend=tokenizer.bos_id)
    start = len(ids)
    with torch.no_grad():
        for _ in range(5):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert got == [{"prompt": "the cat", "completion": tokenizer.decode(ids[start:])}]


def test_chat_samples_are_a_greedy_reply_to_each_question_as_a_conversation():
    from chatforge.conversation import render_for_completion
    from chatforge.eval.samples import CHAT_SAMPLE_PROMPTS, chat_samples
    from chatforge.infer.engine import Engine
    from tiny_chat import tiny_model, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    model = tiny_model(tokenizer.vocab_size, sequence_len=64)
    got = chat_samples(Engine(model, tokenizer, "cpu"), max_new_tokens=6)
    assert [s["prompt"] for s in got] == list(CHAT_SAMPLE_PROMPTS)
    stops = {tokenizer.special_id("<|assistant_end|>"), tokenizer.bos_id}
    for sample in got:  # the reference: argmax over the whole prefix, one row at a time, until a stop token
        ids = render_for_completion(tokenizer, {"messages": [{"role": "user", "content": sample["prompt"]}]})
        reply = []
        with torch.no_grad():
            while len(reply) < 6:
                token = int(model(torch.tensor([ids + reply]))[0, -1].argmax())
                if token in stops:
                    break
                reply.append(token)
        assert tokenizer.special_id("<|python_start|>") not in reply  # no tool call: the engine alone decides
        assert sample["reply"] == tokenizer.decode(reply)


def test_chat_samples_leave_out_a_question_longer_than_the_context():
    from chatforge.eval.samples import chat_samples
    from chatforge.infer.engine import Engine
    from tiny_chat import tiny_model, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    engine = Engine(tiny_model(tokenizer.vocab_size, sequence_len=32), tokenizer, "cpu")
    got = chat_samples(engine, prompts=("Hi", "the cat sat on a mat " * 10), max_new_tokens=2)
    assert [s["prompt"] for s in got] == ["Hi"]
