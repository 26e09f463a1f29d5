"""The playground (/ui) in a real browser: Debian's chromium driven by Playwright against a real server.

One server for the module, started with an API key and an admin key, so the page has to ask for
them. Every test fails on any console error or uncaught page error; the only console errors let
through are the browser's own "Failed to load resource" lines for the refusals a test provokes on
purpose, each named by path and status. Screenshots of every panel, at 1280x800 and 390x844, go to
$REFT_UI_SCREENSHOTS (default: a pytest temporary directory); the best are copied to docs/img/ by hand.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest

from tests.conftest import EMOJI_DIR, REPO

try:
    from playwright import sync_api
except ImportError:  # the browser tests skip and say why; the page's own checks still run
    sync_api = None

CHROMIUM = Path(os.environ.get("REFT_CHROMIUM", "/usr/bin/chromium"))
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
expect = sync_api.expect if sync_api else None

API_KEY, ADMIN_KEY = "ui-user-key", "ui-admin-key"
DESKTOP, PHONE = {"width": 1280, "height": 800}, {"width": 390, "height": 844}
WAIT_MS = 300_000  # generation on a busy 2-core machine: seconds per token
LOAD_FAILED = re.compile(r"Failed to load resource: the server responded with a status of (\d+)")
EXAMPLES = [
    {"prompt": "Say hi.", "completion": "HI THERE!"},
    {"prompt": "Name a fruit.", "completion": "A BANANA!"},
    {"prompt": "What is 2+2?", "completion": "FOUR!"},
    {"prompt": "Name a colour.", "completion": "RED!"},
]


@pytest.fixture(scope="module")
def server(tmp_path_factory, reft_server_factory):
    tmp = tmp_path_factory.mktemp("ui")
    registry = tmp / "adapters"
    registry.mkdir()
    for name in ("shout", "emoji", "pirate", "cheer"):
        shutil.copy(REPO / "adapters" / f"{name}.safetensors", registry)
    return reft_server_factory(registry, tmp / "server.log", env={"REFT_API_KEY": API_KEY, "REFT_ADMIN_KEY": ADMIN_KEY})


@pytest.fixture(scope="module")
def api(server):
    with httpx.Client(base_url=server.url, timeout=WAIT_MS / 1000,
                      headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as c:
        yield c


@pytest.fixture(scope="module")
def browser():
    if sync_api is None:
        pytest.skip("playwright is not installed: pip install -e '.[dev]'")
    if not CHROMIUM.exists():
        pytest.skip(f"no browser at {CHROMIUM}: `make browser` installs Debian's chromium (needs root and apt-get); "
                    "REFT_CHROMIUM names another")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM))
        yield b
        b.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    out = Path(os.environ.get("REFT_UI_SCREENSHOTS") or tmp_path_factory.mktemp("ui-screenshots"))
    out.mkdir(parents=True, exist_ok=True)
    return out


class Tab:
    """A page of the playground and every console error and page error it raised."""

    def __init__(self, page, url: str) -> None:
        self.page, self.url = page, url
        self.errors: list[str] = []
        self.allowed: set[tuple[str, int]] = set()
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.errors.append(f"page error: {exc}"))

    def _console(self, msg) -> None:
        if msg.type != "error":
            return
        failed = LOAD_FAILED.match(msg.text)
        where = urlparse(msg.location.get("url", "")).path
        if failed and (where, int(failed.group(1))) in self.allowed:
            return
        self.errors.append(f"console error: {msg.text} ({msg.location.get('url')})")

    def allow(self, path: str, status: int) -> None:
        """A refusal the test provokes: the browser logs it as an error, and that one is expected."""
        self.allowed.add((path, status))

    def open(self) -> Tab:
        self.page.goto(self.url + "/ui")
        return self

    def panel(self, name: str):
        self.page.get_by_role("tab", name=name).click()
        panel = self.page.locator(f"#panel-{name.lower()}")
        expect(panel).to_be_visible()
        return panel

    def shoot(self, shots: Path, name: str) -> None:
        """Screenshots at desktop and phone width; at phone width nothing may stick out sideways."""
        self.page.evaluate("() => window.scrollTo(0, 0)")
        self.page.screenshot(path=shots / f"{name}-1280.png")
        self.page.set_viewport_size(PHONE)
        try:
            overflow = self.page.evaluate("() => document.documentElement.scrollWidth - window.innerWidth")
            assert overflow <= 0, f"{name}: the page is {overflow}px wider than a {PHONE['width']}px window"
            self.page.screenshot(path=shots / f"{name}-390.png", full_page=True)
        finally:
            self.page.set_viewport_size(DESKTOP)


@pytest.fixture
def new_tab(server, browser):
    """Open tabs (keys given through session storage unless `keys=False`); each must end with no errors."""
    contexts, tabs = [], []

    def make(keys: bool = True) -> Tab:
        context = browser.new_context(viewport=DESKTOP)
        if keys:
            context.add_init_script(f"sessionStorage.setItem('reft.apiKey', {json.dumps(API_KEY)});"
                                    f"sessionStorage.setItem('reft.adminKey', {json.dumps(ADMIN_KEY)});")
        contexts.append(context)
        tabs.append(Tab(context.new_page(), server.url))
        return tabs[-1]

    yield make
    errors = [e for tab in tabs for e in tab.errors]
    for context in contexts:
        context.close()
    assert not errors, "\n".join(errors)


def ready(tab: Tab) -> Tab:
    expect(tab.page.locator("body")).to_have_attribute("data-ready", "1")
    return tab


# ---- the page and its keys ---------------------------------------------------------------------------------


def test_the_page_is_static_same_origin_and_strict(server):
    with httpx.Client(base_url=server.url) as c:
        r = c.get("/")
        assert r.status_code == 307 and r.headers["location"] == "/ui"
        page = c.get("/ui")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        csp = page.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "script-src 'self'" in csp and "unsafe" not in csp
        html = page.text
        assert not re.search(r"<script(?![^>]*\bsrc=)", html), "an inline script"
        assert not re.search(r"\sstyle=|<style|\son[a-z]+=", html), "an inline style or event handler"
        for src in re.findall(r'(?:src|href)="([^"]+)"', html):
            assert src.startswith("/ui/"), f"{src} is not one of the page's own files"
            assert c.get(src).status_code == 200, src
        missing = c.get("/ui/nothing.js")
        assert missing.status_code == 404 and "nothing.js" in missing.json()["error"]["message"]


def test_the_page_asks_for_the_keys_and_keeps_them_in_the_tab(new_tab, shots):
    tab = new_tab(keys=False)
    tab.allow("/v1/models", 401)  # the page finds out that it needs a key by being refused
    tab.allow("/metrics", 401)
    tab.open()
    dialog = tab.page.locator("#keys-dialog")
    expect(dialog).to_be_visible()
    expect(dialog.locator("#keys-reason")).to_contain_text("API key")
    tab.page.screenshot(path=shots / "keys-1280.png")
    tab.page.fill("#key-api", API_KEY)
    tab.page.fill("#key-admin", ADMIN_KEY)
    tab.page.keyboard.press("Enter")
    expect(dialog).to_be_hidden()
    ready(tab)
    assert tab.page.evaluate("() => sessionStorage.getItem('reft.apiKey')") == API_KEY
    assert tab.page.evaluate("() => localStorage.length") == 0
    # Keyboard: the arrow keys move between the tabs.
    tab.page.get_by_role("tab", name="Compare").focus()
    tab.page.keyboard.press("ArrowRight")
    expect(tab.page.locator("#panel-adapters")).to_be_visible()
    expect(tab.page.get_by_role("tab", name="Adapters")).to_be_focused()
    tab.page.keyboard.press("End")
    expect(tab.page.locator("#panel-server")).to_be_visible()


# ---- compare -----------------------------------------------------------------------------------------------


def test_greedy_columns_stream_what_the_api_returns(new_tab, api, shots):
    tab = ready(new_tab().open())
    page = tab.page
    models = ["base", "shout", "emoji", "shout+emoji"]
    while page.locator(".column").count() < len(models):
        page.click("#add-column")
    expect(page.locator("#add-column")).to_be_disabled()  # four at most
    columns = page.locator(".column")
    for i, model in enumerate(models):
        columns.nth(i).locator(".col-model").fill(model)
        columns.nth(i).locator(".col-temp").fill("0")
        columns.nth(i).locator(".col-max").fill("8")
    page.fill("#system", "You are brief.")
    page.fill("#user", "Describe the sea.")
    page.locator("#user").press("Control+Enter")  # the keyboard runs every column at once
    for i in range(len(models)):
        expect(columns.nth(i)).to_have_attribute("data-state", "done", timeout=WAIT_MS)
    messages = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Describe the sea."}]
    with ThreadPoolExecutor(len(models)) as pool:  # the same requests, not streamed, batched together
        answers = list(pool.map(lambda m: api.post("/v1/chat/completions", json={
            "model": m, "messages": messages, "temperature": 0, "max_tokens": 8}), models))
    texts = set()
    for i, want in enumerate(answers):
        assert want.status_code == 200, want.text
        body = want.json()
        assert columns.nth(i).locator(".col-output").text_content() == body["choices"][0]["message"]["content"]
        stats = columns.nth(i).locator(".col-stats").text_content()
        assert re.search(r"TTFT \d+ ms", stats) and f"{body['usage']['completion_tokens']} tokens" in stats, stats
        details = body["usage"].get("prompt_tokens_details")
        assert ("cached" in stats) == bool(details and "cached_tokens" in details), stats
        texts.add(body["choices"][0]["message"]["content"])
    assert len(texts) > 1, "the adapters changed nothing: the comparison shows nothing"
    tab.shoot(shots, "compare")


def test_a_refused_column_shows_the_server_message(new_tab, api):
    tab = ready(new_tab().open())
    tab.allow("/v1/chat/completions", 404)
    column = tab.page.locator(".column").first
    column.locator(".col-model").fill("no-such-adapter")
    column.locator(".col-max").fill("1")
    while tab.page.locator(".column").count() > 1:
        tab.page.locator(".column .col-remove").last.click()
    tab.page.click("#run")
    expect(column).to_have_attribute("data-state", "error", timeout=WAIT_MS)
    refused = api.post("/v1/chat/completions", json={"model": "no-such-adapter", "max_tokens": 1,
                                                     "messages": [{"role": "user", "content": "Hi"}]})
    assert refused.status_code == 404
    expect(column.locator(".col-output")).to_have_text(refused.json()["error"]["message"])


# ---- adapters ----------------------------------------------------------------------------------------------


def emoji_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for p in sorted(EMOJI_DIR.iterdir()):
            zf.write(p, f"emoji/{p.name}")
    return buf.getvalue()


def table_names(page) -> list[str]:
    return page.locator("#adapter-table tbody tr[data-name]").evaluate_all("rows => rows.map(r => r.dataset.name)")


def test_adapters_upload_page_filter_and_delete(new_tab, api, shots, tmp_path):
    tab = ready(new_tab().open())
    page = tab.page
    panel = tab.panel("Adapters")
    expect(panel.locator("tr[data-name='shout']")).to_be_visible()
    described = api.get("/v1/adapters/shout").json()
    row = panel.locator("tr[data-name='shout']")
    expect(row.locator("td").nth(6)).to_have_text(described["sha256"][:12])
    expect(row.locator("td").nth(2)).to_have_text(", ".join(map(str, described["layers"])))
    # Residency shows once the server exports it (vLLM's vllm:lora_adapter_loaded); until then, a dash.
    resident = row.locator("td").nth(7)
    if "vllm:lora_adapter_loaded" in api.get("/metrics").text:
        expect(resident).not_to_have_text("–")
    else:
        expect(resident).to_have_text("–")

    # A pyreft archive through the file input, with its positions.
    archive = tmp_path / "emoji-pyreft.zip"
    archive.write_bytes(emoji_zip())
    page.set_input_files("#upload-file", archive)
    expect(page.locator("#upload-name")).to_have_value("emoji-pyreft")
    expect(page.locator("#upload-positions")).to_be_enabled()
    page.fill("#upload-positions", "f2+l2")
    page.check("#upload-share")
    page.click("#upload-submit")
    expect(page.locator("#upload-message")).to_contain_text("uploaded emoji-pyreft")
    uploaded = api.get("/v1/adapters/emoji-pyreft")
    assert uploaded.status_code == 200 and uploaded.json()["positions"] == "f2+l2"
    expect(panel.locator("tr[data-name='emoji-pyreft'] td").nth(6)).to_have_text(uploaded.json()["sha256"][:12])

    # The same name again: the server's 409 is shown as it says it.
    tab.allow("/v1/adapters", 409)
    page.set_input_files("#upload-file", archive)
    page.fill("#upload-positions", "f2+l2")
    page.click("#upload-submit")
    expect(page.locator("#upload-message")).to_have_text(
        "adapter 'emoji-pyreft' exists; pass replace=true to replace it")

    # A native file dropped on the drop zone, as a drag and drop from the desktop would.
    data = base64.b64encode((REPO / "adapters" / "pirate.safetensors").read_bytes()).decode()
    transfer = page.evaluate_handle("""([name, b64]) => {
        const dt = new DataTransfer();
        dt.items.add(new File([Uint8Array.from(atob(b64), (c) => c.charCodeAt(0))], name));
        return dt;
    }""", ["pirate-2.safetensors", data])
    page.dispatch_event("#drop-zone", "drop", {"dataTransfer": transfer})
    expect(page.locator("#upload-name")).to_have_value("pirate-2")
    expect(page.locator("#upload-positions")).to_be_disabled()
    page.click("#upload-submit")
    expect(page.locator("#upload-message")).to_contain_text("uploaded pirate-2")

    # Pages as the API gives them, and a filter that reads on through them.
    page.select_option("#page-size", "5")
    want = api.get("/v1/adapters", params={"limit": 5}).json()
    expect(page.locator("#page-info")).to_contain_text("page 1")
    expect(page.locator("#adapter-table tbody tr[data-name]")).to_have_count(5)
    assert table_names(page) == [a["name"] for a in want["data"]] and want["has_more"]
    page.click("#page-next")
    expect(page.locator("#page-info")).to_contain_text("page 2")
    rest = api.get("/v1/adapters", params={"limit": 5, "after": want["next_after"]}).json()
    expect(page.locator("#adapter-table tbody tr[data-name]")).to_have_count(len(rest["data"]))
    assert table_names(page) == [a["name"] for a in rest["data"]]
    page.fill("#adapter-filter", "pirate")
    expect(page.locator("#adapter-table tbody tr[data-name]")).to_have_count(2)
    assert table_names(page) == ["pirate", "pirate-2"]
    page.fill("#adapter-filter", "")
    expect(page.locator("#adapter-table tbody tr[data-name]")).to_have_count(5)
    tab.shoot(shots, "adapters")

    # Delete asks once more, then the adapter is gone from the server too.
    page.select_option("#page-size", "25")
    delete = panel.locator("tr[data-name='pirate-2']").get_by_role("button", name="Delete pirate-2")
    delete.click()
    expect(delete).to_have_text("Confirm delete")
    delete.click()
    expect(panel.locator("tr[data-name='pirate-2']")).to_have_count(0)
    assert api.get("/v1/adapters/pirate-2").status_code == 404
    api.delete("/v1/adapters/emoji-pyreft")


def test_a_bad_upload_and_a_missing_admin_key_are_refused_with_the_server_message(new_tab, tmp_path):
    tab = ready(new_tab().open())
    page = tab.page
    tab.panel("Adapters")
    tab.allow("/v1/adapters", 400)
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"this is not an adapter")
    page.set_input_files("#upload-file", bad)
    page.click("#upload-submit")
    expect(page.locator("#upload-message")).to_contain_text("invalid adapter")
    # With the API key alone, an admin action says that it needs the admin key.
    tab.allow("/v1/adapters", 401)
    page.evaluate("() => sessionStorage.removeItem('reft.adminKey')")
    page.set_input_files("#upload-file", REPO / "adapters" / "cheer.safetensors")
    page.fill("#upload-name", "cheer-again")
    page.click("#upload-submit")
    expect(page.locator("#upload-message")).to_contain_text("this call needs the admin key")
    expect(page.locator("#keys-dialog")).to_be_hidden()  # an admin refusal is shown in place, not as a prompt


# ---- train -------------------------------------------------------------------------------------------------


def test_a_one_epoch_job_draws_its_loss_and_opens_in_compare(new_tab, api, shots):
    tab = ready(new_tab().open())
    page = tab.page
    tab.panel("Train")
    page.fill("#train-jsonl", "\n".join(json.dumps(e) for e in EXAMPLES[:3]) + "\n{oops")
    expect(page.locator("#train-count")).to_contain_text("JSONL line 4")
    page.fill("#train-jsonl", "\n".join(json.dumps(e) for e in EXAMPLES[:3]))
    rows = page.locator("#train-rows tbody tr")
    rows.first.locator(".row-prompt").fill(EXAMPLES[3]["prompt"])
    rows.first.locator(".row-completion").fill(EXAMPLES[3]["completion"])
    expect(page.locator("#train-count")).to_have_text("4 examples")
    page.fill("#train-name", "ui-trained")
    page.fill("#train-epochs", "1")
    page.fill("#train-batch", "1")
    page.fill("#train-positions", "l2")
    page.fill("#train-layers", "3, 9")
    page.click("#train-start")
    status = page.locator("#train-status")
    expect(status).to_have_attribute("data-status", "succeeded", timeout=WAIT_MS)
    expect(status).to_contain_text("step 4/4")
    assert page.locator("#loss-chart path.chart-line").count() == 1
    assert page.locator("#loss-chart circle.chart-dot").count() >= 1
    described = api.get("/v1/adapters/ui-trained").json()
    assert described["layers"] == [3, 9] and described["positions"] == "l2"
    tab.shoot(shots, "train")

    # The same name again: the server's refusal, in its words.
    tab.allow("/v1/adapters/train", 409)
    page.click("#train-start")
    expect(page.locator("#train-message")).to_have_text("adapter 'ui-trained' exists; pass replace=true to replace it")

    page.click("#train-compare")
    expect(page.locator("#panel-compare")).to_be_visible()
    expect(page.locator(".column .col-model").last).to_have_value("ui-trained")
    expect(page.locator("#model-names option[value='ui-trained']")).to_have_count(1)

    tab.panel("Train")
    # A long job, cancelled from the page: it registers nothing.
    page.fill("#train-name", "ui-never")
    page.fill("#train-epochs", "2000")  # 8,000 steps: within REFT_MAX_TRAIN_STEPS
    page.click("#train-start")
    expect(page.locator("#train-cancel")).to_be_enabled()
    page.click("#train-cancel")
    expect(status).to_have_attribute("data-status", "cancelled", timeout=WAIT_MS)
    assert api.get("/v1/adapters/ui-never").status_code == 404


# ---- server ------------------------------------------------------------------------------------------------


def test_the_server_panel_charts_the_metrics(new_tab, api, shots):
    tab = ready(new_tab().open())
    tab.panel("Server")
    expect(tab.page.locator("#server-ready")).to_have_attribute("data-status", "ready")
    for chart in ("queue", "running", "kv", "tokens"):  # a rate needs two samples
        expect(tab.page.locator(f"#chart-{chart} svg")).to_be_visible(timeout=10_000)
    exported = "vllm:prefix_cache_hits_total" in api.get("/metrics").text
    expect(tab.page.locator("#chart-prefix")).to_have_count(1 if exported else 0)
    tab.shoot(shots, "server")
