"""The web UI in a real headless Chromium (Debian's, driven by Playwright) against the real server:
type a message and watch the reply stream in, stop a generation, regenerate, edit, start a new chat."""

import os
import shutil
import tempfile

import pytest
import torch

from chatforge.infer.engine import Engine
from chatforge.model.gpt import GPT, GPTConfig
from chatforge.serve.app import Limits, create_app
from chatforge.serve.command import ServerThread
from chatforge.serve.workers import WorkerPool
from tiny_chat import tiny_tokenizer

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Chromium is not installed (.ci/run installs it)"),
]
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage"]


@pytest.fixture(scope="module")
def page():
    sync_api = pytest.importorskip("playwright.sync_api")
    tok = tiny_tokenizer()
    # wider than tiny_model so that a 2000-token reply takes seconds: time enough to press Stop
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=2048, vocab_size=tok.vocab_size, n_layer=4, n_head=4, n_kv_head=4, n_embd=256))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 1.0 if "wte" in name else 0.1)
    model.eval()
    pool = WorkerPool([Engine(model, tok)])
    server = ServerThread(create_app(pool, "chatforge-ui-test", Limits(context=2048, default_max_tokens=1500)))
    profile = tempfile.mkdtemp(prefix="chatforge-chromium-")
    with sync_api.sync_playwright() as p:
        # a fresh --user-data-dir (Playwright passes the profile folder as that flag)
        browser = p.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, args=FLAGS, headless=True,
                                                       viewport={"width": 1100, "height": 750})
        pg = browser.pages[0] if browser.pages else browser.new_page()
        pg.set_default_timeout(30_000)
        pg.goto(server.url + "/")
        yield pg
        browser.close()
    server.stop()
    pool.close()
    shutil.rmtree(profile, ignore_errors=True)


def send(pg, text):
    pg.fill("#input", text)
    pg.press("#input", "Enter")


def test_a_message_streams_a_reply_then_stop_regenerate_edit_and_new_chat(page, tmp_path):
    pg = page
    assert pg.title() == "chatforge"
    pg.wait_for_selector("#model-name:has-text('chatforge-ui-test')")
    pg.fill("#temperature", "0")
    pg.fill("#max-tokens", "16")
    send(pg, "hello **cat**, say `hi`")
    pg.wait_for_selector("body[data-state=idle] .message.assistant .actions .regenerate")
    assert pg.inner_text(".message.user .bubble") == "hello **cat**, say `hi`"  # user text stays literal
    first = pg.inner_text(".message.assistant .bubble")
    assert first.strip()

    regenerated = "body[data-state=idle] .message.assistant .actions .regenerate"
    pg.click(regenerated)  # greedy, so the same reply comes back, in place of the old one
    pg.wait_for_selector(regenerated)
    assert pg.locator(".message.assistant").count() == 1
    assert pg.inner_text(".message.assistant .bubble") == first

    pg.click(".message.user .actions .edit")
    pg.fill(".edit-box textarea", "the dog ran")
    pg.click(".edit-box .save")
    pg.wait_for_selector(regenerated)
    assert pg.inner_text(".message.user .bubble") == "the dog ran"
    assert pg.locator(".message").count() == 2

    pg.fill("#max-tokens", "2000")  # runs to the context (~2000 decode steps): long enough to stop by hand
    send(pg, "tell me a long story")
    pg.wait_for_selector("body[data-state=streaming]")
    pg.wait_for_function("document.querySelectorAll('.message.assistant .bubble')[1]?.innerText.length > 0")
    pg.screenshot(path=str(tmp_path / "chat.png"))
    if os.environ.get("CHATFORGE_UI_SCREENSHOT"):
        shutil.copy(tmp_path / "chat.png", os.environ["CHATFORGE_UI_SCREENSHOT"])
    pg.click("#stop")
    pg.wait_for_selector("body[data-state=idle]")
    pg.fill("#max-tokens", "16")
    assert "(stopped)" in pg.inner_text(".message.assistant:last-child")
    assert pg.is_visible("#send") and not pg.is_visible("#stop")

    send(pg, "are you still there?")  # the server serves the next request after the stopped one
    pg.wait_for_selector(".message:nth-child(6).assistant .actions .regenerate")
    pg.click("#new-chat")
    assert pg.locator(".message").count() == 0
    assert pg.is_visible("#empty")
