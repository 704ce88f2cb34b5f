"""Our tokenizer and chat format in Hugging Face's files: tokenizer.json, tokenizer_config.json, a chat template.

Where it sits: `export.py` writes these next to the weights and reads them back on import. The
files are plain JSON built here, so exporting needs neither `tokenizers` nor `transformers`.

How the encoding stays exact:
- tokenizer.json is a byte-level BPE whose pre-tokenizer is our split regex (Oniguruma, which runs
  `tokenizers`, accepts its possessive quantifiers as tiktoken does), then the GPT-2 byte-to-unicode
  map. Token ids are our ranks.
- tiktoken applies merges by the rank of the merged bytes; `tokenizers` applies a merges list in
  order. The list is rebuilt from the ranks: each token's merge is the pair that BPE over its bytes,
  restricted to lower ranks, ends with. `ignore_merges` matches tiktoken's shortcut of taking a
  whole pre-token that is itself in the vocabulary.
- the nine specials are added tokens at their ids. `add_special_tokens=True` (the transformers
  default for plain text) prepends `<|bos|>`, which is how every training document starts; the chat
  template writes its own `<|bos|>` and transformers tokenizes templates without adding it again.

The chat template renders what `conversation.render_conversation` renders (system folded into the
first user turn, tool calls and outputs inside assistant turns), with two limits no string template
can lift: a message whose text contains a special token's literal name (we encode it as ordinary
text; a Hugging Face tokenizer always splits it out as the special), and two adjacent assistant
`text` parts (we encode them apart; the template joins them into one string first).
"""

from __future__ import annotations

import json
from pathlib import Path

from chatforge.errors import DataError
from chatforge.tokenizer import SPECIAL_TOKENS, Tokenizer

BOS, EOS = "<|bos|>", "<|assistant_end|>"

CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] + '\\n\\n' -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set system = '' -%}{%- set turns = messages -%}{%- endif -%}"
    "<|bos|>"
    "{%- for message in turns -%}"
    "{%- if message['role'] != ['user', 'assistant'][loop.index0 % 2] -%}"
    "{{- raise_exception('user and assistant must alternate, starting with user (a system message may come first)') -}}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "<|user_start|>{{- system if loop.first else '' -}}{{- message['content'] -}}<|user_end|>"
    "{%- else -%}"
    "<|assistant_start|>"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{- part['text'] -}}"
    "{%- elif part['type'] == 'python' -%}<|python_start|>{{- part['text'] -}}<|python_end|>"
    "{%- elif part['type'] == 'python_output' -%}<|output_start|>{{- part['text'] -}}<|output_end|>"
    "{%- else -%}{{- raise_exception('an assistant part type must be text, python or python_output') -}}"
    "{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "<|assistant_end|>"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant_start|>{%- endif -%}"
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from each byte to a printable character (what ByteLevel expects)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


BYTE_TO_CHAR = _bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}


def _as_chars(token: bytes) -> str:
    return "".join(BYTE_TO_CHAR[b] for b in token)


def _merge_of(ranks: dict[bytes, int], token: bytes) -> tuple[bytes, bytes]:
    """The two parts BPE over `token`'s bytes ends with when only merges ranked below it may apply."""
    limit = ranks[token]
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        best = min(((ranks.get(parts[i] + parts[i + 1], limit), i) for i in range(len(parts) - 1)))
        if best[0] >= limit:
            break
        i = best[1]
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    if len(parts) != 2:
        raise ValueError(f"token {token!r} (rank {limit}) cannot be built from lower-ranked merges")
    return parts[0], parts[1]


def hf_tokenizer_json(tokenizer: Tokenizer) -> dict:
    """tokenizer.json (the `tokenizers` format) that encodes every text as `tokenizer.encode` does."""
    ranks = tokenizer.mergeable_ranks
    by_rank = sorted(ranks.items(), key=lambda item: item[1])
    merges = [[_as_chars(a), _as_chars(b)] for token, _ in by_rank if len(token) > 1
              for a, b in [_merge_of(ranks, token)]]
    added = [{"id": tokenizer.special_tokens[name], "content": name, "single_word": False, "lstrip": False,
              "rstrip": False, "normalized": False, "special": True} for name in SPECIAL_TOKENS]
    bos_id = tokenizer.bos_id
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": tokenizer.pattern}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        ]},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": BOS, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": BOS, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": BOS, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {BOS: {"id": BOS, "ids": [bos_id], "tokens": [BOS]}},
        },
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": {_as_chars(token): rank for token, rank in by_rank}, "merges": merges},
    }


def hf_tokenizer_config(sequence_len: int) -> dict:
    """tokenizer_config.json: which specials play which role, and the chat template."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        # batching pads with <|bos|>: an id the model knows, and the attention mask hides it anyway
        "pad_token": BOS,
        "add_bos_token": True,
        "clean_up_tokenization_spaces": False,  # decoding must give back the exact text
        "model_max_length": sequence_len,
        "chat_template": CHAT_TEMPLATE,
    }


def special_tokens_map() -> dict:
    return {"bos_token": BOS, "eos_token": EOS, "pad_token": BOS}


def tokenizer_from_hf(folder: Path) -> Tokenizer:
    """Our Tokenizer from a folder's tokenizer.json, when that file is a byte-level BPE with our specials.

    The vocabulary's ids become ranks, so the merges must be ordered as their results' ids are:
    tiktoken (our encoder) applies them by rank, and otherwise would encode differently.
    """
    path = folder / "tokenizer.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        model = data["model"]
    except FileNotFoundError:
        raise DataError(f"{path} is missing; a NanoChat export carries its tokenizer.json") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path} is not a readable tokenizer.json ({exc})") from None

    def refuse(why: str) -> DataError:
        return DataError(f"{path}: {why}; chatforge imports byte-level BPE tokenizers like nanochat's")

    if model.get("type") != "BPE":
        raise refuse(f"the model is {model.get('type')!r}, not BPE")
    pattern = _split_pattern(data.get("pre_tokenizer"))
    if pattern is None:
        raise refuse("its pre-tokenizer has no Split regex followed by ByteLevel")
    specials = {t["content"]: t["id"] for t in data.get("added_tokens", [])}
    vocab = {tok: i for tok, i in model["vocab"].items() if tok not in specials}
    n = len(vocab)
    if sorted(vocab.values()) != list(range(n)):
        raise refuse("its ordinary token ids are not 0..N-1")
    wanted = {name: n + i for i, name in enumerate(SPECIAL_TOKENS)}
    if any(specials.get(name) != i for name, i in wanted.items()):
        raise refuse(f"its special tokens are not {', '.join(SPECIAL_TOKENS)} at ids {n}..{n + len(SPECIAL_TOKENS) - 1}")
    try:
        ranks = {bytes(CHAR_TO_BYTE[c] for c in tok): i for tok, i in vocab.items()}
    except KeyError:
        raise refuse("a token holds a character outside the byte-level alphabet") from None
    last = -1
    for merge in model.get("merges", []):
        a, b = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank = vocab.get(a + b)
        if rank is None or rank <= last:
            raise refuse(f"its merges are not in the order of their tokens' ids (at {a!r} + {b!r})")
        last = rank
    if len(ranks) != n or sorted(r for t, r in ranks.items() if len(t) == 1) != list(range(256)):
        raise refuse("ids 0..255 are not the 256 single bytes")
    return Tokenizer(ranks, pattern)


def _split_pattern(pre_tokenizer) -> str | None:
    if not isinstance(pre_tokenizer, dict) or pre_tokenizer.get("type") != "Sequence":
        return None
    steps = pre_tokenizer.get("pretokenizers", [])
    if len(steps) != 2 or steps[0].get("type") != "Split" or steps[1].get("type") != "ByteLevel":
        return None
    if steps[0].get("behavior") != "Isolated" or steps[0].get("invert") or steps[1].get("use_regex"):
        return None
    return steps[0].get("pattern", {}).get("Regex")
