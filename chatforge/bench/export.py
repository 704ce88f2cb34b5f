"""`chatforge bench export`: an exported model in transformers next to ours — logits difference and batch-1 speed.

The model is a checkpoint (--source/--tag/--step) or, with no --source, random weights at --depth
(so a bare GPU machine needs nothing downloaded or trained). It is exported to a temporary folder
with `chatforge export`'s own writer, loaded back with `AutoModelForCausalLM`, and then:

- logits: one prompt of --prompt-len random tokens through both models, in float32 and in the compute
  dtype (bf16 on a modern GPU): max and mean |difference|, and how often the argmax agrees;
- generate at batch 1: greedy, exactly --max-new-tokens tokens (stops ignored) from the same prompt,
  timed after one warm-up call each; tok/s = new tokens over the whole call, prefill included.
  Ours is the engine as `chatforge chat` runs it (static KV cache, CUDA graph, decode kernels);
  transformers' is `model.generate` with its default cache, in eager mode with SDPA attention.

    chatforge bench export --depth 20                        # random d20, bf16 on the GPU
    chatforge bench export --source sft --tag d20            # a trained checkpoint
    chatforge bench export --depth 2 --vocab-size 512 --max-seq-len 128 --prompt-len 16 --max-new-tokens 8 \\
        --device cpu                                         # a CPU check of the plumbing

Needs transformers (the `dev` extra). Random weights get a synthetic byte-pair tokenizer of the
same vocabulary size, which the export needs to write tokenizer.json; nothing here reads text.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from chatforge.errors import UsageError
from chatforge.flags import add_flag
from chatforge.runtime import add_runtime_arguments, init_runtime, print0
from chatforge.tokenizer import SPECIAL_TOKENS, Tokenizer


def byte_pair_tokenizer(vocab_size: int) -> Tokenizer:
    """A valid BPE vocabulary of exactly `vocab_size`: the 256 bytes, then two-byte tokens, then the specials."""
    pairs = vocab_size - 256 - len(SPECIAL_TOKENS)
    if not 0 <= pairs <= 256 * 256:
        raise UsageError(f"--vocab-size {vocab_size} must be between {256 + len(SPECIAL_TOKENS)} and {256 * 257 + 9}")
    ranks = {bytes([b]): b for b in range(256)}
    for i in range(pairs):
        ranks[bytes([i % 256, i // 256])] = 256 + i
    return Tokenizer(ranks)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from chatforge.model.checkpoint import STAGES

    parser.add_argument("--source", choices=STAGES, default=None, help="a checkpoint's stage (default: random weights)")
    parser.add_argument("--tag", default=None, help="checkpoint tag (with --source)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (with --source)")
    parser.add_argument("--depth", type=int, default=20, help="random weights: model depth (the scaling dial)")
    parser.add_argument("--vocab-size", type=int, default=32768, help="random weights: vocabulary size")
    add_flag(parser, "--max-seq-len", "--seq-len", type=int, default=2048, help="random weights: context length")
    parser.add_argument("--window-pattern", default="L", help="random weights: S/L per layer, e.g. SSSL")
    parser.add_argument("--prompt-len", type=int, default=512, help="prompt tokens")
    add_flag(parser, "--max-new-tokens", "--new-tokens", type=int, default=256, help="tokens generated at batch 1")
    add_runtime_arguments(parser)


def _model_and_tokenizer(args, rt):
    """fp32 weights on the device (not fused: the same object is exported and then copied for the engine)."""
    if args.source is not None:
        from chatforge.model.checkpoint import build_model
        from chatforge.tokenizer import load_tokenizer

        model, _ = build_model(args.source, args.tag, args.step, device=rt.device)
        return model, load_tokenizer()
    from chatforge.bench.infer import random_model
    from chatforge.model.scaling import derive

    config = derive(args.depth, sequence_len=args.max_seq_len, vocab_size=args.vocab_size,
                    window_pattern=args.window_pattern).model_config()
    model = random_model(config, SimpleNamespace(device=rt.device, dtype=torch.float32))
    # GPT's init makes the head tiny (near-uniform logits), where any two models agree; a trained
    # model's logits spread over several units, so give the random head that spread
    torch.nn.init.normal_(model.lm_head.weight, std=2.0 / config.n_embd ** 0.5)
    return model, byte_pair_tokenizer(args.vocab_size)


def _compare(ours: torch.Tensor, theirs: torch.Tensor) -> dict:
    diff = (ours.float() - theirs.float()).abs()
    agree = (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item()
    return {"max_abs_diff": diff.max().item(), "mean_abs_diff": diff.mean().item(), "argmax_agreement": agree}


def _timed(fn, rt) -> tuple[float, object]:
    fn()  # warm-up: CUDA graph capture, kernel selection, allocator
    rt.synchronize()
    start = time.perf_counter()
    out = fn()
    rt.synchronize()
    return time.perf_counter() - start, out


@torch.inference_mode()
def main(args: argparse.Namespace) -> dict:
    from transformers import AutoModelForCausalLM

    from chatforge.export import write_export
    from chatforge.infer.engine import Engine

    rt = init_runtime(args.device, args.dtype, seed=0)
    model, tokenizer = _model_and_tokenizer(args, rt)
    config = model.config
    if args.prompt_len < 1 or args.max_new_tokens < 1 or args.prompt_len + args.max_new_tokens >= config.sequence_len:
        raise UsageError(f"--prompt-len {args.prompt_len} + --max-new-tokens {args.max_new_tokens} must be positive "
                         f"and fit the {config.sequence_len}-token context")
    prompt = torch.randint(0, tokenizer.vocab_size - len(SPECIAL_TOKENS), (1, args.prompt_len),
                           generator=torch.Generator().manual_seed(0)).to(rt.device)
    dtype_name = str(rt.dtype).replace("torch.", "")
    device_name = torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda" else rt.device.type
    result = {"device": device_name, "dtype": dtype_name, "n_layer": config.n_layer, "params": model.num_params(),
              "prompt_len": args.prompt_len, "new_tokens": args.max_new_tokens}
    with tempfile.TemporaryDirectory(prefix="chatforge-bench-export-") as tmp:
        folder = Path(tmp) / "export"
        remote = write_export(folder, model.state_dict(), config, tokenizer, {})
        result["remote_code"] = remote

        def load(dtype):
            return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, trust_remote_code=remote).to(rt.device).eval()

        hf = load(torch.float32)
        result["float32"] = _compare(model(prompt), hf(prompt, use_cache=False).logits)
        ours = model
        if rt.dtype != torch.float32:
            del hf
            hf = load(rt.dtype)
            ours = copy.deepcopy(model).to(rt.dtype).eval()
            del model  # the fp32 weights of a large model are not needed past this point
            result[dtype_name] = _compare(ours(prompt), hf(prompt, use_cache=False).logits)

    engine = Engine(ours.fuse_for_inference(), tokenizer, rt.device, rt.dtype)
    ids = prompt[0].tolist()
    ours_s, ours_out = _timed(lambda: engine.generate_batch([ids], max_tokens=args.max_new_tokens, temperature=0.0,
                                                           use_tools=False, ignore_stops=True)[0].tokens, rt)
    mask = torch.ones_like(prompt)
    hf_s, hf_out = _timed(lambda: hf.generate(prompt, attention_mask=mask, max_new_tokens=args.max_new_tokens,
                                              do_sample=False, eos_token_id=None)[0, args.prompt_len:].tolist(), rt)
    same = next((i for i, (a, b) in enumerate(zip(ours_out, hf_out)) if a != b), min(len(ours_out), len(hf_out)))
    result.update({"chatforge_tok_s": args.max_new_tokens / ours_s, "transformers_tok_s": args.max_new_tokens / hf_s,
                   "greedy_tokens_equal_before_first_difference": same})

    print0(f"bench export: {config.n_layer} layers, {result['params'] / 1e6:.1f}M params, {device_name}, {dtype_name}, "
           f"prompt {args.prompt_len}, {args.max_new_tokens} new tokens, torch {torch.__version__}, "
           f"{'remote code' if remote else 'built-in NanoChat class'}")
    for key in dict.fromkeys(("float32", dtype_name)):
        r = result[key]
        print0(f"logits {key}: max |diff| {r['max_abs_diff']:.3g}, mean |diff| {r['mean_abs_diff']:.3g}, "
               f"argmax agrees at {100 * r['argmax_agreement']:.1f}% of positions")
    print0(f"greedy batch 1: chatforge {result['chatforge_tok_s']:,.0f} tok/s, transformers "
           f"{result['transformers_tok_s']:,.0f} tok/s; the two agree on the first {same} tokens")
    return result
