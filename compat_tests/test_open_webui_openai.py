"""Open WebUI's "OpenAI" image engine, replayed against /v1/images/* (IMAGES_OPENAI_API_BASE_URL = <base>/v1).

Source: open-webui/open-webui `backend/open_webui/routers/images.py` @02530d5 (`image_generations`,
`image_edits`) and `config.py` (IMAGE_SIZE "512x512", IMAGE_URL_RESPONSE_MODELS_REGEX_PATTERN "^gpt-image").
Open WebUI posts with aiohttp, calls `raise_for_status()`, then reads `res['data']`: each item's `url`,
else its `b64_json`, which it decodes assuming image/png when the string holds no `,`.
"""

from __future__ import annotations

import base64
import io
import re
import uuid

import pytest
import requests
from PIL import Image

from compat_tests.helpers import MODEL_SIZE, make_init_image

pytestmark = pytest.mark.client("Open WebUI (OpenAI engine)")

API_KEY = ""  # IMAGES_OPENAI_API_KEY left empty: Open WebUI still sends `Bearer `
URL_RESPONSE_MODELS = r"^gpt-image"  # these models get no response_format
AIOHTTP_HEADERS = {"User-Agent": "Python/3.11 aiohttp/3.12.15", "Accept": "*/*",
                   "Accept-Encoding": "gzip, deflate"}


@pytest.fixture()
def base(target) -> str:
    if target.auth is not None:
        pytest.skip("the server requires HTTP Basic; Open WebUI's OpenAI engine sends only a Bearer key "
                    "(configure API_KEYS for it)")
    return target.url("/v1")


def _headers(json_body: bool) -> dict[str, str]:
    headers = {**AIOHTTP_HEADERS, "Authorization": f"Bearer {API_KEY}"}
    if json_body:
        headers["Content-Type"] = "application/json"
    return headers


def _generation_body(prompt: str, n: int = 1, model: str = "dall-e-2", size: str = "512x512",
                     params: dict | None = None) -> dict:
    """`data` of image_generations: model (IMAGE_GENERATION_MODEL or dall-e-2), prompt, n, size,
    response_format unless the model matches ^gpt-image, then IMAGES_OPENAI_API_PARAMS on top."""
    body = {"model": model, "prompt": prompt, "n": n, "size": size}
    if not re.match(URL_RESPONSE_MODELS, model):
        body["response_format"] = "b64_json"
    return {**body, **(params or {})}


def _read_images(r: requests.Response) -> list[Image.Image]:
    """raise_for_status, then each item: url (fetched) or b64_json (get_image_data: image/png without ',')."""
    r.raise_for_status()
    res = r.json()
    images = []
    for item in res["data"]:
        assert not item.get("url"), "a url would be fetched; this service answers b64_json"
        data = item["b64_json"]
        assert "," not in data, "Open WebUI would split a data: header off; we send raw base64"
        img = Image.open(io.BytesIO(base64.b64decode(data)))
        assert img.format == "PNG", "Open WebUI stores it as image/png"
        img.load()
        assert img.size == MODEL_SIZE
        images.append(img)
    return images


def test_generate_with_the_default_model(base):
    body = _generation_body("a cozy reading nook with a cat, warm lighting")
    r = requests.post(f"{base}/images/generations", json=body, headers=_headers(True), timeout=120)
    assert len(_read_images(r)) == 1


def test_generate_n_from_the_chat_form(base):
    body = _generation_body("a red fox in the snow", n=2)
    r = requests.post(f"{base}/images/generations", json=body, headers=_headers(True), timeout=120)
    assert len(_read_images(r)) == 2


def test_generate_gpt_image_model_sends_no_response_format(base):
    body = _generation_body("a lighthouse at dusk", model="gpt-image-1", size="1024x1024")
    assert "response_format" not in body
    r = requests.post(f"{base}/images/generations", json=body, headers=_headers(True), timeout=120)
    assert len(_read_images(r)) == 1, "without response_format the answer must still carry b64_json"


def test_sd_extras_through_images_openai_api_params(base):
    """An admin can put SD fields in IMAGES_OPENAI_API_PARAMS; the same seed gives the same image."""
    params = {"seed": 42, "steps": 4, "negative_prompt": "text"}
    body = _generation_body("a lighthouse at dusk", params=params)
    first = requests.post(f"{base}/images/generations", json=body, headers=_headers(True), timeout=120)
    second = requests.post(f"{base}/images/generations", json=body, headers=_headers(True), timeout=120)
    assert _read_images(first)[0].tobytes() == _read_images(second)[0].tobytes()


def _image_file(field: str, img: Image.Image) -> tuple[str, tuple[str, io.BytesIO, str]]:
    """get_image_file_item: (field, (<uuid>.png, bytes, mime from the data: URI))."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    buf.seek(0)
    return field, (f"{uuid.uuid4()}.png", buf, "image/png")


def test_edit_one_image(base):
    """image_edits with one image: fields as strings (n only when given), the file under `image`."""
    data = {"model": "dall-e-2", "prompt": "the same scene in winter", "response_format": "b64_json"}
    files = [_image_file("image", make_init_image())]
    r = requests.post(f"{base}/images/edits", data=data, files=files, headers=_headers(False), timeout=120)
    assert len(_read_images(r)) == 1


def test_edit_image_list_with_size_and_n(base):
    """A list of images goes as repeated `image[]` parts; IMAGE_EDIT_SIZE gives `size`."""
    data = {"model": "dall-e-2", "prompt": "watercolor", "n": "2", "size": "512x512",
            "response_format": "b64_json"}
    files = [_image_file("image[]", make_init_image()), _image_file("image[]", make_init_image(64, 96))]
    r = requests.post(f"{base}/images/edits", data=data, files=files, headers=_headers(False), timeout=120)
    assert len(_read_images(r)) == 2
