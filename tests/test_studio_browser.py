"""The web studio in a real browser (marker `browser`, `make test-browser`): Debian's Chromium
driven by Playwright against the real app on 127.0.0.1 (uvicorn, SQLite, the embedded tiny
model, a job worker the tests pause to keep a job queued).

Every request the page makes to anything but 127.0.0.1 is blocked and recorded, and each test
asserts none was attempted. Waits are Playwright's auto-waiting assertions with generous
timeouts (a slow shared 2-core machine), never sleeps. Screenshots go to
`$AVATAR_STUDIO_ARTIFACTS` (default `out/studio-browser/`).
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest

pytest.importorskip("playwright", reason="playwright is in the dev extra (make install)")
from playwright.sync_api import expect, sync_playwright  # noqa: E402

from studio_support import StudioServer, astronaut_jpeg, png_data_url  # noqa: E402

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("AVATAR_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("AVATAR_STUDIO_ARTIFACTS", Path(__file__).resolve().parent.parent / "out" / "studio-browser"))
JOB_S = 180_000  # ms: a tiny-model job on a loaded 2-core machine, with margin
UI_S = 30_000
HOSTILE = '<img src=x onerror="window.__pwned=1"><b>bold</b>'

if not shutil.which(CHROMIUM) and not Path(CHROMIUM).exists():
    pytest.skip(f"no Chromium at {CHROMIUM} (make test-browser installs Debian's)", allow_module_level=True)


@pytest.fixture(scope="module")
def server():
    srv = StudioServer()
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


class Session:
    """One browser context (one person) with every off-loopback request blocked and recorded."""

    def __init__(self, browser, server, key: str | None = None):
        self.server = server
        self.offsite: list[str] = []
        self.errors: list[str] = []
        self.context = browser.new_context(viewport={"width": 1200, "height": 900})
        self.context.route("**/*", self._route)
        self.page = self.context.new_page()
        self.page.set_default_timeout(UI_S)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("dialog", lambda d: d.accept())
        if key:
            self.sign_in(key)

    def _route(self, route):
        host = urlparse(route.request.url).hostname
        if route.request.url.startswith(("data:", "blob:")) or host == "127.0.0.1":
            route.continue_()
        else:
            self.offsite.append(route.request.url)
            route.abort()

    def sign_in(self, key: str) -> None:
        page = self.page
        page.goto(f"{self.server.url}/studio")
        page.get_by_label("API key").fill(key)
        page.get_by_role("button", name="Sign in").click()
        expect(page.get_by_role("heading", name="Create")).to_be_visible()

    def nav(self, name: str) -> None:
        self.page.locator("#nav").get_by_role("button", name=name, exact=True).click()

    def shot(self, name: str) -> None:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)

    def close(self) -> None:
        self.context.close()
        assert self.offsite == [], f"requests left 127.0.0.1: {self.offsite}"
        assert self.errors == [], f"script errors on the page: {self.errors}"


@pytest.fixture
def person(browser, server):
    sessions = []

    def make(key: str | None = None) -> Session:
        sessions.append(Session(browser, server, key))
        return sessions[-1]

    yield make
    for s in sessions:
        s.close()


def _api(server, key: str):
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def _generate(s: Session, prompt: str, batch: str = "1") -> None:
    page = s.page
    page.locator("#generate-prompt").fill(prompt)
    page.locator("#generate-batchSize").fill(batch)
    page.locator("#form-generate").get_by_role("button", name="Generate").click()


def test_sign_in_generate_watch_and_escape(server, person):
    acct, key = server.account()
    s = person(key)
    page = s.page
    # The price comes from the API (per-image cost × batch), before submitting.
    cost = _api(server, key).get("/v1/account").json()["costs"]["generatePerImage"]
    per_image = cost[server.engine.default_model]
    page.locator("#generate-batchSize").fill("2")
    expect(page.locator("#form-generate .cost")).to_contain_text(f"Costs {2 * per_image} credit")
    s.shot("01-create")
    _generate(s, HOSTILE + " astronaut portrait", "2")
    expect(page.locator("#watch-status")).to_have_text("completed", timeout=JOB_S)
    expect(page.locator("#watch-result .images img")).to_have_count(2)
    # The worker's live previews (the tiny profile's TAESD decoder): at least one frame was shown,
    # a small JPEG the worker encoded, captioned with its image and step.
    expect(page.locator("#watch-preview")).to_have_attribute("src", re.compile(r"^data:image/jpeg;base64,"))
    expect(page.locator("#watch-preview-caption")).to_have_text(re.compile(r"^Preview of image [12] at step (5|10|15|20)$"))
    expect(page.locator("#watch-progress")).to_have_attribute("value", re.compile(r"^[1-9]"))
    expect(page.locator("#watch-result dl.facts")).to_contain_text("Seed")
    s.shot("02-watch-completed")
    page.get_by_role("button", name="Open avatar page").click()
    prompt = page.locator(".avatar-prompt")
    expect(prompt).to_have_text(HOSTILE + " astronaut portrait")  # shown as text ...
    assert prompt.locator("img, b").count() == 0  # ... never parsed as HTML
    assert page.evaluate("window.__pwned === undefined")
    assert "Authorization: Bearer $AVATAR_API_KEY" in page.locator("#curl-text").input_value()
    assert key not in page.locator("#curl-text").input_value()
    # The key lives in session storage only: not in the URL, not in local storage or cookies.
    assert key not in page.url
    assert page.evaluate("sessionStorage.getItem('avatarStudio.apiKey')") == key
    assert page.evaluate("localStorage.length") == 0 and s.context.cookies() == []


def test_refused_field_is_highlighted(server, person):
    _, key = server.account()
    s = person(key)
    _generate(s, "a portrait", "9")  # the API allows 1..4 per request
    field = s.page.locator("#generate-batchSize")
    expect(field).to_have_attribute("aria-invalid", "true")
    error = s.page.locator("#form-generate [data-error-for=batchSize]")
    expect(error).not_to_be_empty()
    assert field.get_attribute("aria-describedby") == error.get_attribute("id")
    s.shot("03-refused-field")


def test_style_picker_follows_the_model_and_sends_the_lora_strength(server, person):
    """The style list is the model's (GET /v1/models: built-ins + its LoRA styles); the strength
    slider appears only for a style with a LoRA; the avatar page names the LoRA applied."""
    _, key = server.account()
    s = person(key)
    page = s.page
    names = page.locator("#generate-stylePreset option").evaluate_all("os => os.map(o => o.value)")
    assert {"", "professional", "anime", "pixel-art", "watercolor"} <= set(names)
    slider = page.locator("#form-generate .style-strength")
    expect(slider).to_be_hidden()
    page.locator("#generate-stylePreset").select_option("anime")
    expect(slider).to_be_hidden()
    page.locator("#generate-stylePreset").select_option("watercolor")
    expect(slider).to_be_visible()
    page.locator("#generate-styleStrength").evaluate(
        "e => { e.value = '1.5'; e.dispatchEvent(new Event('input', {bubbles: true})); }")
    expect(page.locator("#form-generate .style-strength output")).to_have_text("1.5")
    _generate(s, "a lighthouse keeper")
    expect(page.locator("#watch-status")).to_have_text("completed", timeout=JOB_S)
    avatar = _api(server, key).get("/v1/avatars").json()["avatars"][0]
    assert avatar["styleStrength"] == 1.5 and avatar["style"]["lora"]["name"] == "watercolor-tiny"
    page.get_by_role("button", name="Open avatar page").click()
    expect(page.locator(".avatar-style")).to_contain_text("LoRA watercolor-tiny")
    s.shot("03b-style")


def test_percify_with_the_bundled_photo(server, person, tmp_path):
    _, key = server.account()
    s = person(key)
    page = s.page
    page.get_by_role("tab", name="Percify yourself").click()
    page.locator("#percify-photos").set_input_files(str(astronaut_jpeg(tmp_path / "astronaut.jpg")))
    expect(page.locator("#percify-thumbs img")).to_have_count(1)
    page.locator("#form-percify").get_by_role("button", name="Percify").click()
    expect(page.locator("#watch-status")).to_have_text("completed", timeout=JOB_S)
    expect(page.locator("#watch-result table.identity")).to_contain_text("Similarity")
    s.shot("04-percify")


def test_cast_two_characters_with_drawn_boxes(server, person, tmp_path):
    _, key = server.account()
    s = person(key)
    page = s.page
    page.get_by_role("tab", name="Cast").click()
    page.locator("#cast-prompt").fill("two astronauts on the moon")
    photos = [astronaut_jpeg(tmp_path / "a.jpg"), astronaut_jpeg(tmp_path / "b.jpg", (40, 0, 460, 420))]
    for i, photo in enumerate(photos):
        page.get_by_label(f"Character {i + 1} prompt").fill(f"astronaut number {i + 1}")
        page.get_by_label(f"Character {i + 1} photos").set_input_files(str(photo))
    canvas = page.locator("#cast-canvas")
    drawn = ((0.02, 0.48), (0.52, 0.98))
    for i, (x0, x1) in enumerate(drawn):
        page.locator("#cast-active").select_option(str(i))
        canvas.scroll_into_view_if_needed()
        box = canvas.bounding_box()  # viewport coordinates, after scrolling
        page.mouse.move(box["x"] + x0 * box["width"], box["y"] + 0.1 * box["height"])
        page.mouse.down()
        page.mouse.move(box["x"] + x1 * box["width"], box["y"] + 0.9 * box["height"], steps=5)
        page.mouse.up()
    s.shot("05-cast-boxes")
    page.locator("#form-cast").get_by_role("button", name="Cast").click()
    expect(page.locator("#watch-status")).to_have_text("completed", timeout=JOB_S)
    chars = page.locator("#watch-result table.identity tbody tr")
    expect(chars).to_have_count(2)
    s.shot("06-cast-done")
    avatar_id = page.locator("#watch-id").text_content()
    sent = _api(server, key).get(f"/v1/avatars/{avatar_id}").json()["characters"]
    for c, (x0, x1) in zip(sent, drawn):  # the boxes drawn on the canvas were sent
        assert c["box"] == pytest.approx([x0, 0.1, x1, 0.9], abs=0.02)


def test_publish_then_like_and_comment_from_another_account(server, person):
    _, key_a = server.account()
    _, key_b = server.account()
    a = person(key_a)
    _generate(a, "a published portrait")
    expect(a.page.locator("#watch-status")).to_have_text("completed", timeout=JOB_S)
    a.page.get_by_role("button", name="Open avatar page").click()
    a.page.get_by_role("button", name="Publish").click()
    expect(a.page.get_by_role("button", name="Unpublish")).to_be_visible()
    b = person(key_b)
    b.nav("Community")
    b.page.locator("#feed-list .card-open", has_text="a published portrait").first.click()
    b.page.get_by_role("button", name="Like").click()
    expect(b.page.locator("#avatar-likes")).to_have_text("1")
    expect(b.page.get_by_role("button", name="Unlike")).to_be_visible()
    b.page.get_by_label("Your comment").fill(HOSTILE)
    b.page.get_by_role("button", name="Comment").click()
    comment = b.page.locator("#comment-list .comment-text")
    expect(comment).to_have_text(HOSTILE)
    assert b.page.locator("#comment-list img, #comment-list b").count() == 0
    assert b.page.evaluate("window.__pwned === undefined")
    b.shot("07-liked-and-commented")
    # The owner sees the like and the comment (as text) too.
    a.page.reload()
    a.nav("My avatars")
    a.page.locator("#mine-list .card-open", has_text="a published portrait").first.click()
    expect(a.page.locator("#avatar-likes")).to_have_text("1")
    expect(a.page.locator("#comment-list .comment-text")).to_have_text(HOSTILE)


def test_cancel_a_queued_job_refunds_it(server, person):
    _, key = server.account(credits=100)
    s = person(key)
    server.worker.pause()
    try:
        _generate(s, "never generated")
        expect(s.page.locator("#watch-status")).to_have_text("queued")
        expect(s.page.locator("#watch-queue")).to_contain_text("position 1")
        s.shot("08-queued")
        s.page.get_by_role("button", name="Cancel").click()
        expect(s.page.locator("#watch-status")).to_have_text("cancelled")
    finally:
        server.worker.running.set()
    client = _api(server, key)
    assert client.get("/v1/account").json()["credits"] == 100  # refunded
    mine = client.get("/v1/avatars").json()["avatars"]
    assert [(a["status"], a["creditsUsed"]) for a in mine] == [("cancelled", 0)]  # the record stays


def test_preview_frames_and_cancel_while_processing(server, person):
    """What the worker's preview hook and step-boundary cancel look like in the page: a job is
    claimed by hand (the test plays the worker), previews are stored with its progress."""
    _, key = server.account(credits=100)
    s = person(key)
    server.worker.pause()
    try:
        created = _api(server, key).post("/v1/avatars/generate", json={"prompt": "previewed"}).json()
        jobs = server.store.claim_jobs("studio-test", 1)
        assert [j.id for j in jobs] == [created["id"]]
        token = jobs[0].lease_token
        s.nav("My avatars")
        s.page.locator("#mine-list .card-open", has_text="previewed").first.click()
        expect(s.page.locator(".avatar-prompt")).to_have_text("previewed")
        s.page.get_by_role("button", name="Watch live").click()
        expect(s.page.locator("#watch-status")).to_have_text("processing")
        frame = {"imageIndex": 0, "step": 3, "dataUrl": png_data_url()}
        server.store.set_progress("studio-test", {created["id"]: token}, 3, 10, previews={created["id"]: [frame]})
        expect(s.page.locator("#watch-preview")).to_be_visible()
        expect(s.page.locator("#watch-preview")).to_have_attribute("src", frame["dataUrl"])
        expect(s.page.locator("#watch-progress")).to_have_attribute("value", "3")
        s.shot("09-preview")
        s.page.get_by_role("button", name="Cancel").click()
        expect(s.page.locator("#watch-status")).to_have_text("processing (cancel requested)")
        assert server.store.cancel_requested([created["id"]]) == {created["id"]}
        assert server.store.finish_cancelled(created["id"], token).status == "cancelled"
        expect(s.page.locator("#watch-status")).to_have_text("cancelled")
    finally:
        server.worker.running.set()
    assert _api(server, key).get("/v1/account").json()["credits"] == 100


def test_keyboard_only_sign_in_and_tabs(server, person):
    _, key = server.account()
    s = person()
    page = s.page
    page.goto(f"{server.url}/studio")
    expect(page.get_by_label("API key")).to_be_visible()
    reached = []
    for _ in range(4):  # the key field is among the first stops of the tab order
        page.keyboard.press("Tab")
        reached.append(page.evaluate("document.activeElement.id || document.activeElement.outerHTML.slice(0, 80)"))
        if reached[-1] == "api-key":
            break
    assert reached[-1] == "api-key", reached
    page.keyboard.type(key)
    page.keyboard.press("Enter")
    expect(page.get_by_role("heading", name="Create")).to_be_visible()
    page.get_by_role("tab", name="Generate").focus()
    page.keyboard.press("ArrowRight")
    expect(page.get_by_role("tab", name="Percify yourself")).to_have_attribute("aria-selected", "true")
    expect(page.locator("#form-percify")).to_be_visible()


@pytest.mark.parametrize("view", ["signin", "create", "account"])
def test_no_serious_accessibility_violations(server, person, view):
    from axe_playwright_python.sync_playwright import Axe

    _, key = server.account()
    s = person(None if view == "signin" else key)
    if view == "signin":
        s.page.goto(f"{server.url}/studio")
    elif view == "account":
        s.nav("Account")
        expect(s.page.locator("#account-summary dt").first).to_be_visible()
    results = Axe().run(s.page)  # axe-core, injected by the test only
    serious = [v for v in results.response["violations"] if v.get("impact") in ("serious", "critical")]
    assert serious == [], [(v["id"], v["help"], [n["target"] for n in v["nodes"]]) for v in serious]


def test_security_headers_and_offline_docs(server, person):
    resp = httpx.get(f"{server.url}/studio")
    csp = resp.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self';" in csp and "unsafe-inline" not in csp
    assert "img-src 'self' data: blob:" in csp
    assert "<script>" not in resp.text and "style=" not in resp.text  # nothing inline for the CSP to refuse
    js = httpx.get(f"{server.url}/studio/static/js/main.js")
    assert js.status_code == 200 and "javascript" in js.headers["content-type"]
    assert js.headers["content-security-policy"] == csp
    s = person()
    s.page.goto(f"{server.url}/v1/docs")
    expect(s.page.locator(".swagger-ui .info .title")).to_contain_text("Avatar API", timeout=60_000)
    expect(s.page.locator(".opblock-summary-path").first).to_be_visible()
    s.shot("10-docs-offline")
