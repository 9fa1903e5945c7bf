"""The web studio at /, in real headless Chromium (Debian's `chromium`, driven by Playwright), against
the running tiny system with API keys on: a user enters a key, submits a job, watches its progress
arrive over the WebSocket up to 100%, plays the video and downloads it; another user's browser does
not see it; a job is cancelled from the queue. Then CORS as a browser enforces it: a page on an allowed
loopback origin reads the API's answers, one on another origin cannot.

A screenshot of the studio is written to $WAN_TEST_ARTIFACTS (or a temporary folder); its path is printed."""

from __future__ import annotations

import io
import json
import os
import tomllib
from collections.abc import Iterator
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from playwright.sync_api import Browser, Page, expect, sync_playwright

from gateway.keys import KeyStore
from gateway.web import STUDIO_DIR
from tests.helpers import ROOT, System, keyed_view

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 60_000



def make_keys(s: System) -> None:
    store = KeyStore(s.state_dir / "keys.sqlite3")
    try:
        for name in ("alice", "bob"):
            s.tokens[name] = store.create(s.key_prefix + name)[1]
    finally:
        store.close()
    s.key_tokens.extend(v for k, v in s.tokens.items() if k != "admin")


@pytest.fixture(scope="module")
def system(keyed_system: System) -> System:
    """The session's keyed system (one job in the pipeline at a time, so a job submitted behind
    another waits queued; `origins[0]` allowed), with this module's own users."""
    view = keyed_view(keyed_system, "studio-")
    make_keys(view)
    return view


@pytest.fixture(scope="module")
def origins(foreign_origins: tuple[str, str]) -> tuple[str, str]:
    return foreign_origins


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():  # a failure, not a skip: .ci/run installs Debian's chromium package
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium package (apt-get install chromium)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = Path(os.environ["WAN_TEST_ARTIFACTS"]) if os.environ.get("WAN_TEST_ARTIFACTS") \
        else tmp_path_factory.mktemp("studio-artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def open_studio(browser: Browser, system: System, token: str, requested: list[str] | None = None) -> Page:
    """A new browser session (its own session storage) on the studio, signed in with `token`; every
    URL the page requests is added to `requested`."""
    page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    if requested is not None:
        page.on("request", lambda request: requested.append(request.url))
    page.goto(system.url + "/")
    page.get_by_label("API key", exact=True).fill(token)
    page.get_by_role("button", name="Connect").click()
    expect(page.get_by_role("status", name="Live updates")).to_have_text("Live")
    assert not errors, errors
    return page


def test_page_and_its_files_need_no_key_and_are_package_data(system: System) -> None:
    no_key = {"Authorization": ""}
    status, headers, content = system.request("GET", "/", headers=no_key)
    assert status == 200 and headers["content-type"].startswith("text/html") and b"Wan Studio" in content
    assert "default-src 'self'" in headers["content-security-policy"]
    files = sorted(p for p in STUDIO_DIR.iterdir() if p.is_file())
    assert {p.name for p in files} >= {"index.html", "app.js", "api.js", "studio.css"}
    for path in files:
        status, headers, content = system.request("GET", f"/studio/{path.name}", headers=no_key)
        assert status == 200 and content == path.read_bytes(), path.name
        if path.suffix == ".js":  # module scripts need a JavaScript type
            assert "javascript" in headers["content-type"], headers["content-type"]
    status, _, content = system.request("GET", "/studio/missing.js", headers=no_key)
    assert status == 404 and json.loads(content)["error"]["code"] == "NOT_FOUND"
    status, _, content = system.request("GET", "/api/v1/jobs", headers=no_key)  # the API still needs one
    assert status == 401 and json.loads(content)["error"]["code"] == "UNAUTHORIZED"
    # An installed gateway serves them too: pyproject's package data covers every file.
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["gateway"]
    for path in files:
        assert any(fnmatch(f"studio/{path.name}", g) for g in globs), path.name


def job_card(page: Page, job_id: str) -> Any:
    return page.locator(f'li[data-job-id="{job_id}"]')


def watch_progress(page: Page) -> None:
    """Record every value each job's progress bar shows, as the page changes it."""
    page.evaluate("""() => {
      window.progressSeen = {};
      new MutationObserver((records) => {
        for (const r of records) {
          const id = r.target.closest("li[data-job-id]")?.dataset.jobId;
          if (id && r.target.tagName === "PROGRESS") (window.progressSeen[id] ??= []).push(r.target.value);
        }
      }).observe(document.body, {subtree: true, attributes: true, attributeFilter: ["aria-valuetext"]});
    }""")


def submit(page: Page, prompt: str, preset: str = "draft", model: str = "t2v-A14B", image: bytes | None = None,
           **options: str) -> str:
    page.get_by_label("Prompt", exact=True).fill(prompt)
    page.get_by_label("Model", exact=True).select_option(model)
    page.get_by_label("Quality preset", exact=True).select_option(preset)
    if image is not None:
        page.get_by_label("Image", exact=True).set_input_files({"name": "cat.png", "mimeType": "image/png",
                                                                "buffer": image})
        expect(page.get_by_role("img", name="Selected image")).to_be_visible()
    if options:
        advanced = page.locator("details#advanced")
        if not advanced.evaluate("d => d.open"):
            page.get_by_text("Advanced options").click()
        for label, value in options.items():
            page.get_by_label(label, exact=True).fill(value)
    before = set(page.locator("li[data-job-id]").evaluate_all("els => els.map(e => e.dataset.jobId)"))
    page.get_by_role("button", name="Generate").click()
    queue = page.get_by_role("list", name="Queue")
    card = queue.get_by_role("listitem").filter(has_text=prompt)
    expect(card).to_have_count(1)
    job_id: str = card.get_attribute("data-job-id") or ""
    assert len(job_id) == 32 and job_id not in before
    return job_id


def test_submit_watch_play_download_and_users_apart(system: System, browser: Browser, artifacts: Path) -> None:
    requested: list[str] = []
    page = open_studio(browser, system, system.tokens["alice"], requested)
    assert page.evaluate("sessionStorage.getItem('wan.apiKey')") == system.tokens["alice"]
    expect(page.get_by_text("Nothing queued or running.")).to_be_visible()
    watch_progress(page)
    job_id = submit(page, "a red fox runs through fresh snow")

    results = page.get_by_role("list", name="Results")
    card = results.get_by_role("listitem").filter(has_text="a red fox runs through fresh snow")
    expect(card).to_have_attribute("data-job-id", job_id)
    expect(card.get_by_text("Done", exact=True)).to_be_visible()
    seen = page.evaluate("id => window.progressSeen[id] || []", job_id)
    assert seen and seen[-1] == 100 and seen == sorted(seen), seen  # live, never backwards, to 100%
    assert any(0 < v < 100 for v in seen), seen  # steps in between arrived over the WebSocket
    assert system.json("GET", f"/api/v1/status/{job_id}")[1]["status"] == "completed"

    # The <video> loads and plays in the page.
    video = card.locator("video")
    expect(video).to_be_visible()
    duration = video.evaluate("""v => new Promise((resolve, reject) => {
      const done = () => resolve(v.duration);
      if (v.readyState >= 1) done(); else { v.onloadedmetadata = done; v.onerror = () => reject(v.error.message); }
    })""")
    assert duration > 0
    played = video.evaluate("""async v => {
      await v.play();
      await new Promise((resolve) => {
        const tick = () => v.currentTime > 0 ? resolve() : requestAnimationFrame(tick);
        tick();
      });
      return {time: v.currentTime, width: v.videoWidth, height: v.videoHeight};
    }""")
    params = system.json("GET", f"/api/v1/result/{job_id}")[1]["metadata"]["params"]
    assert played["time"] > 0 and (played["width"], played["height"]) == (params["width"], params["height"])
    expect(card).to_contain_text(f"{params['width']}×{params['height']}")

    # Download: the link holds the MP4 the server serves.
    link = card.get_by_role("link", name="Download: a red fox runs through fresh snow")
    assert link.get_attribute("download") == f"{job_id}.mp4"
    size, head = link.evaluate("""async a => {
      const bytes = new Uint8Array(await (await fetch(a.href)).arrayBuffer());
      return [bytes.length, String.fromCharCode(...bytes.slice(4, 8))];
    }""")
    served = system.request("GET", f"/api/v1/files/{job_id}.mp4")[2]
    assert head == "ftyp" and size == len(served)

    # Everything came from the gateway (or is a blob: of what the page fetched from it): no CDN.
    foreign = [u for u in requested if not u.startswith((system.url + "/", "blob:", "data:"))]
    assert requested and not foreign, foreign

    shot = artifacts / "studio.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"studio screenshot: {shot}")
    assert shot.stat().st_size > 10_000

    # The key lasts for the browser session: a reload does not ask again.
    page.reload()
    expect(page.get_by_role("status", name="Live updates")).to_have_text("Live")
    expect(page.get_by_label("API key", exact=True)).to_be_hidden()
    expect(job_card(page, job_id)).to_have_count(1)

    # Another user, in another browser session, sees none of it.
    other = open_studio(browser, system, system.tokens["bob"])
    expect(other.get_by_text("Finished videos show here.")).to_be_visible()
    expect(other.locator("li[data-job-id]")).to_have_count(0)
    other.context.close()
    page.context.close()


def test_cancel_from_the_queue(system: System, browser: Browser, artifacts: Path) -> None:
    # A long job runs first (one job in the pipeline at a time), so the one from the page waits queued.
    blocker = system.submit(prompt="a long job ahead", custom_options={"steps": 100, "num_frames": 33,
                                                                       "resolution": "64x64"})
    try:
        page = open_studio(browser, system, system.tokens["alice"])
        job_id = submit(page, "a job to cancel", Steps="3")
        queue = page.get_by_role("list", name="Queue")
        page.screenshot(path=str(artifacts / "studio-queue.png"), full_page=True)
        queue.get_by_role("button", name="Cancel: a job to cancel").click()
        card = page.get_by_role("list", name="Results").get_by_role("listitem").filter(has_text="a job to cancel")
        expect(card.get_by_text("Cancelled", exact=True)).to_be_visible()
        expect(queue.locator(f'li[data-job-id="{job_id}"]')).to_have_count(0)
        assert system.json("GET", f"/api/v1/status/{job_id}")[1]["status"] == "cancelled"
        stored = system.stored_job(job_id)
        assert stored is not None and stored["params"]["steps"] == 3  # the advanced option went through
        page.context.close()
    finally:
        system.request("POST", f"/api/v1/cancel/{blocker}")
        system.wait_final(blocker)


def test_cors_in_the_browser(system: System, browser: Browser, origins: tuple[str, str]) -> None:
    allowed, refused = origins
    token = system.tokens["bob"]  # who never submits a job here
    api = system.url + "/api/v1"
    ws = f"ws://127.0.0.1:{system.port}/ws"
    get = {"headers": {"Authorization": f"Bearer {token}"}}
    # A JSON POST with a key: the browser preflights it.
    post = {"method": "POST", "headers": {"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            "body": "{}"}
    context = browser.new_context()
    try:
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(allowed + "/")
        got = page.evaluate("([url, init]) => callGateway(url, init)", [f"{api}/jobs", get])
        assert got["read"] and got["status"] == 200 and got["body"]["total"] == 0, got  # bob's own: none
        got = page.evaluate("([url, init]) => callGateway(url, init)", [f"{api}/cancel/{'0' * 32}", post])
        assert got["read"] and got["status"] == 404 and got["body"]["error"]["code"] == "JOB_NOT_FOUND", got
        got = page.evaluate("([url, init]) => callGateway(url, init)", [f"{api}/jobs", {}])
        assert got["read"] and got["status"] == 401 and got["body"]["error"]["code"] == "UNAUTHORIZED", got
        assert page.evaluate("([url, token]) => openSocket(url, token)", [ws, token]) == \
            {"open": True, "protocol": "wan.bearer"}

        page.goto(refused + "/")
        for init in (get, post):
            got = page.evaluate("([url, init]) => callGateway(url, init)", [f"{api}/jobs", init])
            assert got == {"read": False, "error": "TypeError"}, got  # the browser hides the 403
        assert page.evaluate("([url, token]) => openSocket(url, token)", [ws, token])["open"] is False
    finally:
        context.close()


def test_without_keys_on_a_loopback_server(api_system: System, browser: Browser) -> None:
    """With auth off (the tiny profile on loopback) the page asks for no key and plays the video straight
    from the server's URL (streamed with HTTP Range). The image field shows for the models that take one,
    and an image-to-video job goes up as multipart."""
    context = browser.new_context()
    try:
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(api_system.url + "/")
        expect(page.get_by_role("status", name="Live updates")).to_have_text("Live")
        expect(page.get_by_label("API key", exact=True)).to_be_hidden()
        expect(page.get_by_role("button", name="Forget API key")).to_be_hidden()
        image_field = page.get_by_label("Image", exact=True)
        page.get_by_label("Model", exact=True).select_option("t2v-A14B")
        expect(image_field).to_be_hidden()
        page.get_by_label("Model", exact=True).select_option("i2v-A14B")
        expect(image_field).to_be_visible()
        expect(page.get_by_text("Required for this model.")).to_be_visible()
        png = io.BytesIO()
        Image.new("RGB", (48, 32), (200, 60, 40)).save(png, format="PNG")
        job_id = submit(page, "a paper boat on a puddle, no key needed", model="i2v-A14B", image=png.getvalue())
        card = page.get_by_role("list", name="Results").locator(f'li[data-job-id="{job_id}"]')
        expect(card.get_by_text("Done", exact=True)).to_be_visible()
        video = card.locator("video")
        expect(video).to_have_attribute("src", f"/api/v1/files/{job_id}.mp4")
        duration = video.evaluate("""v => new Promise((resolve, reject) => {
          if (v.readyState >= 1) resolve(v.duration);
          else { v.onloadedmetadata = () => resolve(v.duration); v.onerror = () => reject(v.error.message); }
        })""")
        assert duration > 0
        stored = api_system.stored_job(job_id)
        assert stored is not None and stored["model"] == "i2v-A14B" and stored["params"]["image_sha256"]
    finally:
        context.close()
