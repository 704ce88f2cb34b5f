"""The tokenizer stage: `chatforge tokenizer train` and `chatforge tokenizer eval`.

train: reads the first `--max-chars` characters of the pretraining corpus (each document cut to
`--doc-cap` characters so one huge document cannot dominate the pair counts), learns a BPE of
`--vocab-size` tokens, and saves it with its token_bytes table under <base>/tokenizer/<name>/, then
makes it the current one (tokenizer/current.txt), which a new `pretrain` uses. The name is
`--tokenizer-name`, else the data's name and the vocabulary size (`fineweb-edu-32768`,
`input-4096`). A tokenizer that a checkpoint was trained with is never overwritten: an explicit
name is refused, a derived one gets a free suffix (`input-4096-2`). A summary goes to
<base>/tokenizer/<name>/train.json for the report.

    chatforge tokenizer train                                  # the downloaded shards
    chatforge tokenizer train --data my_texts/ --vocab-size 4096 --max-chars 1e8
    chatforge tokenizer train --data input.txt --vocab-size 2048 --tokenizer-name small

eval: bytes per token (higher = better compression) of the trained tokenizer on short samples of
news-like prose, code, math and multilingual text written into this module, next to GPT-2's and
GPT-4's (cl100k_base) encodings when their files are already on this machine. Nothing is
downloaded: a reference encoding is used only when tiktoken's cache holds it (TIKTOKEN_CACHE_DIR)
or `--reference-dir` holds `<name>.tiktoken`; otherwise its column reads n/a. Evaluates the current
tokenizer (or `--tokenizer-name`) and writes eval.json beside it.

    chatforge tokenizer eval
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

from chatforge import paths
from chatforge.errors import DataError, UsageError
from chatforge.progress import Progress, format_duration, provenance
from chatforge.runtime import print0
from chatforge.tokenizer import (EmptyCorpusError, Tokenizer, check_vocab_size, load_tokenizer,
                                 set_current_tokenizer, tokenizer_name, tokenizer_names)

# ---- train --------------------------------------------------------------------------------------


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default=None,
                        help="a text file, a folder of txt/jsonl/parquet, or a glob (default: downloaded shards)")
    parser.add_argument("--corpus", default="fineweb-edu", help="which downloaded corpus to read without --data")
    parser.add_argument("--vocab-size", type=int, default=32768, help="tokens including the 9 specials")
    parser.add_argument("--max-chars", type=float, default=2e9, help="characters of corpus to train on")
    parser.add_argument("--doc-cap", type=int, default=10000, help="characters kept from each document")
    parser.add_argument("--tokenizer-name", default=None, metavar="NAME",
                        help="save as tokenizer/NAME/ (default: the data's name and the vocabulary size)")


def _counted(texts, total_chars: int, seen: dict):
    """Pass texts through, counting them and showing progress every ~1M characters."""
    pending = 0
    with Progress(total=total_chars, desc="tokenizer train", unit="char", unit_scale=True) as bar:
        for text in texts:
            seen["docs"] += 1
            seen["chars"] += len(text)
            pending += len(text)
            if pending >= 1_000_000:
                bar.update(pending)
                pending = 0
            yield text
        bar.update(pending)


def train_main(args: argparse.Namespace) -> dict:
    check_vocab_size(args.vocab_size)
    max_chars = int(args.max_chars)
    if max_chars < 1:
        raise UsageError(f"--max-chars {args.max_chars:g} must be at least 1")
    if args.doc_cap < 1:
        raise UsageError(f"--doc-cap {args.doc_cap} must be at least 1")
    from chatforge.data.corpus import open_corpus

    corpus = open_corpus(args.data, args.corpus)
    name = pick_name(args)  # before training: a refused name costs nothing
    seen = {"docs": 0, "chars": 0}
    start = time.perf_counter()
    try:
        tokenizer = Tokenizer.train(_counted(corpus.iter_texts(max_chars, args.doc_cap), max_chars, seen),
                                    args.vocab_size)
    except EmptyCorpusError:
        source = args.data if args.data else f"the downloaded {args.corpus} shards"
        raise DataError(f"the corpus {source} holds no text to train on; check --data "
                        "(or run `chatforge data download`)") from None
    seconds = time.perf_counter() - start
    directory = paths.tokenizer_dir(name)
    tokenizer.save(directory)
    summary = {
        "name": name,
        "vocab_size": tokenizer.vocab_size,
        "vocab_size_requested": args.vocab_size,
        "documents": seen["docs"],
        "characters": seen["chars"],
        "train_seconds": round(seconds, 3),
        "data": args.data,
        "corpus": None if args.data else args.corpus,
        "max_chars": max_chars,
        "doc_cap": args.doc_cap,
        "provenance": provenance(),
    }
    paths.atomic_write_text(directory / "train.json", json.dumps(summary, indent=2) + "\n")
    set_current_tokenizer(name)
    print0(f"trained a {tokenizer.vocab_size:,}-token BPE on {seen['chars']:,} characters "
           f"({seen['docs']:,} documents) in {format_duration(seconds)} ({seconds:.2f} s); saved to {directory}, "
           "the tokenizer new runs use now")
    return summary


def pick_name(args: argparse.Namespace) -> str:
    """The tokenizer's name: --tokenizer-name, refused when a checkpoint was trained with it, or one
    derived from the data and the vocabulary size, with a suffix past the names checkpoints use."""
    from chatforge.model.checkpoint import checkpoints_using_tokenizer, free_tokenizer_name

    if args.tokenizer_name:
        name = tokenizer_name(args.tokenizer_name)
        users = checkpoints_using_tokenizer(name)
        if users:
            raise UsageError(f"tokenizer {name!r} was used to train {', '.join(users)}, which need it as it is; "
                             "pass another --tokenizer-name")
        return name
    data = Path(args.data.rstrip("/\\")) if args.data else None
    if data is not None and any(c in data.name for c in "*?["):  # a glob: name it after its folder
        data = data.parent
    stem = tokenizer_name(f"{data.stem if data is not None else args.corpus}-{args.vocab_size}")
    # a derived name never replaces a tokenizer on disk: a run that has not saved its first
    # checkpoint yet is using it too
    name = free_tokenizer_name(stem, taken=set(tokenizer_names()))
    if name != stem:
        print0(f"tokenizer {stem!r} exists; this one is saved as {name!r} (--tokenizer-name picks the name)")
    return name


# ---- eval ---------------------------------------------------------------------------------------

SAMPLES = {
    "news": (
        "The city council voted on Tuesday to extend the riverside tram line by four kilometres, "
        "ending a debate that had stalled the project for almost two years. Supporters said the "
        "extension would cut commuting times for thousands of residents in the northern districts, "
        "while opponents questioned whether the projected ridership justified the cost, which the "
        "transport department now puts at 310 million dollars. Construction is expected to begin "
        "next spring and to last about three years. \"We listened to every neighbourhood meeting,\" "
        "the deputy mayor told reporters after the vote. \"This is the line people asked for.\" "
        "Shop owners along the planned route remain divided: some expect more customers once the "
        "stations open, others fear that months of road closures will drive them out of business "
        "first. The council promised a compensation fund, though its size has not been announced.\n"
    ),
    "code": (
        "import json\nfrom pathlib import Path\n\n\n"
        "class Inventory:\n"
        "    \"\"\"Keeps item counts and saves them as JSON.\"\"\"\n\n"
        "    def __init__(self, path: Path):\n"
        "        self.path = path\n"
        "        self.items: dict[str, int] = {}\n"
        "        if path.exists():\n"
        "            self.items = json.loads(path.read_text())\n\n"
        "    def add(self, name: str, count: int = 1) -> int:\n"
        "        if count <= 0:\n"
        "            raise ValueError(f\"count must be positive, got {count}\")\n"
        "        self.items[name] = self.items.get(name, 0) + count\n"
        "        return self.items[name]\n\n"
        "    def save(self) -> None:\n"
        "        tmp = self.path.with_suffix('.tmp')\n"
        "        tmp.write_text(json.dumps(self.items, indent=2, sort_keys=True))\n"
        "        tmp.replace(self.path)\n\n\n"
        "for i in range(10):\n"
        "    total = sum(x * x for x in range(i))\n"
        "    print(f\"{i:3d} {total:8d}\")\n"
    ),
    "math": (
        "Let f(x) = 3x^2 - 12x + 7. Completing the square gives f(x) = 3(x - 2)^2 - 5, so the "
        "minimum value is -5, reached at x = 2. The roots satisfy (x - 2)^2 = 5/3, that is "
        "x = 2 ± sqrt(15)/3 ≈ 3.291 or 0.709. Next, integrate from 0 to 4: "
        "∫_0^4 (3x^2 - 12x + 7) dx = [x^3 - 6x^2 + 7x]_0^4 = 64 - 96 + 28 = -4. "
        "For the sequence a_n = 2^n + 1 we have a_1 = 3, a_2 = 5, a_3 = 9, a_10 = 1025, and "
        "the sum of the first 10 terms is (2^11 - 2) + 10 = 2056. If 17% of 2,400 students "
        "chose physics, then 0.17 × 2400 = 408 students did; the remaining 1,992 students split "
        "in the ratio 5:3, giving 1245 and 747.\n"
    ),
    "multilingual": (
        "Le petit déjeuner est servi de sept heures à dix heures dans la salle principale. "
        "Die Bibliothek bleibt wegen Renovierungsarbeiten bis Ende März geschlossen. "
        "El tren hacia Valencia sale del andén número cuatro con diez minutos de retraso. "
        "Обновление программы занимает около пяти минут, не выключайте компьютер. "
        "今日は雨が降っているので、図書館で勉強することにしました。 "
        "这个城市的公共交通非常方便，地铁每五分钟就有一班。 "
        "오늘 회의는 오후 세 시에 시작합니다. "
        "Η θάλασσα ήταν ήρεμη όλο το πρωί. "
        "يبدأ الفصل الدراسي الجديد في الأسبوع القادم. "
        "आज मौसम बहुत अच्छा है।\n"
    ),
}

# The reference encodings, with what tiktoken needs to rebuild them from a local `.tiktoken` file.
_GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
_CL100K_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
                   r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")
REFERENCES = {
    "gpt2": {
        "label": "GPT-2",
        "pattern": _GPT2_PATTERN,
        "special_tokens": {"<|endoftext|>": 50256},
        "blobs": ["https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
                  "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json"],
    },
    "cl100k_base": {
        "label": "GPT-4",
        "pattern": _CL100K_PATTERN,
        "special_tokens": {"<|endoftext|>": 100257},
        "blobs": ["https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"],
    },
}


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reference-dir", default=None,
                        help="a folder with gpt2.tiktoken / cl100k_base.tiktoken (never downloaded)")
    parser.add_argument("--tokenizer-name", default=None, metavar="NAME",
                        help="the tokenizer to evaluate (default: the current one, the last trained)")


def _tiktoken_cache_dir() -> str | None:
    """Where tiktoken looks for cached files (None when caching is disabled)."""
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if var in os.environ:
            return os.environ[var] or None
    return os.path.join(tempfile.gettempdir(), "data-gym-cache")


def load_reference(name: str, reference_dir: str | Path | None = None):
    """The tiktoken encoding `name` if its files are on this machine, else None. Never downloads."""
    import tiktoken

    spec = REFERENCES[name]
    if reference_dir is not None:
        path = Path(reference_dir) / f"{name}.tiktoken"
        if path.is_file():
            ranks = {}
            for line in path.read_bytes().splitlines():
                if line.strip():
                    token, rank = line.split()
                    ranks[base64.b64decode(token)] = int(rank)
            return tiktoken.Encoding(name=name, pat_str=spec["pattern"], mergeable_ranks=ranks,
                                     special_tokens=spec["special_tokens"])
    cache = _tiktoken_cache_dir()
    if cache and all(os.path.isfile(os.path.join(cache, hashlib.sha1(url.encode()).hexdigest()))
                     for url in spec["blobs"]):
        try:
            return tiktoken.get_encoding(name)
        except Exception:  # a damaged cache file would make tiktoken try the network; treat as absent
            return None
    return None


def compression_table(tokenizer: Tokenizer, references: dict) -> dict:
    """{kind: {"bytes": n, encoder: {"tokens": t, "bytes_per_token": b}}} over the samples."""
    table = {}
    for kind, text in SAMPLES.items():
        n_bytes = len(text.encode("utf-8"))
        row = {"bytes": n_bytes}
        encoders = {"ours": tokenizer.encode} | {
            name: (enc.encode_ordinary if enc is not None else None) for name, enc in references.items()}
        for name, encode in encoders.items():
            if encode is None:
                row[name] = None
            else:
                n_tokens = len(encode(text))
                row[name] = {"tokens": n_tokens, "bytes_per_token": round(n_bytes / n_tokens, 3)}
        table[kind] = row
    return table


def _format_table(table: dict, names: list[str], labels: list[str]) -> str:
    header = f"{'text':<14}{'bytes':>7}" + "".join(f"{label:>22}" for label in labels)
    lines = [header, "-" * len(header)]
    for kind, row in table.items():
        cells = []
        for name in names:
            cell = row[name]
            cells.append(f"{'n/a':>22}" if cell is None
                         else f"{cell['tokens']:>8} tok {cell['bytes_per_token']:>6.2f} B/tok")
        lines.append(f"{kind:<14}{row['bytes']:>7}" + "".join(cells))
    return "\n".join(lines)


def eval_main(args: argparse.Namespace) -> dict:
    tokenizer = load_tokenizer(name=tokenizer_name(args.tokenizer_name) if args.tokenizer_name else None)
    references = {name: load_reference(name, args.reference_dir) for name in REFERENCES}
    table = compression_table(tokenizer, references)
    names = ["ours"] + list(REFERENCES)
    labels = [f"ours ({tokenizer.vocab_size})"] + [
        spec["label"] + ("" if references[name] is not None else " (not local)")
        for name, spec in REFERENCES.items()]
    print0(_format_table(table, names, labels))
    result = {"vocab_size": tokenizer.vocab_size, "samples": table,
              "references_available": {name: enc is not None for name, enc in references.items()},
              "provenance": provenance()}
    out = paths.tokenizer_dir(tokenizer.name) / "eval.json"
    paths.atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    print0(f"bytes per token: higher is better compression; written to {out}")
    return result
