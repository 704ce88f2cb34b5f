"""A tiny trained tokenizer and a tiny random-weight GPT, shared by the engine and chat CLI tests."""

import random

import torch

from chatforge.model.gpt import GPT, GPTConfig
from chatforge.tokenizer import Tokenizer

WORDS = ("the cat sat on a mat and the dog ran to it while we said hello how are you today "
         "print math sqrt 1 2 3 42 + - * = ( ) : answer is yes no").split()


def tiny_tokenizer(vocab_size: int = 320) -> Tokenizer:
    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(120)) + ".\n" for _ in range(60)]
    return Tokenizer.train(iter(docs), vocab_size)


def tiny_model(vocab_size: int, sequence_len: int = 64, seed: int = 0) -> GPT:
    """Random weights large enough that attention matters (GPT's own init zeroes the output projections)."""
    torch.manual_seed(seed)
    config = GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=2, n_head=2, n_kv_head=1,
                       n_embd=32, window_pattern="SL")
    model = GPT(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 1.0 if "wte" in name else 0.3)
    return model.eval()


def tiny_engine(sequence_len: int, index: int = 0):
    """A tiny chat engine from its context length alone: what an engine process builds in the
    server tests (serve/engine_process.py; module level, so it pickles)."""
    from chatforge.infer.engine import Engine

    tok = tiny_tokenizer()
    return Engine(tiny_model(tok.vocab_size, sequence_len=sequence_len), tok)


def refuse_to_load(message: str, index: int = 0):
    """An engine process's recipe that fails as a missing checkpoint does."""
    from chatforge.errors import UsageError

    raise UsageError(message)


def save_tiny_checkpoint(stage: str = "sft", tag: str = "d2", sequence_len: int = 256, vocab_size=None):
    """Train and save a tokenizer into the base directory and a tiny model checkpoint of `stage`."""
    from chatforge import paths
    from chatforge.model.checkpoint import save_checkpoint

    tok = tiny_tokenizer()
    tok.save(paths.tokenizer_dir())
    model = tiny_model(tok.vocab_size, sequence_len=sequence_len)
    save_checkpoint(stage, tag, 1, model, None, model_config=model.config.to_dict(),
                    vocab_size=vocab_size or tok.vocab_size)
    return tok, model
