"""`chatforge export` and `chatforge import`: checkpoints to and from Hugging Face transformers' NanoChat layout.

Where it sits: after any training stage. `export` turns a checkpoint into a folder that
`AutoModelForCausalLM.from_pretrained(DIR)` and `AutoTokenizer.from_pretrained(DIR)` load (and so
lm-evaluation-harness and the Hugging Face hub); `import` turns such a folder (ours, or a NanoChat
model published by others) into a checkpoint that chat, sft, rl, eval and serve read.

    chatforge export --source sft --out ./my-model               # latest sft tag and step
    chatforge export --source base --tag d20 --step 5000 --out ./d20-base
    chatforge import --from ./my-model --tag imported            # into checkpoints/sft/imported/
    chatforge import --from ./nanochat-d32 --tag d32 --stage base

The folder: config.json, model.safetensors (fp32, as trained), generation_config.json,
tokenizer.json, tokenizer_config.json, special_tokens_map.json (export_tokenizer.py) and
chatforge.json (the checkpoint's own config, stage and step, so import gives back the same checkpoint).

How our GPT maps onto transformers' NanoChatForCausalLM (models/nanochat in transformers), and why
each piece is exact:
- embedding, untied head, RMSNorm without gain on the embedding, before attention and MLP and at
  the end, QK-norm, ReLU² MLP of 4x width, GQA, no biases, 1/sqrt(head_dim) attention scale and the
  tanh soft-cap on logits are all the same operations there; names are renamed one to one.
- rotary: both rotate pairs (i, i + D/2) at base^(-2i/D), but NanoChat turns them the other way
  (its rotate_half is (x2, -x1), ours (-x2, x1)). Negating the second half of every query and key
  head's output rows turns our rotation into theirs with the second half of q and k negated; the
  attention dot product and the QK RMS-norm cannot see that sign. Negation is exact, so export then
  import gives back the same bits.
- NanoChat applies QK-norm after rotary, we before: a rotation keeps the RMS, so the order is free.
- rms_norm_eps is float32's machine epsilon, which is what `F.rms_norm` uses on fp32 inputs.
- a fused model (`fuse_for_inference`) has c_qkv in place of c_q, c_k, c_v: it is split back.
- sliding-window layers (`S` in --window-pattern) are what the built-in class cannot express: it
  gives every layer the full causal mask. Such a model is exported with `hf_modeling.py` as
  modeling_chatforge.py and config.json's auto_map, and loads with trust_remote_code=True (the
  export says so when it writes it). A model whose layers are all `L` uses the built-in class.
tests/test_export.py is the proof: fp32 logits within 1e-4 with and without a KV cache, greedy
generate equal to our engine's, the chat template equal to our renderer, import bit-identical.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from chatforge import paths
from chatforge.errors import CheckpointError, DataError, UsageError
from chatforge.export_tokenizer import (hf_tokenizer_config, hf_tokenizer_json, special_tokens_map,
                                        tokenizer_from_hf)
from chatforge.model.checkpoint import STAGES
from chatforge.model.gpt import ROTARY_BASE, GPT, GPTConfig, layer_windows, short_window
from chatforge.runtime import print0
from chatforge.tokenizer import Tokenizer

RMS_EPS = torch.finfo(torch.float32).eps
REMOTE_MODULE = "modeling_chatforge"
WEIGHTS_FILE = "model.safetensors"
CHATFORGE_FILE = "chatforge.json"
MODEL_TYPES = ("nanochat", "chatforge")  # the built-in class, and ours with sliding windows


# ---------------------------------------------------------------------------------------------
# the mapping, both ways

def _layer_names(i: int) -> dict[str, str]:
    """chatforge parameter name -> transformers name, for block i."""
    ours, theirs = f"transformer.h.{i}.", f"model.layers.{i}."
    return {ours + "attn.c_q.weight": theirs + "self_attn.q_proj.weight",
            ours + "attn.c_k.weight": theirs + "self_attn.k_proj.weight",
            ours + "attn.c_v.weight": theirs + "self_attn.v_proj.weight",
            ours + "attn.c_proj.weight": theirs + "self_attn.o_proj.weight",
            ours + "mlp.c_fc.weight": theirs + "mlp.fc1.weight",
            ours + "mlp.c_proj.weight": theirs + "mlp.fc2.weight"}


def _names(config: GPTConfig) -> dict[str, str]:
    names = {"transformer.wte.weight": "model.embed_tokens.weight", "lm_head.weight": "lm_head.weight"}
    for i in range(config.n_layer):
        names.update(_layer_names(i))
    return names


def _flip_rotary(weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The projection with the second half of each head's output rows negated (see the docstring)."""
    heads = weight.view(-1, head_dim, weight.shape[1]).clone()  # (H, D, C)
    heads[:, head_dim // 2:] = -heads[:, head_dim // 2:]
    return heads.view_as(weight)


def _unfused(state: dict, config: GPTConfig) -> dict:
    """The state dict with any fused c_qkv split back into c_q, c_k, c_v."""
    state = {k.replace("_orig_mod.", ""): v for k, v in state.items()}
    sizes = (config.n_head * config.head_dim, config.n_kv_head * config.head_dim, config.n_kv_head * config.head_dim)
    for key in [k for k in state if k.endswith("attn.c_qkv.weight")]:
        prefix = key[: -len("c_qkv.weight")]
        for name, part in zip(("c_q", "c_k", "c_v"), state.pop(key).split(sizes, dim=0)):
            state[f"{prefix}{name}.weight"] = part
    return state


def to_hf_state(state: dict, config: GPTConfig) -> dict[str, torch.Tensor]:
    """Our state dict (a checkpoint's, or a fused model's) as NanoChatForCausalLM's, on the CPU."""
    state = _unfused(state, config)
    names = _names(config)
    missing = sorted(set(names) - set(state))
    if missing:
        raise CheckpointError(f"the checkpoint lacks {missing[0]} (and {len(missing) - 1} more); it is not a chatforge GPT")
    out = {}
    for ours, theirs in names.items():
        tensor = state[ours].detach().cpu()
        if ours.endswith(("c_q.weight", "c_k.weight")):
            tensor = _flip_rotary(tensor, config.head_dim)
        out[theirs] = tensor.contiguous()
    return out


def from_hf_state(tensors: dict[str, torch.Tensor], config: GPTConfig, where: Path) -> dict[str, torch.Tensor]:
    """NanoChatForCausalLM's state dict as ours (fp32: our parameters are the optimizer's master copy)."""
    names = _names(config)
    theirs_to_ours = {v: k for k, v in names.items()}
    tensors = dict(tensors)
    if "lm_head.weight" not in tensors and "model.embed_tokens.weight" in tensors:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]  # a tied export: we untie
    missing = sorted(set(theirs_to_ours) - set(tensors))
    extra = sorted(set(tensors) - set(theirs_to_ours))
    if missing or extra:
        first = f"lacks {missing[0]}" if missing else f"has {extra[0]}, which our GPT has no place for"
        raise DataError(f"{where} {first} ({len(missing)} missing, {len(extra)} unexpected tensors); "
                        "it is not a NanoChat model chatforge can hold")
    state = {}
    for theirs, ours in theirs_to_ours.items():
        tensor = tensors[theirs].to(torch.float32)
        if ours.endswith(("c_q.weight", "c_k.weight")):
            tensor = _flip_rotary(tensor, config.head_dim)  # its own inverse
        state[ours] = tensor.contiguous()
    return state


def hf_config(config: GPTConfig, tokenizer: Tokenizer) -> dict:
    """config.json for our GPTConfig: the built-in NanoChat class, or ours when a layer has a window."""
    windows = layer_windows(config)
    special = tokenizer.special_id
    out = {
        "architectures": ["NanoChatForCausalLM"],
        "model_type": "nanochat",
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "intermediate_size": 4 * config.n_embd,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.sequence_len,
        "hidden_act": "relu2",
        "rms_norm_eps": RMS_EPS,
        "rope_parameters": {"rope_type": "default", "rope_theta": ROTARY_BASE},
        "final_logit_softcapping": config.softcap if config.softcap > 0 else None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "tie_word_embeddings": False,
        "use_cache": True,
        "bos_token_id": special("<|bos|>"),
        "eos_token_id": special("<|assistant_end|>"),
        "pad_token_id": special("<|bos|>"),
        "dtype": "float32",
    }
    if any(w is not None for w in windows):
        out.update({
            "architectures": ["ChatforgeForCausalLM"],
            "model_type": "chatforge",
            "auto_map": {"AutoConfig": f"{REMOTE_MODULE}.ChatforgeConfig",
                         "AutoModelForCausalLM": f"{REMOTE_MODULE}.ChatforgeForCausalLM"},
            "sliding_window": short_window(config),
            "layer_types": ["full_attention" if w is None else "sliding_attention" for w in windows],
        })
    return out


def generation_config(config: GPTConfig, tokenizer: Tokenizer) -> dict:
    """Stop where our engine stops: at <|assistant_end|>, or at <|bos|> (a new document); and, as the
    engine does, never pick the rows of a vocabulary padded past the tokenizer's."""
    bos, end = tokenizer.special_id("<|bos|>"), tokenizer.special_id("<|assistant_end|>")
    out = {"bos_token_id": bos, "eos_token_id": [end, bos], "pad_token_id": bos}
    if config.vocab_size > tokenizer.vocab_size:
        out["suppress_tokens"] = list(range(tokenizer.vocab_size, config.vocab_size))
    return out


def gpt_config_from_hf(cfg: dict, where: Path) -> GPTConfig:
    """The GPTConfig a NanoChat config.json describes, or DataError naming the field we cannot hold."""
    def need(ok: bool, why: str) -> None:
        if not ok:
            raise DataError(f"{where}: {why}; chatforge's GPT cannot hold this model")

    try:
        hidden, heads, layers = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_hidden_layers"]
        kv_heads = cfg.get("num_key_value_heads") or heads
        need(cfg.get("hidden_act", "relu2") == "relu2", f"hidden_act is {cfg.get('hidden_act')!r}, not relu2")
        need(cfg.get("intermediate_size") == 4 * hidden, f"intermediate_size {cfg.get('intermediate_size')} is not 4 x hidden_size {hidden}")
        need(not cfg.get("attention_bias"), "attention_bias is set")
        need(cfg.get("head_dim") in (None, hidden // heads), f"head_dim {cfg.get('head_dim')} is not hidden_size / heads")
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        theta = rope.get("rope_theta", cfg.get("rope_theta", ROTARY_BASE))
        need(float(theta) == ROTARY_BASE, f"rope_theta is {theta}, ours is fixed at {ROTARY_BASE:g}")
        need(rope.get("rope_type", rope.get("type", "default")) == "default", f"rope type {rope.get('rope_type')!r} is not plain rotary")
        sequence_len = cfg["max_position_embeddings"]
        layer_types = cfg.get("layer_types") or ["full_attention"] * layers
        need(len(layer_types) == layers and set(layer_types) <= {"full_attention", "sliding_attention"},
             f"layer_types {layer_types} is not one of full_attention/sliding_attention per layer")
        if "sliding_attention" in layer_types:
            need(cfg.get("model_type") == "chatforge", "it has sliding layers but is not a chatforge export")
            need(cfg.get("sliding_window") == max(1, sequence_len // 4),
                 f"sliding_window {cfg.get('sliding_window')} is not max_position_embeddings // 4")
            need(layer_types[-1] == "full_attention", "its last layer is a sliding layer")
        softcap = cfg.get("final_logit_softcapping")
        return GPTConfig(sequence_len=sequence_len, vocab_size=cfg["vocab_size"], n_layer=layers, n_head=heads,
                         n_kv_head=kv_heads, n_embd=hidden, softcap=float(softcap) if softcap else 0.0,
                         window_pattern="".join("S" if t == "sliding_attention" else "L" for t in layer_types))
    except (KeyError, TypeError, AttributeError) as exc:
        raise DataError(f"{where}: a field is missing or malformed ({exc}); it is not a NanoChat config.json") from None


# ---------------------------------------------------------------------------------------------
# export

def _fresh_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"--out {out} already exists and is not empty; pick a new folder or remove it")


def write_export(out: Path, state: dict, config: GPTConfig, tokenizer: Tokenizer, chatforge_meta: dict) -> bool:
    """Write the export folder atomically (built beside it, then renamed). Returns whether it needs remote code."""
    from safetensors.torch import save_file

    if config.vocab_size < tokenizer.vocab_size:
        raise CheckpointError(f"the model has {config.vocab_size} token rows but the tokenizer {tokenizer.vocab_size}; "
                              "restore the matching tokenizer")
    out = out.expanduser().absolute()
    _fresh_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cfg = hf_config(config, tokenizer)
    remote = cfg["model_type"] == "chatforge"
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".tmp-{out.name}-"))
    try:
        save_file(to_hf_state(state, config), str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})

        def write_json(name: str, obj: dict) -> None:
            (tmp / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

        write_json("config.json", cfg)
        write_json("generation_config.json", generation_config(config, tokenizer))
        write_json("tokenizer.json", hf_tokenizer_json(tokenizer))
        write_json("tokenizer_config.json", hf_tokenizer_config(config.sequence_len))
        write_json("special_tokens_map.json", special_tokens_map())
        write_json(CHATFORGE_FILE, chatforge_meta)
        if remote:
            shutil.copyfile(Path(__file__).with_name("hf_modeling.py"), tmp / f"{REMOTE_MODULE}.py")
        if out.exists():
            out.rmdir()  # empty (checked above): rename needs the name free
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return remote


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", choices=STAGES, default="sft", help="which stage's checkpoint (default: sft)")
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: the most recently written)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="the folder to write; must not exist or be empty")


def export_main(args: argparse.Namespace) -> Path:
    from chatforge.model import checkpoint

    _fresh_out(args.out)  # before the (slow) checkpoint read
    loaded = checkpoint.load(args.source, args.tag, args.step, device="cpu")  # checks the tokenizer too
    meta, config, tokenizer = loaded.meta, loaded.model.config, loaded.tokenizer
    chatforge_meta = {"format": "chatforge-export", "version": 1, "stage": meta.get("stage", args.source),
                      "tag": meta.get("tag"), "step": meta.get("step", 0), "model_config": config.to_dict(),
                      "vocab_size": tokenizer.vocab_size}
    remote = write_export(args.out, loaded.model.state_dict(), config, tokenizer, chatforge_meta)
    print0(f"exported {loaded.path} to {args.out}")
    if remote:
        print0(f"note: window pattern {config.window_pattern!r} has sliding-window layers, which transformers' NanoChat "
               f"class cannot express; the folder ships {REMOTE_MODULE}.py (auto_map): load it with trust_remote_code=True")
    else:
        print0("loads with transformers' built-in NanoChatForCausalLM: AutoModelForCausalLM.from_pretrained(DIR)")
    return args.out


# ---------------------------------------------------------------------------------------------
# import

def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    single, index = folder / WEIGHTS_FILE, folder / "model.safetensors.index.json"
    try:
        if single.is_file():
            return load_file(str(single))
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            tensors = {}
            for shard in shards:
                tensors.update(load_file(str(folder / shard)))
            return tensors
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"the weights in {folder} are unreadable ({exc}); export the model again") from None
    raise DataError(f"{folder} has no {WEIGHTS_FILE} (or sharded index); import reads safetensors weights")


def read_export(folder: Path) -> tuple[GPTConfig, dict, Tokenizer, dict]:
    """(config, our state dict, tokenizer, chatforge.json or {}) from a transformers NanoChat folder."""
    folder = folder.expanduser()
    if not folder.is_dir():
        raise UsageError(f"--from {folder} is not a folder; give the folder `chatforge export` wrote")
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cfg = None
    if not isinstance(cfg, dict) or cfg.get("model_type") not in MODEL_TYPES:
        raise UsageError(f"--from {folder} is not a NanoChat export (no config.json with model_type "
                         f"{' or '.join(MODEL_TYPES)}); give the folder `chatforge export` wrote")
    config = gpt_config_from_hf(cfg, folder / "config.json")
    extra = {}
    if (folder / CHATFORGE_FILE).is_file():
        try:
            extra = json.loads((folder / CHATFORGE_FILE).read_text(encoding="utf-8"))
            ours = GPTConfig(**extra["model_config"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{folder / CHATFORGE_FILE} is damaged ({exc}); delete it to import from config.json alone") from None
        # our own config says the same thing more compactly (e.g. pattern "SL", not "SLSL...")
        if layer_windows(ours) != layer_windows(config) or {**ours.to_dict(), "window_pattern": ""} != \
                {**config.to_dict(), "window_pattern": ""}:
            raise DataError(f"{folder / CHATFORGE_FILE} disagrees with config.json; delete one of them")
        config = ours
    state = from_hf_state(_read_weights(folder), config, folder)
    tokenizer = tokenizer_from_hf(folder)
    if tokenizer.vocab_size > config.vocab_size:
        raise DataError(f"{folder}: the tokenizer has {tokenizer.vocab_size} tokens, the model only {config.vocab_size} rows")
    return config, state, tokenizer, extra


def _keep_tokenizer(tokenizer: Tokenizer, tag: str) -> str | None:
    """The name under which the base directory keeps `tokenizer`: a tokenizer already there with the
    same merges (the current one first), else a new one, import-<tag>, which becomes the current one
    only when there was none. None: the unnamed tokenizer of the old layout."""
    from chatforge.model.checkpoint import free_tokenizer_name
    from chatforge.tokenizer import (TOKENIZER_FILE, current_tokenizer_name, load_tokenizer,
                                     set_current_tokenizer, tokenizer_name, tokenizer_names)

    current = current_tokenizer_name()
    for name in dict.fromkeys([current, None, *tokenizer_names()]):
        directory = paths.tokenizer_dir(name, create=False)
        if (directory / TOKENIZER_FILE).is_file():
            there = load_tokenizer(directory)
            if there.mergeable_ranks == tokenizer.mergeable_ranks and there.pattern == tokenizer.pattern:
                return name
    name = free_tokenizer_name(tokenizer_name(f"import-{tag}"))
    tokenizer.save(paths.tokenizer_dir(name))
    if current is None and not (paths.tokenizer_dir(create=False) / TOKENIZER_FILE).is_file():
        set_current_tokenizer(name)
    print0(f"the model's tokenizer is saved as {paths.tokenizer_dir(name)}")
    return name


def add_import_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from", dest="source_dir", required=True, type=Path, metavar="DIR",
                        help="a transformers NanoChat folder (written by `chatforge export`, or published so)")
    parser.add_argument("--tag", required=True, help="the checkpoint tag to create")
    parser.add_argument("--stage", choices=STAGES, default=None,
                        help="which stage the checkpoint joins (default: the exported one, else sft)")


def import_main(args: argparse.Namespace) -> Path:
    from chatforge.model.checkpoint import list_steps, load_model_state, save_checkpoint

    config, state, tokenizer, extra = read_export(args.source_dir)
    stage = args.stage or extra.get("stage") or "sft"
    tag = paths.safe_name(args.tag)
    if list_steps(stage, tag):
        raise UsageError(f"checkpoints/{stage}/{tag} already exists; pick another --tag")
    kept_as = _keep_tokenizer(tokenizer, tag)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()  # the rotary buffers, which are not in the state dict
    load_model_state(model, state, args.source_dir)
    step = int(extra.get("step", 0))
    folder = save_checkpoint(stage, tag, step, model, None, model_config=config.to_dict(),
                             vocab_size=tokenizer.vocab_size, tokenizer_name=kept_as, extra={"imported_from": str(args.source_dir)})
    print0(f"imported {args.source_dir} as {folder}; use it with --source {stage} --tag {tag}")
    return folder
