"""`chatforge data download`: fetch pretraining shards over HTTPS, resumably and verified.

    chatforge data download -n 8                      # shards 0..7 plus the validation shard
    chatforge data download -n 240 --corpus climbmix  # NVIDIA ClimbMix instead of FineWeb-Edu
    chatforge data download --url http://mirror/x     # another server laid out like the hub
    chatforge data download --from /mnt/shards        # copy from a local folder (offline machines)

Shards land in `data/<corpus>/shard_00000.parquet ...` under the base directory; the corpus' last
shard (1822 for FineWeb-Edu, 6542 for ClimbMix) is the validation split and is always fetched.

`download_file` is the one way chatforge fetches a file (shards, eval bundle, task data):
- bytes go to `<name>.part`; after a dropped connection the next attempt asks for the rest with an
  HTTP Range header, so a 100 MB shard is never fetched twice;
- connection errors, 5xx and 429 are retried with exponential back-off; other 4xx fail at once, and
  so does a host name that does not exist (what a machine without network hears for every host:
  half a minute of retries would change nothing);
- the finished file is checked: its size against Content-Length, its sha256 against the expected one
  (given by the caller, or the hub's `X-Linked-Etag` for LFS files), and a caller's check (parquet
  here: "PAR1" at both ends and a footer pyarrow can read);
- only then is it renamed into place, so a file under its final name is always complete and good.
A file that fails verification is deleted and fetched again from scratch until the attempts run out.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Callable

from chatforge import paths
from chatforge.errors import DownloadError, UsageError
from chatforge.flags import add_flag
from chatforge.progress import Progress
from chatforge.runtime import print0

# corpus -> (base URL, index of the last shard = the validation split)
REMOTE = {
    "fineweb-edu": ("https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main", 1822),
    "climbmix": ("https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main", 6542),
}
URL_ENV = "CHATFORGE_DATA_URL"
CHUNK = 1 << 16  # bytes per read: a dropped connection loses at most this much
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.parquet"


class _Retryable(Exception):
    """A failure worth another attempt (network, 5xx, a short or corrupt transfer)."""


def verify_parquet(path: Path) -> None:
    """Raise ValueError unless `path` looks like a complete parquet file."""
    size = path.stat().st_size
    if size < 12:
        raise ValueError(f"only {size} bytes")
    with open(path, "rb") as f:
        head = f.read(4)
        f.seek(-4, os.SEEK_END)
        tail = f.read(4)
    if head != b"PAR1" or tail != b"PAR1":
        raise ValueError("no parquet magic 'PAR1' at both ends")
    import pyarrow.parquet as pq

    try:
        pq.read_metadata(path)
    except Exception as exc:
        raise ValueError(f"unreadable parquet footer: {str(exc).strip()[:200]}") from None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _published_sha256(response) -> str | None:
    """The hub names an LFS file's sha256 in X-Linked-Etag (on the redirect, or the final answer)."""
    for r in [*response.history, response]:
        tag = r.headers.get("X-Linked-Etag", "").strip('"').lower()
        if _SHA256_RE.match(tag):
            return tag
    return None


def _fetch_once(session, url: str, part: Path, timeout: float, on_bytes: Callable[[int], None],
                hint: str) -> str | None:
    """Bring `part` to the full file in one request (resuming from its size); return a published sha256."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    import requests

    try:
        with session.get(url, headers=headers, stream=True, timeout=timeout) as r:
            if r.status_code == 416 and have:
                total = r.headers.get("Content-Range", "").rpartition("/")[2]
                if total.isdigit() and int(total) == have:
                    return _published_sha256(r)  # the part was already complete
                part.unlink()
                raise _Retryable("the partial file is larger than the remote one; starting over")
            if r.status_code in (408, 429) or r.status_code >= 500:
                raise _Retryable(f"HTTP {r.status_code}")
            if r.status_code >= 400:
                raise DownloadError(f"{url}: HTTP {r.status_code} {r.reason}; {hint}")
            if r.status_code == 206:
                start = r.headers.get("Content-Range", "").removeprefix("bytes ").partition("-")[0]
                if not start.isdigit() or int(start) != have:
                    part.unlink()
                    raise _Retryable("the server resumed at the wrong offset; starting over")
                mode = "ab"
            else:  # 200: the server sent the whole file (it ignored or we sent no Range)
                mode, have = "wb", 0
            length = r.headers.get("Content-Length")
            expected = have + int(length) if length and length.isdigit() else None
            with open(part, mode) as f:
                for block in r.iter_content(CHUNK):
                    f.write(block)
                    on_bytes(len(block))
                f.flush()
                os.fsync(f.fileno())
            got = part.stat().st_size
            if expected is not None and got != expected:
                raise _Retryable(f"connection ended at {got} of {expected} bytes")
            return _published_sha256(r)
    except requests.RequestException as exc:
        if any(text in str(exc) for text in _UNKNOWN_HOST):
            raise DownloadError(f"{url}: the host name does not resolve (no network, or a mistyped host)") from None
        raise _Retryable(f"{type(exc).__name__}: {str(exc)[:200]}") from None


# getaddrinfo's answers for a name that does not exist (EAI_NONAME, EAI_NODATA on Linux and macOS);
# a temporary resolver failure (EAI_AGAIN) is retried like any dropped connection
_UNKNOWN_HOST = ("Name or service not known", "nodename nor servname provided", "No address associated with hostname")


def download_file(url: str, dest: Path, expected_sha256: str | None = None, *,
                  verify: Callable[[Path], None] | None = None, retries: int = 5, backoff: float = 2.0,
                  timeout: float = 60.0, on_bytes: Callable[[int], None] | None = None,
                  hint: str = f"check the URL (--url / {URL_ENV}) and that the file exists there") -> Path:
    """Fetch `url` to `dest` (resumable through dest.part, retried, verified, renamed into place).

    `hint` follows an HTTP error like 404 in the message: what the user should check.
    `verify(path)` raises ValueError for a bad file. A `dest` that already exists is kept as it is
    (after a sha256 check when one is given). Raises DownloadError after `retries` failed attempts.
    """
    import requests

    dest = Path(dest)
    if dest.exists() and (expected_sha256 is None or sha256_of(dest) == expected_sha256.lower()):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    on_bytes = on_bytes or (lambda n: None)
    problem = "no attempt made"
    with requests.Session() as session:
        for attempt in range(max(1, retries)):
            if attempt:
                time.sleep(backoff * 2 ** (attempt - 1))
            try:
                published = _fetch_once(session, url, part, timeout, on_bytes, hint)
                want = (expected_sha256 or published or "").lower()
                if want and sha256_of(part) != want:
                    raise ValueError(f"sha256 differs from the expected {want[:12]}...")
                if verify is not None:
                    verify(part)
            except _Retryable as exc:
                problem = str(exc)
                continue
            except ValueError as exc:  # complete but bad: throw it away and fetch it whole again
                problem = f"verification failed ({exc})"
                part.unlink(missing_ok=True)
                continue
            os.replace(part, dest)
            return dest
    kept = f"; the partial file {part.name} is kept and the next run resumes it" if part.exists() else ""
    raise DownloadError(f"{url}: failed after {max(1, retries)} attempts: {problem}{kept}")


def copy_file(src: Path, dest: Path, verify: Callable[[Path], None] | None = None) -> Path:
    """The offline twin of download_file: copy through dest.part, verify, rename."""
    if dest.exists():
        return dest
    part = dest.with_name(dest.name + ".part")
    shutil.copyfile(src, part)
    try:
        if verify is not None:
            verify(part)
    except ValueError as exc:
        part.unlink(missing_ok=True)
        raise DownloadError(f"{src}: {exc}; replace this file in the --data-dir folder") from None
    os.replace(part, dest)
    return dest


def shard_indices(n: int | None, last: int) -> list[int]:
    """Shards 0..n-1 plus the validation shard `last`; all of them when n is None or -1."""
    if n is None or n < 0 or n >= last:
        return list(range(last + 1))
    return list(range(n)) + [last]


def download_shards(corpus: str = "fineweb-edu", n: int | None = 8, base_url: str | None = None,
                    data_dir: str | Path | None = None, val_shard: int | None = None, workers: int = 4,
                    retries: int = 5, backoff: float = 2.0) -> list[Path]:
    """Fetch (or copy from `data_dir`) the shards `-n` asks for into paths.data_dir(corpus)."""
    if corpus not in REMOTE:
        raise UsageError(f"--corpus {corpus!r} is not one of {', '.join(REMOTE)}")
    default_url, last = REMOTE[corpus]
    last = last if val_shard is None else val_shard
    base_url = (base_url or os.environ.get(URL_ENV) or default_url).rstrip("/")
    out_dir = paths.data_dir(corpus)
    indices = shard_indices(n, last)
    source_dir = None
    if data_dir is not None:
        root = Path(data_dir).expanduser()
        source_dir = root / corpus if (root / corpus).is_dir() else root
        missing = [shard_name(i) for i in indices if not (source_dir / shard_name(i)).is_file()]
        if missing:
            raise DownloadError(f"--from {source_dir}: {len(missing)} of {len(indices)} shards are "
                                f"missing (first: {missing[0]}); put them there or drop --from")
    todo = [i for i in indices if not (out_dir / shard_name(i)).exists()]
    where = source_dir or base_url
    print0(f"{corpus}: {len(indices)} shards wanted, {len(indices) - len(todo)} already in {out_dir}, "
           f"{len(todo)} to fetch from {where}")
    lock = threading.Lock()
    bar = Progress(None, f"download {corpus}", unit="B", unit_scale=True)
    done = [len(indices) - len(todo)]

    def count_bytes(nbytes: int) -> None:
        with lock:
            bar.update(nbytes, shards=f"{done[0]}/{len(indices)}")

    def fetch(i: int) -> Path:
        dest = out_dir / shard_name(i)
        if source_dir is not None:
            copy_file(source_dir / shard_name(i), dest, verify_parquet)
            count_bytes(dest.stat().st_size)
        else:
            download_file(f"{base_url}/{shard_name(i)}", dest, verify=verify_parquet, retries=retries,
                          backoff=backoff, on_bytes=count_bytes)
        with lock:
            done[0] += 1
        count_bytes(0)
        return dest

    errors: list[str] = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = {pool.submit(fetch, i): i for i in todo}
        for future in as_completed(futures):
            try:
                future.result()
            except DownloadError as exc:
                errors.append(str(exc))
    bar.close()
    if errors:
        raise DownloadError(f"{len(errors)} of {len(todo)} shards failed (the others are in place; run the "
                            f"command again to resume); first: {errors[0]}")
    return [out_dir / shard_name(i) for i in indices]


def add_arguments(parser) -> None:
    parser.add_argument("-n", "--num-shards", type=int, default=8,
                        help="training shards 0..N-1 to fetch, plus the validation shard (-1: all; default 8)")
    parser.add_argument("--corpus", default="fineweb-edu", choices=list(REMOTE),
                        help="which pretraining corpus (default fineweb-edu)")
    parser.add_argument("--url", default=None,
                        help=f"base URL of a server laid out like the hub (default: ${URL_ENV} or the hub)")
    # the shards' source, not task data: --data-dir elsewhere means task and eval files
    add_flag(parser, "--from", "--data-dir", dest="from_dir", default=None, metavar="DIR",
             help="copy shards from this local folder (DIR/<corpus>/ or DIR/) instead of downloading")
    parser.add_argument("--val-shard", type=int, default=None,
                        help="index of the validation shard (default: the corpus' last, 1822 / 6542)")
    parser.add_argument("--workers", type=int, default=4, help="files fetched at the same time (default 4)")
    parser.add_argument("--retries", type=int, default=5, help="attempts per file (default 5)")


def main(args) -> None:
    if args.workers < 1 or args.retries < 1:
        raise UsageError("--workers and --retries must be at least 1")
    if args.val_shard is not None and args.val_shard < 0:
        raise UsageError("--val-shard must be a shard index (0 or more)")
    files = download_shards(args.corpus, args.num_shards, base_url=args.url, data_dir=args.from_dir,
                            val_shard=args.val_shard, workers=args.workers, retries=args.retries)
    total = sum(f.stat().st_size for f in files)
    print0(f"{len(files)} shards ({total / 1e6:,.1f} MB) in {files[0].parent}; the last one "
           f"({files[-1].name}) is the validation split")
