"""Downloads against a real local HTTP server: resume after a drop, corruption, retries, the CLI stage."""

import hashlib
import http.server
import io
import random
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from chatforge import paths
from chatforge.data import download
from chatforge.data.corpus import open_corpus
from chatforge.errors import DownloadError


def parquet_bytes(texts) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": texts}), buf, row_group_size=4)
    return buf.getvalue()


class Server:
    """http.server on 127.0.0.1:0 serving `files`, with per-file misbehaviour and a request log."""

    def __init__(self, files: dict[str, bytes], behaviour: dict[str, str] | None = None):
        self.files = files
        self.behaviour = behaviour or {}
        self.requests: list[tuple[str, str | None]] = []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                rng = self.headers.get("Range")
                owner.requests.append((name, rng))
                mode = owner.behaviour.get(name, "")
                if name not in owner.files:
                    self.send_error(404)
                    return
                if mode == "503" or (mode == "503-once" and len(owner.requests_for(name)) == 1):
                    self.send_error(503)
                    return
                data = owner.files[name]
                if mode == "corrupt":
                    data = data[:-8] + b"XXXXPAR1"[::-1]
                start = int(rng.removeprefix("bytes=").rstrip("-")) if rng else 0
                body = data[start:]
                self.send_response(206 if rng else 200)
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if mode == "drop-once" and len(owner.requests_for(name)) == 1:
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/data"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def requests_for(self, name):
        return [r for r in self.requests if r[0] == name]

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


def shard_files(n_train=3, val_index=9):
    files = {}
    for i in list(range(n_train)) + [val_index]:
        files[download.shard_name(i)] = parquet_bytes([f"shard {i} document {j} " * 50 for j in range(10)])
    return files


def test_download_shards_fetches_train_and_val_and_the_corpus_reads_them():
    files = shard_files()
    with Server(files) as srv:
        got = download.download_shards("fineweb-edu", n=3, base_url=srv.url, val_shard=9, backoff=0)
    assert [p.name for p in got] == ["shard_00000.parquet", "shard_00001.parquet", "shard_00002.parquet",
                                     "shard_00009.parquet"]
    for p in got:
        assert p.read_bytes() == files[p.name]
    assert not list(paths.data_dir("fineweb-edu").glob("*.part"))
    corpus = open_corpus()
    assert list(corpus.iter_documents("val"))[0].startswith("shard 9 document 0")
    assert len(list(corpus.iter_documents("train"))) == 30


def test_dropped_connection_is_resumed_with_a_range_request(tmp_path):
    name = "shard_00000.parquet"
    rng = random.Random(0)
    files = {name: parquet_bytes([rng.randbytes(20_000).hex() for _ in range(40)])}  # ~1.6 MB, incompressible
    with Server(files, {name: "drop-once"}) as srv:
        dest = download.download_file(f"{srv.url}/{name}", tmp_path / name, verify=download.verify_parquet,
                                      backoff=0)
        reqs = srv.requests_for(name)
    assert dest.read_bytes() == files[name]
    assert len(reqs) == 2 and reqs[0][1] is None
    # the second request asks only for what is missing (less at most one unfinished read of the first)
    start = int(reqs[1][1].removeprefix("bytes=").rstrip("-"))
    half = len(files[name]) // 2
    assert half - download.CHUNK <= start <= half


def test_corrupt_file_is_a_clear_error_and_never_left_in_place(tmp_path):
    name = "shard_00000.parquet"
    files = {name: parquet_bytes(["some text"] * 20)}
    with Server(files, {name: "corrupt"}) as srv:
        with pytest.raises(DownloadError, match=r"shard_00000\.parquet.*verification failed.*PAR1"):
            download.download_file(f"{srv.url}/{name}", tmp_path / name, verify=download.verify_parquet,
                                   retries=2, backoff=0)
        assert len(srv.requests_for(name)) == 2
    assert list(tmp_path.iterdir()) == []


def test_sha256_mismatch_is_rejected(tmp_path):
    name = "blob.bin"
    with Server({name: b"hello world"}) as srv:
        with pytest.raises(DownloadError, match="sha256"):
            download.download_file(f"{srv.url}/{name}", tmp_path / name, expected_sha256="0" * 64,
                                   retries=1, backoff=0)
        dest = download.download_file(f"{srv.url}/{name}", tmp_path / name,
                                      expected_sha256=hashlib.sha256(b"hello world").hexdigest(), backoff=0)
    assert dest.read_bytes() == b"hello world"


def test_server_errors_are_retried_and_404_fails_at_once(tmp_path):
    name = "shard_00000.parquet"
    files = {name: parquet_bytes(["x"] * 5)}
    with Server(files, {name: "503-once"}) as srv:
        download.download_file(f"{srv.url}/{name}", tmp_path / name, backoff=0)
        assert len(srv.requests_for(name)) == 2
        with pytest.raises(DownloadError, match=r"missing\.parquet: HTTP 404"):
            download.download_file(f"{srv.url}/missing.parquet", tmp_path / "missing.parquet", backoff=0)
        assert len(srv.requests_for("missing.parquet")) == 1
    with Server(files, {name: "503"}) as srv:
        with pytest.raises(DownloadError, match="failed after 3 attempts: HTTP 503"):
            download.download_file(f"{srv.url}/{name}", tmp_path / "other.parquet", retries=3, backoff=0)


def test_one_failed_shard_keeps_the_others(tmp_path):
    files = shard_files(n_train=2)
    files.pop("shard_00001.parquet")
    with Server(files) as srv:
        with pytest.raises(DownloadError, match=r"1 of 3 shards failed.*shard_00001\.parquet: HTTP 404"):
            download.download_shards("climbmix", n=2, base_url=srv.url, val_shard=9, backoff=0)
    names = sorted(p.name for p in paths.data_dir("climbmix").iterdir())
    assert names == ["shard_00000.parquet", "shard_00009.parquet"]


def test_cli_stage_with_url_env_and_data_dir(tmp_path, monkeypatch, capsys):
    from chatforge.cli import main

    files = shard_files(n_train=1, val_index=1822)
    with Server(files) as srv:
        monkeypatch.setenv(download.URL_ENV, srv.url)
        main(["data", "download", "-n", "1"])
    assert "2 shards" in capsys.readouterr().out
    local = tmp_path / "mirror" / "climbmix"
    local.mkdir(parents=True)
    for name, data in shard_files(n_train=2, val_index=6542).items():
        (local / name).write_bytes(data)
    main(["data", "download", "-n", "2", "--corpus", "climbmix", "--from", str(tmp_path / "mirror")])
    assert len(list(paths.data_dir("climbmix").glob("shard_*.parquet"))) == 3
    (local / "shard_00001.parquet").write_bytes(b"not parquet")
    (paths.data_dir("climbmix") / "shard_00001.parquet").unlink()
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "download", "-n", "2", "--corpus", "climbmix", "--from", str(tmp_path / "mirror")])
    assert exit_info.value.code == 2
    assert "shard_00001.parquet" in capsys.readouterr().err
    assert not (paths.data_dir("climbmix") / "shard_00001.parquet").exists()


def test_a_host_that_does_not_resolve_fails_at_once_not_after_the_retries(tmp_path):
    import time

    started = time.monotonic()
    with pytest.raises(DownloadError, match="host name does not resolve"):
        download.download_file("http://hub.invalid/x.parquet", tmp_path / "x.parquet", backoff=10.0)
    assert time.monotonic() - started < 5  # five attempts would have slept 10 + 20 + 40 + 80 s
