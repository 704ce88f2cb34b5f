"""bench export on the CPU: the plumbing runs and a random model's logits agree with transformers'."""

import argparse

from chatforge.bench import export
from chatforge.export_tokenizer import hf_tokenizer_json


def test_byte_pair_tokenizer_has_the_asked_size_and_exports():
    tok = export.byte_pair_tokenizer(600)
    assert tok.vocab_size == 600
    assert len(hf_tokenizer_json(tok)["model"]["merges"]) == 600 - 256 - 9


def test_bench_export_on_cpu(capsys):
    parser = argparse.ArgumentParser()
    export.add_arguments(parser)
    args = parser.parse_args(["--depth", "2", "--vocab-size", "512", "--max-seq-len", "128", "--prompt-len", "16",
                              "--max-new-tokens", "8", "--window-pattern", "SL", "--device", "cpu"])
    result = export.main(args)
    assert result["remote_code"] and result["float32"]["max_abs_diff"] < 1e-4
    assert result["float32"]["argmax_agreement"] == 1.0
    assert result["greedy_tokens_equal_before_first_difference"] == 8
    assert "greedy batch 1: chatforge" in capsys.readouterr().out
