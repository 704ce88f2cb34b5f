"""The CORE bundle and hub task downloads against a real local HTTP server (a mirror, through env vars)."""

import io
import json
import zipfile

import pytest
import torch

from chatforge import paths
from chatforge.errors import DataError, DownloadError
from chatforge.eval import core
from chatforge.tasks import base
from chatforge.tasks.gsm8k import GSM8K
from test_core import BigramModel, byte_tokenizer, write_bundle
from test_download import Server


class MirrorServer(Server):
    """Server that answers only the exact paths in `routes` (path -> file name), logging each path asked."""

    def __init__(self, files: dict[str, bytes], routes: dict[str, str]):
        super().__init__(files)
        self.base = self.url.removesuffix("/data")
        self.paths: list[str] = []
        owner = self

        class Routed(self.httpd.RequestHandlerClass):
            def do_GET(self):
                owner.paths.append(self.path)
                if routes.get(self.path) is None:
                    self.send_error(404)
                    return
                self.path = "/" + routes[self.path]
                super().do_GET()

        self.httpd.RequestHandlerClass = Routed


@pytest.fixture(autouse=True)
def no_local_sources(monkeypatch):
    for name in (core.BUNDLE_ENV, core.BUNDLE_URL_ENV, base.DATA_DIR_ENV, base.HUB_URL_ENV):
        monkeypatch.delenv(name, raising=False)


# ----------------------------------------------------------------------------- CORE bundle

MC = [{"query": f"Is {w} a colour?", "choices": ["yes", "no"], "gold": int(w not in ("red", "blue"))}
      for w in ("red", "cat", "blue", "dog")]
LM = [{"context": f"The {w} is", "continuation": w} for w in ("sun", "moon", "tree")]


def bundle_zip(tmp_path) -> bytes:
    """A zip laid out like the real eval_bundle.zip: one top folder with core.yaml, the csv, eval_data/."""
    src = tmp_path / "src" / "eval_bundle"
    write_bundle(src, {"colours": ("multiple_choice", 1, "\nAnswer: ", MC), "things": ("language_modeling", 0, None, LM)},
                 {"colours": 50, "things": 0})
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(src.rglob("*")):
            zf.write(path, path.relative_to(src.parent).as_posix())
    return buf.getvalue()


def test_bundle_is_downloaded_from_the_env_url_extracted_read_and_then_cached(tmp_path, monkeypatch):
    with MirrorServer({"bundle.zip": bundle_zip(tmp_path)}, {"/mirror/eval_bundle.zip": "bundle.zip"}) as srv:
        monkeypatch.setenv(core.BUNDLE_URL_ENV, f"{srv.base}/mirror/eval_bundle.zip")
        root = core.resolve_bundle(None)
        assert srv.paths == ["/mirror/eval_bundle.zip"]
        assert root == paths.base_dir() / "eval_bundle" / "eval_bundle"
        tasks = {t.label: t for t in core.load_bundle(root)}
        assert sorted(tasks) == ["colours", "things"]
        assert (tasks["colours"].task_type, tasks["colours"].num_fewshot, tasks["colours"].delimiter) == \
            ("multiple_choice", 1, "\nAnswer: ")
        assert tasks["things"].task_type == "language_modeling" and tasks["things"].baseline == 0
        assert core.read_items(tasks["colours"]) == (MC, 0)
        assert core.read_items(tasks["things"]) == (LM, 0)
        result = core.evaluate_core(BigramModel(torch.zeros(265, 265)), byte_tokenizer(), root, "cpu")
        assert result["num_tasks"] == 2 and result["tasks"]["colours"]["num_items"] == 4
        # no zip or extraction folder is left behind, and a second call fetches nothing
        assert sorted(p.name for p in paths.base_dir().iterdir()) == ["eval_bundle"]
        assert core.resolve_bundle(None) == root
        assert srv.paths == ["/mirror/eval_bundle.zip"]


def test_corrupt_bundle_zip_is_deleted_with_advice(tmp_path, monkeypatch):
    good = bundle_zip(tmp_path)
    broken = good[: len(good) // 2] + b"\0" * (len(good) - len(good) // 2)  # full length, bad content
    with MirrorServer({"bundle.zip": broken}, {"/eval_bundle.zip": "bundle.zip"}) as srv:
        monkeypatch.setenv(core.BUNDLE_URL_ENV, f"{srv.base}/eval_bundle.zip")
        with pytest.raises(DataError, match=r"eval_bundle\.zip .*not a valid zip.*deleted it.*run again"
                                            r".*CHATFORGE_EVAL_BUNDLE_URL.*--data-dir"):
            core.resolve_bundle(None)
    assert list(paths.base_dir().iterdir()) == []


def test_missing_bundle_url_names_the_mirror_variable_and_the_local_flag(monkeypatch):
    with MirrorServer({}, {}) as srv:
        monkeypatch.setenv(core.BUNDLE_URL_ENV, f"{srv.base}/nowhere.zip")
        with pytest.raises(DownloadError, match=r"HTTP 404.*CHATFORGE_EVAL_BUNDLE_URL.*--data-dir"):
            core.resolve_bundle(None)
        assert srv.paths == ["/nowhere.zip"]


# ----------------------------------------------------------------------------- hub parquet export

LISTING = "/api/datasets/openai/gsm8k/parquet/main/test"


def gsm8k_rows(start, n):
    return [{"question": f"What is {i} + 2?", "answer": f"{i} + 2 = <<{i}+2={i + 2}>>{i + 2}\n#### {i + 2}"}
            for i in range(start, start + n)]


def parquet_of(rows) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()


def test_gsm8k_downloads_from_the_hub_mirror_into_the_cache_once(monkeypatch):
    first, second = gsm8k_rows(0, 3), gsm8k_rows(3, 2)
    files = {"0.parquet": parquet_of(first), "1.parquet": parquet_of(second)}
    routes = {LISTING: "listing.json", f"{LISTING}/0.parquet": "0.parquet", f"{LISTING}/1.parquet": "1.parquet"}
    with MirrorServer(files, routes) as srv:
        # one URL as a mirror that rewrites the listing gives it, one as the hub's own (moved to the mirror)
        files["listing.json"] = json.dumps([f"{srv.base}{LISTING}/0.parquet",
                                            f"https://huggingface.co{LISTING}/1.parquet"]).encode()
        monkeypatch.setenv(base.HUB_URL_ENV, srv.base + "/")
        task = GSM8K("test")
        assert srv.paths == [LISTING, f"{LISTING}/0.parquet", f"{LISTING}/1.parquet"]
        assert task.records == first + second
        assert len(task) == 5 and task[4]["answer"] == "6"
        assert task.evaluate(task[4], "so #### 6")
        cached = paths.base_dir() / "tasks" / "openai" / "gsm8k" / "main" / "test"
        assert sorted(p.name for p in cached.iterdir()) == ["0000.parquet", "0001.parquet"]
        assert (cached / "0001.parquet").read_bytes() == files["1.parquet"]
        assert not (cached.parent / "test.partial").exists()
        assert len(GSM8K("test")) == 5
        assert len(srv.paths) == 3  # the second load read the cache


def test_hub_listing_404_names_data_dir_and_the_hub_variable(monkeypatch):
    with MirrorServer({}, {}) as srv:
        monkeypatch.setenv(base.HUB_URL_ENV, srv.base)
        with pytest.raises(DownloadError, match=r"parquet/main/test: HTTP 404.*--data-dir.*CHATFORGE_DATA_DIR"
                                                r".*CHATFORGE_HUB_URL"):
            GSM8K("test")
        assert srv.paths == [LISTING]
    assert not list((paths.base_dir() / "tasks").rglob("*.parquet"))


def test_hub_listing_that_is_not_a_list_is_a_download_error(monkeypatch):
    with MirrorServer({"listing.json": b"<html>rate limited</html>"}, {LISTING: "listing.json"}) as srv:
        monkeypatch.setenv(base.HUB_URL_ENV, srv.base)
        with pytest.raises(DownloadError, match=r"no JSON list of parquet files for openai/gsm8k.*--data-dir"):
            GSM8K("test")
    assert not list((paths.base_dir() / "tasks").rglob("_files.json"))
