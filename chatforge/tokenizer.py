"""The BPE tokenizer: trained with rustbpe, encoded with tiktoken, nine chat specials on top.

Where it sits: `chatforge tokenizer train` builds one from the pretraining corpus and saves it under
`<base>/tokenizer/<name>/`, kept by name so that retraining never replaces the one an older checkpoint
needs; `<base>/tokenizer/current.txt` names the one a new run uses (`load_tokenizer()`), and each
checkpoint records the name it was trained with. The layout before names (one tokenizer straight in
`<base>/tokenizer/`) still loads: it is the tokenizer of checkpoints that record none.

Choices:
- Byte-level BPE over chunks cut by GPT-4's split regex, except that runs of digits are cut into
  groups of at most 2 (GPT-4 uses 3): a small vocabulary then spends fewer entries on numbers.
- Training is rustbpe (Rust, parallel counting); encoding is tiktoken built from the learned merges,
  which is the fast path used at every training step. Both apply the same merges in rank order, so
  they agree token for token.
- The special tokens take the ids just above the learned merges, so `vocab_size` = 256 + merges + 9.
  Plain text is always encoded with the special tokens disabled: a document that contains the
  literal string "<|bos|>" gets ordinary tokens for it, never the BOS id.
- Text that cannot be written as UTF-8 (a str holding lone surrogates, e.g. from a file decoded with
  errors="surrogateescape") is not an error: each lone surrogate becomes U+FFFD, as tiktoken does.
- The saved file is JSON (token bytes in base64, in rank order), not a pickle, so loading a file
  cannot run code, and a truncated file is detected rather than half-read.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Iterable, Iterator

from chatforge import paths
from chatforge.errors import DataError, UsageError
from chatforge.runtime import print0

SPECIAL_TOKENS = [
    "<|bos|>",  # starts every document; documents are packed BOS-aligned
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",  # the assistant calls the python tool ...
    "<|python_end|>",
    "<|output_start|>",  # ... and the tool's output comes back here
    "<|output_end|>",
]

# GPT-4's pre-tokenization pattern with \p{N}{1,3} changed to \p{N}{1,2}.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
    r"""|\s*[\r\n]|\s+(?!\S)|\s+"""
)

MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
MAX_VOCAB_SIZE = 2**17
TOKENIZER_FILE = "tokenizer.json"
TOKEN_BYTES_FILE = "token_bytes.pt"
CURRENT_FILE = "current.txt"  # in tokenizer/: the name of the tokenizer a new run uses
_FORMAT = "chatforge-bpe"
_FORMAT_VERSION = 1


class EmptyCorpusError(DataError):
    """Training was given no text at all."""


def utf8_safe(text: str) -> str:
    """`text` with every lone surrogate replaced by U+FFFD (a surrogate pair becomes its character)."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def check_vocab_size(vocab_size: int) -> None:
    if not MIN_VOCAB_SIZE <= vocab_size <= MAX_VOCAB_SIZE:
        raise UsageError(
            f"--vocab-size {vocab_size} is out of range: it must be between {MIN_VOCAB_SIZE} "
            f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens) and {MAX_VOCAB_SIZE}"
        )


class Tokenizer:
    """Encode/decode text, with the chat special tokens at the top of the vocabulary."""

    def __init__(self, mergeable_ranks: dict[bytes, int], pattern: str = SPLIT_PATTERN):
        import tiktoken

        n = len(mergeable_ranks)
        self.pattern = pattern
        self.mergeable_ranks = mergeable_ranks
        self.special_tokens = {name: n + i for i, name in enumerate(SPECIAL_TOKENS)}
        self.vocab_size = n + len(SPECIAL_TOKENS)
        self.bos_id = self.special_tokens["<|bos|>"]
        self.name: str | None = None  # its folder under tokenizer/ (None: the unnamed one of the old layout)
        self._enc = tiktoken.Encoding(
            name="chatforge", pat_str=pattern, mergeable_ranks=mergeable_ranks,
            special_tokens=self.special_tokens, explicit_n_vocab=self.vocab_size,
        )

    # ---- training -------------------------------------------------------------------------------

    @classmethod
    def train(cls, texts_iter: Iterable[str], vocab_size: int) -> "Tokenizer":
        """Learn `vocab_size - 9` byte-level merges from the texts (streamed, never all in memory).

        A corpus too small to supply that many merges yields a smaller vocabulary (said on stdout).
        """
        import rustbpe

        check_vocab_size(vocab_size)
        seen = {"docs": 0, "chars": 0}

        def cleaned() -> Iterator[str]:
            for text in texts_iter:
                if not text:
                    continue
                seen["docs"] += 1
                seen["chars"] += len(text)
                yield utf8_safe(text)

        trainer = rustbpe.Tokenizer()
        trainer.train_from_iterator(cleaned(), vocab_size - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN)
        if seen["chars"] == 0:
            raise EmptyCorpusError("the training corpus is empty (no non-empty documents); check --data or --corpus")
        ranks = {bytes(token): rank for token, rank in trainer.get_mergeable_ranks()}
        tokenizer = cls(ranks, trainer.get_pattern())
        if tokenizer.vocab_size < vocab_size:
            print0(f"note: the corpus ({seen['docs']:,} documents, {seen['chars']:,} characters) only "
                   f"supports {tokenizer.vocab_size:,} tokens, fewer than the {vocab_size:,} asked for")
        return tokenizer

    # ---- encoding -------------------------------------------------------------------------------

    def special_id(self, name: str) -> int:
        try:
            return self.special_tokens[name]
        except KeyError:
            raise ValueError(f"unknown special token {name!r}; known: {', '.join(SPECIAL_TOKENS)}") from None

    def is_special(self, token_id: int) -> bool:
        return token_id >= len(self.mergeable_ranks)

    def _special(self, token: str | int | None) -> list[int]:
        if token is None:
            return []
        if isinstance(token, str):
            return [self.special_id(token)]
        if not 0 <= token < self.vocab_size:
            raise ValueError(f"token id {token} is outside the vocabulary (size {self.vocab_size})")
        return [int(token)]

    def encode(self, text: str, prepend: str | int | None = None, append: str | int | None = None) -> list[int]:
        """Ordinary tokens for `text` (specials never come from text), plus optional special ids."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return self._special(prepend) + self._enc.encode_ordinary(text) + self._special(append)

    def encode_batch(self, texts: list[str], prepend: str | int | None = None,
                     append: str | int | None = None, num_threads: int | None = None) -> list[list[int]]:
        """`encode` for many texts, split over threads (tiktoken releases the GIL while encoding)."""
        if isinstance(texts, str):
            raise TypeError("encode_batch expects a list of str; use encode for one text")
        threads = num_threads or min(8, os.cpu_count() or 1)
        rows = self._enc.encode_ordinary_batch(list(texts), num_threads=threads)
        head, tail = self._special(prepend), self._special(append)
        if head or tail:
            rows = [head + row + tail for row in rows]
        return rows

    def decode(self, ids: Iterable[int]) -> str:
        """Text for the ids; a token sequence cut inside a UTF-8 character decodes to U+FFFD there."""
        if hasattr(ids, "tolist"):  # a tensor or array of ids
            ids = ids.tolist()
        return self._enc.decode(list(ids))

    def id_to_bytes(self, token_id: int) -> bytes:
        return self._enc.decode_single_token_bytes(token_id)

    def token_bytes(self):
        """int32 tensor (vocab_size,): how many UTF-8 bytes each token stands for; 0 for specials.

        Bits per byte divides a sum of token losses by the sum of these, so specials count no bytes.
        """
        import torch

        lengths = [0] * self.vocab_size
        for token, rank in self.mergeable_ranks.items():
            lengths[rank] = len(token)
        return torch.tensor(lengths, dtype=torch.int32)

    # ---- files ----------------------------------------------------------------------------------

    def save(self, directory: str | Path) -> Path:
        """Write tokenizer.json and token_bytes.pt into `directory` (each atomically)."""
        import io

        import torch

        directory = Path(directory)
        ordered = sorted(self.mergeable_ranks.items(), key=lambda item: item[1])
        payload = {
            "format": _FORMAT,
            "version": _FORMAT_VERSION,
            "pattern": self.pattern,
            "special_tokens": SPECIAL_TOKENS,
            "tokens": [base64.b64encode(token).decode("ascii") for token, _ in ordered],
        }
        path = directory / TOKENIZER_FILE
        paths.atomic_write_text(path, json.dumps(payload, separators=(",", ":")))
        buffer = io.BytesIO()
        torch.save(self.token_bytes(), buffer)
        paths.atomic_write_bytes(directory / TOKEN_BYTES_FILE, buffer.getvalue())
        return path

    @classmethod
    def load(cls, directory: str | Path) -> "Tokenizer":
        path = Path(directory) / TOKENIZER_FILE
        if not path.is_file():
            raise DataError(f"no tokenizer at {path}; run `chatforge tokenizer train` first")
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
            if payload.get("format") != _FORMAT or payload.get("version") != _FORMAT_VERSION:
                raise ValueError("not a chatforge tokenizer file of a known version")
            if payload["special_tokens"] != SPECIAL_TOKENS:
                raise ValueError("its special tokens differ from this version of chatforge")
            tokens = [base64.b64decode(t, validate=True) for t in payload["tokens"]]
            if len(set(tokens)) != len(tokens) or len(tokens) < 256:
                raise ValueError("its token table is damaged")
            ranks = {token: rank for rank, token in enumerate(tokens)}
            return cls(ranks, payload["pattern"])
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as exc:
            raise DataError(
                f"tokenizer file {path} is corrupt or truncated ({exc}); "
                "run `chatforge tokenizer train` again"
            ) from None


def tokenizer_name(name: str) -> str:
    """A tokenizer name that is one path component and can never be one of the files beside the
    named folders (current.txt, and the old layout's tokenizer.json, train.json ...): no dots."""
    return paths.safe_name(name.replace(".", "-"))


def tokenizer_names() -> list[str]:
    """The named tokenizers on disk, sorted."""
    root = paths.tokenizer_dir(create=False)
    if not root.is_dir():
        return []
    return sorted(d.name for d in root.iterdir() if (d / TOKENIZER_FILE).is_file())


def current_tokenizer_name() -> str | None:
    """The tokenizer a new run uses: the one tokenizer/current.txt names (the last one trained), else
    the old layout's unnamed one (None), else the most recently written named one."""
    root = paths.tokenizer_dir(create=False)
    try:
        named = (root / CURRENT_FILE).read_text(encoding="utf-8").strip()
    except OSError:
        named = ""
    if named or (root / TOKENIZER_FILE).is_file():
        return named or None
    names = tokenizer_names()
    return max(names, key=lambda n: (root / n / TOKENIZER_FILE).stat().st_mtime) if names else None


def set_current_tokenizer(name: str) -> None:
    paths.atomic_write_text(paths.tokenizer_dir() / CURRENT_FILE, name + "\n")


def _directory(directory: str | Path | None, name: str | None) -> tuple[Path, str | None]:
    if directory is not None:
        return Path(directory), name
    if name and not (paths.tokenizer_dir(name, create=False) / TOKENIZER_FILE).is_file():  # asked for by name
        raise DataError(f"no tokenizer named {name!r} under {paths.tokenizer_dir(create=False)} (there: "
                        f"{', '.join(tokenizer_names()) or 'none'}); pick one of those for --tokenizer-name, or "
                        f"train it: chatforge tokenizer train --tokenizer-name {name}")
    name = name or current_tokenizer_name()
    return paths.tokenizer_dir(name, create=False), name


def load_tokenizer(directory: str | Path | None = None, name: str | None = None) -> Tokenizer:
    """The tokenizer in `directory`, else the one called `name`, else the current one."""
    directory, name = _directory(directory, name)
    tokenizer = Tokenizer.load(directory)
    tokenizer.name = name
    return tokenizer


def load_token_bytes(directory: str | Path | None = None, name: str | None = None):
    """The saved token_bytes tensor (int32, (vocab_size,)) of a tokenizer chosen as in load_tokenizer."""
    import torch

    directory, _ = _directory(directory, name)
    path = directory / TOKEN_BYTES_FILE
    if not path.is_file():
        raise DataError(f"no token_bytes table at {path}; run `chatforge tokenizer train` first")
    try:
        table = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a damaged file
        raise DataError(f"{path} is corrupt or truncated ({exc}); run `chatforge tokenizer train` again") from None
    if not isinstance(table, torch.Tensor) or table.dtype != torch.int32 or table.dim() != 1:
        raise DataError(f"{path} does not hold an int32 vector; run `chatforge tokenizer train` again")
    return table
