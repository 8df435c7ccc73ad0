"""The web page of `orchard serve` (/, orchard/serving/static) in a real browser, on the real native
stack: Debian's Chromium (/usr/bin/chromium, installed by deps/install.sh) driven by Playwright
(no browser download: `playwright install` is never run).

What is checked: the page and its assets come from the service alone, under a 'self' Content-Security-
Policy, and run without a script error or CSP violation; a photo set on the file input gets the top
label the API gives the same file, with confidence bars, and thumbnails of its similar lake images
that decode (its own lake copy first); the screenshot is not blank; when the API answers 401, the
page asks for the API key and retries with it; browsing by dataset shows the API's listing as
decoded thumbnails, and clicking one shows its key, metadata and neighbours.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image, ImageStat
from playwright.sync_api import Browser, ConsoleMessage, Page, expect, sync_playwright
from serving_fixtures import posted

from orchard.core.settings import Settings

pytestmark = pytest.mark.integration

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOT_DIR = Path(__file__).resolve().parents[2] / "out" / "test-serving-page"
TIMEOUT_MS = 60_000  # a prediction's first model call, or thumbnails streamed from MinIO
PAGE_SIZE, NEIGHBOURS, SIMILAR = 24, 8, 8  # as orchard/serving/static/app.js asks

ALL_DECODED = """(selector) => {
  const imgs = [...document.querySelectorAll(selector)];
  return imgs.length > 0 && imgs.every((img) => img.complete);
}"""
NATURAL_WIDTHS = "(imgs) => imgs.map((img) => img.naturalWidth)"
SHOWS_IDS = """([selector, ids]) => {
  const shown = [...document.querySelectorAll(selector)].map((fig) => fig.dataset.id);
  return JSON.stringify(shown) === JSON.stringify(ids);
}"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Headless Chromium (Playwright passes --no-sandbox: the suite runs as root)."""
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} is missing: run `make deps` (apt-get install chromium)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            headless=True,
            args=["--disable-gpu", "--disable-dev-shm-usage", "--force-device-scale-factor=1"],
        )
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser: Browser, stack: Settings, api) -> Iterator[Page]:
    """The service's page in a fresh context (empty sessionStorage), once its script ran; fails the
    test on an uncaught script error or a Content-Security-Policy violation."""
    context = browser.new_context(viewport={"width": 1280, "height": 1000}, base_url=stack.serve_url)
    context.set_default_timeout(TIMEOUT_MS)
    tab = context.new_page()
    problems: list[str] = []
    tab.on("pageerror", lambda exc: problems.append(f"script error: {exc}"))

    def console(message: ConsoleMessage) -> None:
        if message.type == "error" and "Content Security Policy" in message.text:
            problems.append(f"CSP violation: {message.text}")

    tab.on("console", console)
    try:
        response = tab.goto("/", wait_until="load")
        assert response is not None and response.ok
        # the first listing is rendered: the script ran
        expect(tab.locator("#page-info")).to_contain_text("images")
        yield tab
        assert not problems, problems
    finally:
        context.close()


def test_page_and_assets_come_from_the_service_under_a_self_csp(api: httpx.Client):
    index = api.get("/")
    assert index.status_code == 200 and index.headers["content-type"].startswith("text/html")
    csp = index.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp
    assert 'id="drop-input"' in index.text and "://" not in index.text  # nothing from elsewhere
    for asset, kind in (("/static/app.js", "javascript"), ("/static/style.css", "text/css")):
        response = api.get(asset)
        assert response.status_code == 200 and kind in response.headers["content-type"], asset
        assert "://" not in response.text, asset
    assert "/" not in api.get("/openapi.json").json()["paths"]  # the page is not part of the API


def test_a_photo_gets_the_api_prediction_and_similar_thumbnails(page: Page, api: httpx.Client, served):
    _, version, photos = served
    photo = photos[0]
    expected = posted(api, [photo], k=SIMILAR).json()["predictions"][0]

    page.locator("#drop-input").set_input_files(str(photo))
    result = page.locator("#prediction [data-testid=result]")
    expect(result).to_have_count(1)
    expect(result.locator(".top-label")).to_have_text(expected["top5"][0]["label"])
    expect(result.locator(".top5 li")).to_have_count(len(expected["top5"]))
    expect(result.locator(".model")).to_contain_text(version)
    expect(page.locator("#predict-error")).to_be_hidden()

    thumbs = page.locator("#similar .thumb")
    expect(thumbs).to_have_count(len(expected["similar"]))
    assert thumbs.first.get_attribute("data-id") == expected["id"]  # the photo's own copy in the lake
    page.wait_for_function(ALL_DECODED, arg="#similar img")
    widths = page.eval_on_selector_all("#similar img", NATURAL_WIDTHS)
    assert len(widths) == len(expected["similar"]) and all(width > 0 for width in widths), widths

    SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
    shot = page.screenshot(full_page=True, path=str(SCREENSHOT_DIR / "prediction.png"))
    with Image.open(io.BytesIO(shot)) as image:
        assert image.width >= 1000 and image.height >= 600, image.size
        spread = ImageStat.Stat(image.convert("L")).stddev[0]
    assert spread > 10, f"the screenshot is nearly blank (grey-level std {spread:.1f})"


def test_a_401_asks_for_the_api_key_and_retries_with_it(page: Page, api: httpx.Client, stack: Settings, served):
    _, _, photos = served
    # a key offered must be the right one, even on loopback: a wrong one stands for a missing one
    page.evaluate("() => sessionStorage.setItem('orchard-api-key', 'not-the-key')")
    page.locator("#drop-input").set_input_files(str(photos[1]))
    expect(page.locator("#predict-error")).to_contain_text("API key")
    expect(page.locator("#key-form")).to_be_visible()

    expected = posted(api, [photos[1]]).json()["predictions"][0]["top5"][0]["label"]
    page.locator("#api-key").fill(stack.secret("serve_api_key"))
    page.locator("#key-submit").click()
    expect(page.locator("#prediction .top-label")).to_have_text(expected)
    expect(page.locator("#predict-error")).to_be_hidden()
    expect(page.locator("#key-form")).to_be_hidden()
    assert page.evaluate("() => sessionStorage.getItem('orchard-api-key')") == stack.secret("serve_api_key")


def test_browsing_a_dataset_then_one_image_with_its_neighbours(page: Page, api: httpx.Client, served):
    ds, _, _ = served
    listing = api.get("/v1/images", params={"dataset": ds.name, "page": 1, "size": PAGE_SIZE}).json()
    assert listing["images"], listing

    page.locator("#filter-dataset").fill(ds.name)
    page.locator("#browse-submit").click()
    pages = math.ceil(listing["total"] / PAGE_SIZE)
    expect(page.locator("#page-info")).to_have_text(f"page 1 of {pages} · {listing['total']} images")
    page.wait_for_function(SHOWS_IDS, arg=["#browse .thumb", [row["id"] for row in listing["images"]]])
    thumbs = page.locator("#browse .thumb")
    first = listing["images"][0]
    expect(thumbs.first.locator("figcaption")).to_contain_text(first["label"])
    page.wait_for_function(ALL_DECODED, arg="#browse img")
    widths = page.eval_on_selector_all("#browse img", NATURAL_WIDTHS)
    assert all(width > 0 for width in widths), widths

    thumbs.first.click()
    details = page.locator("#details")
    expect(details.locator(".details-key")).to_have_text(first["key"])
    expect(details.locator(".metadata")).to_contain_text(ds.name)
    similar = api.get(f"/v1/images/{first['id']}/similar", params={"k": NEIGHBOURS}).json()["similar"]
    assert len(similar) == NEIGHBOURS
    page.wait_for_function(SHOWS_IDS, arg=["#neighbours .thumb", [row["id"] for row in similar]])
    page.wait_for_function(ALL_DECODED, arg="#details img, #neighbours img")
    widths = page.eval_on_selector_all("#details img, #neighbours img", NATURAL_WIDTHS)
    assert all(width > 0 for width in widths), widths
