"""The web page at `/` and the offline `/docs` + `/redoc`: plain HTTP checks, then end-to-end in
headless Chromium (Debian's `chromium`, driven by Playwright; skipped with the reason when absent).

The browser runs on a slowed model pack (a per-call UNet delay) so that progress is visible; the
tests wait on the DOM, never on a timing margin.
"""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from PIL import Image

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
UNET_DELAY_S = 0.3        # per UNet call: a 4-step image takes > 1 s, long enough to see it move
TIMEOUT_MS = 30_000       # generous: the machine may be loaded; the tests wait on the DOM, not on time


# --------------------------------------------------------------------------- plain HTTP
def test_page_is_served_as_html(app_client):
    response = app_client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "<label for=\"prompt\">Prompt</label>" in response.text
    for asset in ("ui/app.js", "ui/style.css"):
        assert asset in response.text
        assert app_client.get("/" + asset).status_code == 200
    assert app_client.get("/ui/index.html").status_code == 404, "only the listed assets are served"


def test_no_ui_turns_the_page_off_but_keeps_the_docs(make_client, settings_factory):
    client = make_client(settings_factory(ui=False))
    assert client.get("/").status_code == 404
    assert client.get("/ui/app.js").status_code == 404
    assert client.get("/docs").status_code == 200


def test_page_is_behind_auth(make_client, settings_factory):
    client = make_client(settings_factory(api_auth="alice:secret"))
    refused = client.get("/")
    assert refused.status_code == 401
    assert refused.headers["www-authenticate"] == "Basic"  # the browser's own prompt
    assert client.get("/", auth=("alice", "secret")).status_code == 200
    assert client.get("/docs").status_code == 401


@pytest.mark.parametrize("path", ["/docs", "/redoc"])
def test_docs_pages_load_their_assets_from_the_service(app_client, path):
    html = app_client.get(path).text
    assert "http://" not in html and "https://" not in html, "nothing from a CDN"
    for src in ("/docs/assets/swagger-ui/swagger-ui-bundle.js", "/docs/assets/swagger-ui/swagger-ui.css",
                "/docs/assets/redoc/redoc.standalone.js"):
        if src in html:
            response = app_client.get(src)
            assert response.status_code == 200 and len(response.content) > 100_000
    assert app_client.get("/docs/assets/../routers/ui.py").status_code == 404


def test_generate_shows_its_request_schema_in_the_docs(app_client):
    operation = app_client.get("/openapi.json").json()["paths"]["/generate"]["post"]
    schema = operation["requestBody"]["content"]["application/json"]["schema"]
    assert {"mode", "prompt", "seed", "init_image", "denoising_strength"} <= set(schema["properties"])


# --------------------------------------------------------------------------- browser
def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Debian chromium. Playwright starts it with an empty temporary --user-data-dir."""
    executable = _chromium()
    if executable is None:
        pytest.skip("chromium is not installed (apt-get install chromium); .ci/run installs it")
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="playwright is not installed (the dev extra has it)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


@pytest.fixture()
def open_page(browser: Any, live_server, settings_factory, wrap_factory) -> Iterator[Callable[..., Any]]:
    """open_page(path="/", delay=0, **settings) -> a Page on a fresh live server, with `page.server`,
    `page.requests` (every URL the browser asked for) and `page.off_host` (requests that would have
    left 127.0.0.1: they are aborted, as on a Pi without internet; CSP-blocked ones never get here)."""
    contexts = []

    def open_(path: str = "/", delay: float = 0.0, credentials: dict | None = None, **overrides: Any) -> Any:
        wrap = wrap_factory(delays={"unet": delay}) if delay else None
        server = live_server(settings_factory(**overrides), wrap=wrap)
        context = browser.new_context(viewport={"width": 1200, "height": 860}, http_credentials=credentials)
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.requests = []
        page.on("request", lambda request: page.requests.append(request.url))
        page.off_host = []
        host = urlsplit(server.url).netloc

        def refuse(route: Any) -> None:
            page.off_host.append(route.request.url)
            route.abort()

        context.route(lambda url: urlsplit(url).scheme in ("http", "https", "ws", "wss")
                      and urlsplit(url).netloc != host, refuse)
        page.server = server
        page.goto(server.url + path)
        return page

    yield open_
    for context in contexts:
        context.close()


def _wait_ready(page: Any) -> None:
    """The page has read /capabilities (the hints are filled)."""
    page.wait_for_function(
        "() => /^1–\\d+ on these models/.test(document.getElementById('steps-hint').textContent)")


def _generate(page: Any, prompt: str, **fields: str) -> None:
    _wait_ready(page)
    page.get_by_label("Prompt", exact=True).fill(prompt)
    for label, value in fields.items():
        page.get_by_label(label, exact=True).fill(value)
    page.get_by_role("button", name="Generate").click()


def _wait_images(page: Any, count: int | None = None) -> list[dict]:
    """Wait until the gallery's images are decoded; their natural sizes and captions."""
    page.wait_for_function(
        """(count) => {
          const imgs = [...document.querySelectorAll('#gallery img')];
          return imgs.length > 0 && (count === null || imgs.length === count)
            && imgs.every(i => i.complete && i.naturalWidth > 0)
            && !document.getElementById('generate').disabled;
        }""", arg=count)
    return page.eval_on_selector_all(
        "#gallery figure",
        """cards => cards.map(c => ({w: c.querySelector('img').naturalWidth,
                                    h: c.querySelector('img').naturalHeight,
                                    caption: c.querySelector('figcaption').textContent}))""")


def _save_screenshot(page: Any, tmp_path: Path) -> None:
    shot = page.screenshot(full_page=True)
    (tmp_path / "webui.png").write_bytes(shot)
    target = os.environ.get("WEBUI_SCREENSHOT")
    if target:
        Path(target).write_bytes(shot)


def test_generate_shows_progress_then_the_image_and_its_seed(open_page, tmp_path):
    page = open_page(delay=UNET_DELAY_S)
    _generate(page, "a lighthouse at dusk", Seed="1234")
    page.wait_for_function("() => Number(document.getElementById('progress').dataset.step) > 0")
    text = page.locator("#progress-text").text_content()
    assert "Image 1/1" in text and "step" in text
    cards = _wait_images(page, 1)
    assert cards[0]["w"] == 512 and cards[0]["h"] == 512
    assert "seed 1234" in cards[0]["caption"]
    assert "Seed: 1234" in page.locator("#infotext").text_content()
    assert page.locator("#progress").is_hidden()
    download = page.locator("#gallery a[download]")
    assert download.get_attribute("download").endswith("-1234.png")
    _save_screenshot(page, tmp_path)


def test_interrupt_stops_a_long_batch(open_page):
    page = open_page(delay=UNET_DELAY_S)
    _generate(page, "many foxes", **{"Batch count": "8"})
    page.wait_for_function("() => Number(document.getElementById('progress').dataset.images) === 8 &&"
                           " Number(document.getElementById('progress').dataset.step) > 0")
    page.get_by_role("button", name="Interrupt").click()
    page.wait_for_function("() => !document.getElementById('generate').disabled")
    assert "Interrupted" in page.locator("#warnings").text_content()
    assert page.locator("#gallery figure").count() < 8


def test_skip_goes_on_with_the_rest_of_the_batch(open_page):
    page = open_page(delay=UNET_DELAY_S)
    _generate(page, "two boats", **{"Batch count": "2"})
    page.wait_for_function("() => Number(document.getElementById('progress').dataset.image) === 1 &&"
                           " Number(document.getElementById('progress').dataset.step) > 0")
    page.get_by_role("button", name="Skip").click()
    assert len(_wait_images(page, 2)) == 2
    assert any(url.endswith("/sdapi/v1/skip") for url in page.requests)
    assert "Interrupted" not in page.locator("#warnings").text_content()


def test_img2img_from_an_uploaded_file(open_page, tmp_path):
    source = tmp_path / "source.png"
    Image.new("RGB", (300, 200), (200, 40, 40)).save(source)
    page = open_page()
    _wait_ready(page)
    page.get_by_role("tab", name="Image to image").click()
    page.set_input_files("#init-file", str(source))
    page.wait_for_function("() => document.getElementById('init-preview').naturalWidth === 300")
    page.get_by_label("Resize mode").select_option("1")
    _generate(page, "a watercolor painting", Seed="7")
    cards = _wait_images(page, 1)
    assert (cards[0]["w"], cards[0]["h"]) == (512, 512)
    assert "Denoising strength: 0.75" in page.locator("#infotext").text_content()


def test_use_this_result_feeds_img2img(open_page):
    page = open_page()
    _generate(page, "a red fox")
    _wait_images(page, 1)
    page.get_by_role("button", name="Use this result").click()
    assert page.locator("#img2img-controls").is_visible()
    page.get_by_role("button", name="Generate").click()
    page.wait_for_function(
        "() => document.getElementById('infotext').textContent.includes('Denoising strength')")


def test_unsupported_steps_show_the_services_warning(open_page):
    page = open_page()
    _generate(page, "a cat", Steps="20")
    _wait_images(page, 1)
    warnings = page.locator("#warnings")
    assert warnings.is_visible()
    assert "steps 20" in warnings.text_content() and "ran 8" in warnings.text_content()


def test_the_page_asks_nothing_beyond_the_service(open_page):
    page = open_page(live_previews=True, delay=UNET_DELAY_S)
    _generate(page, "a quiet lake", **{"Batch count": "2"})
    page.wait_for_function("() => document.getElementById('live-preview').src.startsWith('data:image/png')")
    _wait_images(page, 2)
    assert len(page.requests) > 5
    assert page.off_host == []


def test_busy_service_says_when_to_retry_and_a_waiting_request_can_leave(open_page):
    page = open_page(max_queue=1, delay=UNET_DELAY_S)
    # One job runs, one waits (max_queue=1): a third request is refused with a Retry-After.
    running, waiting = page.context.new_page(), page.context.new_page()
    for other in (running, waiting):
        other.set_default_timeout(TIMEOUT_MS)
        other.goto(page.server.url)
    _generate(running, "first", **{"Batch count": "8"})
    running.wait_for_function("() => Number(document.getElementById('progress').dataset.step) > 0")
    _generate(waiting, "second")
    waiting.wait_for_function("() => Number(document.getElementById('progress').dataset.queue) === 1")
    assert waiting.get_by_role("button", name="Skip").is_disabled(), "Skip would act on the running job"
    _generate(page, "third")
    page.wait_for_function("() => document.getElementById('message').textContent.includes('retry in')")
    assert "busy" in page.locator("#message").text_content()

    waiting.get_by_role("button", name="Interrupt").click()  # not running yet: it leaves the queue
    waiting.wait_for_function("() => document.getElementById('message').textContent.includes('Cancelled')")
    page.wait_for_function("async () => (await (await fetch('internal/pending-tasks')).json()).size === 0",
                           polling=200)
    assert running.locator("#progress").is_visible(), "the running job was not interrupted"
    running.get_by_role("button", name="Interrupt").click()
    running.wait_for_function("() => !document.getElementById('generate').disabled")


def test_interrogate_fills_the_prompt_from_the_demo_clip_models(open_page):
    page = open_page()
    _wait_ready(page)
    page.get_by_role("tab", name="Image to image").click()
    page.set_input_files("#init-file", files=[{"name": "a.png", "mimeType": "image/png",
                                              "buffer": _png_bytes((64, 64))}])
    page.wait_for_function("() => document.getElementById('init-preview').naturalWidth === 64")
    page.get_by_role("button", name="Interrogate").click()  # a red picture: the demo tags it `red`
    page.wait_for_function("() => document.getElementById('prompt').value.split(', ')[0] === 'red'")


def test_interrogate_button_hidden_without_clip_models(open_page, tmp_path):
    page = open_page(clip_vision_model=tmp_path / "nowhere.onnx")
    _wait_ready(page)
    page.get_by_role("tab", name="Image to image").click()
    assert page.get_by_role("button", name="Interrogate").is_hidden(), "interrogation is off on this service"


def _png_bytes(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_page_works_behind_basic_auth(open_page):
    page = open_page(api_auth="alice:secret", credentials={"username": "alice", "password": "secret"})
    _generate(page, "a locked door")
    assert _wait_images(page, 1)[0]["w"] == 512


@pytest.mark.parametrize("path, operation", [
    ("/docs", ".opblock-summary-path[data-path='/generate']"),
    ("/redoc", "[data-section-id='operation/generate_generate_post']"),
])
def test_docs_render_offline(open_page, path, operation):
    page = open_page(path)
    page.wait_for_selector(operation)
    if path == "/docs":
        assert page.locator(".opblock").count() > 20
    assert page.off_host == []

