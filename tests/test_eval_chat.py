"""Chat evaluation: letter picking from logits, oracle/random models on the real MCQ sets, generation."""

import pytest
import torch

from chatforge.eval import chat
from chatforge.runtime import init_runtime
from chatforge.tasks.arc import ARC
from chatforge.tasks.mmlu import MMLU
from chatforge.tasks.spelling import SpellingBee
from chatforge.tokenizer import Tokenizer


def byte_tokenizer() -> Tokenizer:
    return Tokenizer({bytes([i]): i for i in range(256)})


class LetterModel(torch.nn.Module):
    """Reads each (right-padded) prompt and puts the highest logit on the letter it was built to pick."""

    def __init__(self, tokenizer, task, choose):
        super().__init__()
        self.tokenizer = tokenizer
        self.vocab = tokenizer.vocab_size
        self.choice = {}
        from chatforge.conversation import render_for_completion

        for i in range(len(task)):
            conv = task[i]
            self.choice[tuple(render_for_completion(tokenizer, conv))] = choose(conv)

    def forward(self, idx):
        B, T = idx.shape
        logits = torch.zeros(B, T, self.vocab)
        logits[:, :, ord("Z")] = 100.0  # a non-letter favourite: must be ignored
        for b in range(B):
            ids = idx[b].tolist()
            while ids and ids[-1] == self.tokenizer.bos_id and len(ids) > 1:
                ids.pop()
            logits[b, :, ord(self.choice[tuple(ids)])] = 50.0
        return logits


def test_pick_letters_takes_the_highest_allowed_letter():
    logits = torch.full((2, 300), -5.0)
    logits[0, ord("C")] = 3.0
    logits[0, ord("x")] = 9.0  # not a choice
    logits[1, ord("A")] = 1.0
    logits[1, ord("E")] = 2.0  # only 4 choices on this row
    picks = chat.pick_letters(logits, [[65, 66, 67, 68], [65, 66, 67, 68]], [list("ABCD"), list("ABCD")])
    assert picks == ["C", "A"]


def test_letter_tokens_must_be_single_tokens():
    assert chat.letter_token_ids(byte_tokenizer(), ["A", "B"]) == [65, 66]


def test_chatcore_and_centering():
    assert chat.centered(0.25, 0.25) == 0 and chat.centered(1.0, 0.25) == 1
    assert chat.chatcore({"a": {"centered": 1.0}, "b": {"centered": 0.0}}) == 0.5


@pytest.mark.slow
def test_oracle_scores_one_and_random_about_zero_on_real_sets(shared_data):
    tok = byte_tokenizer()
    rt = init_runtime("cpu", "fp32", announce=False)
    for task in (ARC("ARC-Easy", "test", shared_data), ARC("ARC-Challenge", "test", shared_data),
                 MMLU("test", shared_data)):
        oracle = LetterModel(tok, task, lambda c: c["answer"])
        result = chat.evaluate_task(oracle, tok, task, rt, batch_size=32)
        assert result["num_problems"] == len(task)
        assert result["accuracy"] == 1.0 and result["centered"] == 1.0
    rng = torch.Generator().manual_seed(0)
    task = MMLU("test", shared_data)
    guesser = LetterModel(tok, task, lambda c: c["letters"][int(torch.randint(len(c["letters"]), (1,), generator=rng))])
    result = chat.evaluate_task(guesser, tok, task, rt, batch_size=32)
    assert abs(result["centered"]) < 0.05  # 14,042 guesses: the std of the centered score is ~0.005


def test_generative_run_with_the_real_engine_on_a_tiny_gpt():
    from chatforge.infer.engine import Engine
    from chatforge.model.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    tok = byte_tokenizer()
    model = GPT(GPTConfig(sequence_len=128, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_kv_head=2, n_embd=32))
    model.init_weights()
    model.eval()
    rt = init_runtime("cpu", "fp32", announce=False)
    task = SpellingBee(size=6, split="test")
    result = chat.evaluate_task(model, tok, task, rt, Engine(model, tok, "cpu"), max_problems=4,
                                num_samples=2, max_new_tokens=8, batch_size=3, max_seq_len=128)
    assert result["num_problems"] == 4 and 0.0 <= result["accuracy"] <= 1.0
    assert result["eval_type"] == "generative" and result["baseline"] == 0.0
