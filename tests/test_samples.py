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
