"""Document streams for pretraining and tokenizer training.

Two kinds of corpus, one interface (`open_corpus(...)` -> `Corpus`):

- Downloaded shards (`chatforge data download`): `data/<corpus>/shard_00000.parquet ...` under the
  base directory. The LAST shard is the validation split, every other shard is training data.
  A `--data` folder holding only `shard_NNNNN.parquet` files is read the same way.
- Your own text (`--data PATH`): a `.txt` file, a folder of `.txt` / `.jsonl` (field `text`, `.jsonl.gz`
  too) / `.parquet` (column `text`) files, or a glob. A `.txt` file is cut into documents of about
  `TXT_DOC_CHARS` characters, always at a line end and preferably at a blank line (so a paragraph or a
  play's speech stays whole); `.jsonl` lines and parquet rows are one document each. The validation
  slice is every `VAL_EVERY`-th document (indices 19, 39, ... in reading order): deterministic, spread
  over the whole text, and the same on every machine.

Documents are numbered within their split in reading order; `iter_indexed` hands them out with that
number, round-robin across ranks (document i goes to rank i % world_size), so every document is read
by exactly one rank, and can restart from any number (what the loader's resume state stores). Parquet
is read one row group at a time (memory stays small) and row groups with nothing for this rank past
the start are skipped from the file's footer without being read. Documents of only whitespace are
skipped (they keep their number).
"""

from __future__ import annotations

import glob
import gzip
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from chatforge import paths
from chatforge.errors import DataError, UsageError

CORPORA = ("fineweb-edu", "climbmix")
SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".parquet")
SHARD_RE = re.compile(r"^shard_\d{5}\.parquet$")
VAL_EVERY = 20
TXT_DOC_CHARS = 8192


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return None


def _parquet_file(path: Path):
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a bad footer
        raise DataError(f"{path}: not a readable parquet file ({_short(exc)}); delete it and download or "
                        "write it again") from None
    if "text" not in pf.schema_arrow.names:
        raise DataError(f"{path}: parquet file has no 'text' column (columns: "
                        f"{', '.join(pf.schema_arrow.names) or 'none'}); store one document per row in 'text'")
    return pf


def _short(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__


@dataclass
class _Unit:
    """A run of documents read together: a parquet row group, or a whole txt/jsonl file."""

    path: Path
    kind: str
    row_group: int = -1
    num_docs: int | None = None  # known without reading for parquet; None for txt/jsonl


class Corpus:
    """An ordered list of files and the rule that splits their documents into train and val."""

    def __init__(self, files: list[Path], split_rule: str, description: str):
        self.files = files
        self.split_rule = split_rule  # "last-file" or "every-k"
        self.description = description

    def __repr__(self) -> str:
        return f"Corpus({self.description}, {len(self.files)} files, val: {self.split_rule})"

    # --- reading -------------------------------------------------------------------------------

    def _split_files(self, split: str) -> list[Path]:
        if split not in ("train", "val"):
            raise UsageError(f"split {split!r} is not 'train' or 'val'")
        if self.split_rule == "last-file":
            return self.files[-1:] if split == "val" else self.files[:-1]
        return self.files

    def _units(self, split: str) -> Iterator[_Unit]:
        for path in self._split_files(split):
            kind = _kind(path)
            if kind == ".parquet":
                pf = _parquet_file(path)
                if pf.metadata.num_rows == 0:
                    raise DataError(f"{path}: parquet file has no rows; delete it (or download it again)")
                for g in range(pf.metadata.num_row_groups):
                    yield _Unit(path, kind, g, pf.metadata.row_group(g).num_rows)
            else:
                yield _Unit(path, kind)

    def _in_split(self, split: str, raw: int) -> bool:
        if self.split_rule == "last-file":
            return True
        is_val = raw % VAL_EVERY == VAL_EVERY - 1
        return is_val if split == "val" else not is_val

    def _count_in_split(self, split: str, raw: int, n: int) -> int:
        """How many of the raw documents raw..raw+n-1 belong to `split` (without reading them)."""
        if self.split_rule == "last-file":
            return n
        val = (raw + n) // VAL_EVERY - raw // VAL_EVERY
        return val if split == "val" else n - val

    def iter_indexed(self, split: str = "train", rank: int = 0, world_size: int = 1,
                     start: int = 0) -> Iterator[tuple[int, str]]:
        """(index within the split, text) for this rank's documents, from index `start` on."""
        if not 0 <= rank < world_size:
            raise UsageError(f"rank {rank} is outside world size {world_size}")
        raw = 0  # position among all documents of the files of this split
        index = 0  # position among the documents of this split
        for unit in self._units(split):
            if unit.num_docs is not None:
                count = self._count_in_split(split, raw, unit.num_docs)
                # skip a row group whose documents all come before `start` or are all another rank's
                last = index + count - 1
                mine = count > 0 and (count >= world_size or any(
                    i % world_size == rank for i in range(index, last + 1)))
                if last < start or not mine:
                    raw += unit.num_docs
                    index += count
                    continue
            for text in self._read_unit(unit):
                if self._in_split(split, raw):
                    if index >= start and index % world_size == rank and text.strip():
                        yield index, text
                    index += 1
                raw += 1

    def iter_documents(self, split: str = "train", rank: int = 0, world_size: int = 1) -> Iterator[str]:
        """This rank's documents of `split`, each exactly once across the ranks."""
        for _, text in self.iter_indexed(split, rank, world_size):
            yield text

    def iter_texts(self, max_chars: int = 2_000_000_000, doc_cap: int = 10_000) -> Iterator[str]:
        """Training documents for tokenizer training: each cut to `doc_cap` characters, `max_chars` in all."""
        total = 0
        for text in self.iter_documents("train"):
            text = text[:doc_cap]
            if total + len(text) > max_chars:
                text = text[: max_chars - total]
            if text:
                yield text
            total += len(text)
            if total >= max_chars:
                return

    def approx_bytes(self, split: str = "train") -> int:
        """About how many bytes of text `split` holds, from file sizes and parquet footers (no reading).

        Uncompressed sizes: a gzip file's trailer, a parquet row group's total_byte_size (all its
        columns, so a little high). Good enough to size a batch, not to count an epoch exactly.
        """
        total = 0
        for path in self._split_files(split):
            kind = _kind(path)
            if kind == ".parquet":
                meta = _parquet_file(path).metadata
                total += sum(meta.row_group(g).total_byte_size for g in range(meta.num_row_groups))
            elif path.name.lower().endswith(".gz"):
                with open(path, "rb") as f:  # ISIZE: the uncompressed length mod 2^32, in the last 4 bytes
                    f.seek(-4, 2)
                    total += int.from_bytes(f.read(4), "little")
            else:
                total += path.stat().st_size
        if self.split_rule == "every-k":
            share = VAL_EVERY - 1 if split == "train" else 1
            total = total * share // VAL_EVERY
        return total

    def _read_unit(self, unit: _Unit) -> Iterator[str]:
        if unit.kind == ".parquet":
            yield from _read_row_group(unit.path, unit.row_group)
        elif unit.kind == ".txt":
            yield from _read_txt(unit.path)
        else:
            yield from _read_jsonl(unit.path)


def _read_row_group(path: Path, row_group: int) -> Iterator[str]:
    pf = _parquet_file(path)
    try:
        column = pf.read_row_group(row_group, columns=["text"]).column("text")
    except Exception as exc:
        raise DataError(f"{path}: row group {row_group} cannot be read ({_short(exc)}); the file is "
                        "corrupt: delete it and download or write it again") from None
    for value in column.to_pylist():
        if value is not None and not isinstance(value, str):
            raise DataError(f"{path}: column 'text' holds {type(value).__name__}, not strings")
        yield value or ""


def _decode_line(path: Path, raw_line: bytes, lineno: int) -> str:
    try:
        return raw_line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: line {lineno} is not valid UTF-8 ({exc.reason} at byte {exc.start}); "
                        "convert the file to UTF-8 (e.g. iconv -t UTF-8)") from None


def _read_txt(path: Path) -> Iterator[str]:
    """Documents of about TXT_DOC_CHARS characters, cut at a blank line, or at any line end past twice that."""
    parts: list[str] = []
    size = 0
    with open(path, "rb") as f:
        for lineno, raw_line in enumerate(f, 1):
            line = _decode_line(path, raw_line, lineno)
            parts.append(line)
            size += len(line)
            if (size >= TXT_DOC_CHARS and not line.strip()) or size >= 2 * TXT_DOC_CHARS:
                yield "".join(parts)
                parts, size = [], 0
    if parts:
        yield "".join(parts)


def _read_jsonl(path: Path) -> Iterator[str]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            for lineno, raw_line in enumerate(f, 1):
                line = _decode_line(path, raw_line, lineno)
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}: line {lineno} is not valid JSON ({exc.msg}); "
                                    "write one JSON object per line") from None
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise DataError(f"{path}: line {lineno} has no string field 'text'; "
                                    'write lines like {"text": "..."}')
                yield record["text"]
    except (OSError, EOFError) as exc:
        if isinstance(exc, gzip.BadGzipFile) or isinstance(exc, EOFError):
            raise DataError(f"{path}: not a readable gzip file ({_short(exc)})") from None
        raise


# --- opening -----------------------------------------------------------------------------------


def _usable_files(paths_in: list[Path]) -> list[Path]:
    return sorted(p for p in paths_in if p.is_file() and _kind(p) and not p.name.startswith("."))


def _from_files(files: list[Path], description: str) -> Corpus:
    if files and all(SHARD_RE.match(p.name) for p in files) and len({p.parent for p in files}) == 1:
        if len(files) < 2:
            raise DataError(f"{description}: only one shard ({files[0].name}); the last shard is the "
                            "validation split, so at least two are needed (chatforge data download -n 1 "
                            "fetches shard 0 and the validation shard)")
        return Corpus(files, "last-file", description)
    return Corpus(files, "every-k", description)


def open_corpus(data: str | Path | None = None, corpus: str = "fineweb-edu") -> Corpus:
    """The corpus named by `--data PATH`, or the downloaded shards of `corpus` when data is None."""
    if data is None:
        if corpus not in CORPORA:
            raise UsageError(f"--corpus {corpus!r} is not one of {', '.join(CORPORA)}")
        directory = paths.data_dir(corpus, create=False)
        files = sorted(directory.glob("shard_*.parquet")) if directory.is_dir() else []
        if not files:
            raise DataError(f"no shards in {directory}; run `chatforge data download -n 8"
                            f"{'' if corpus == 'fineweb-edu' else ' --corpus ' + corpus}` or pass --data PATH")
        return _from_files(files, str(directory))
    path = Path(data).expanduser()
    if path.is_file():
        if not _kind(path):
            raise DataError(f"--data {path}: unsupported file type; use .txt, .jsonl, .jsonl.gz or .parquet")
        return Corpus([path], "every-k", str(path))
    if path.is_dir():
        files = _usable_files(list(path.rglob("*")))
        if not files:
            raise DataError(f"--data {path}: folder has no .txt, .jsonl, .jsonl.gz or .parquet files")
        return _from_files(files, str(path))
    if glob.has_magic(str(data)):
        files = _usable_files([Path(p) for p in glob.glob(str(path), recursive=True)])
        if not files:
            raise DataError(f"--data {data}: the pattern matches no .txt, .jsonl, .jsonl.gz or .parquet files")
        return _from_files(files, str(data))
    raise DataError(f"--data {path}: no such file or folder")
