"""Shared test fixtures: an isolated CHATFORGE_HOME per test, and the path to ../shared/data."""

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True)
def chatforge_home(tmp_path_factory, monkeypatch):
    home = tmp_path_factory.mktemp("chatforge_home")
    monkeypatch.setenv("CHATFORGE_HOME", str(home))
    return home


@pytest.fixture
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present (a fresh clone); this test needs the real data")
    return SHARED_DATA


def pytest_configure(config):
    # Two cores in CI: one intra-op thread per test process keeps subprocess tests from oversubscribing.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
