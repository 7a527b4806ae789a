"""Shared helpers for the compatibility suite: the target, images, payloads, warnings."""

from __future__ import annotations

import base64
import io
import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from PIL import Image

PAYLOAD_DIR = Path(__file__).parent / "payloads"
MODEL_SIZE = (512, 512)  # what the SD1.5-LCM models produce, on the Pi and in the demo pack
INIT_IMAGE = "<init_image>"  # raw base64 PNG, injected at run time
INIT_IMAGE_URI = "<init_image_data_uri>"  # the same as a data: URI


@dataclass
class Target:
    """The server under test."""

    base_url: str
    auth: tuple[str, str] | None = None
    demo: bool = False
    log_path: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def host(self) -> str:
        return urlsplit(self.base_url).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        parts = urlsplit(self.base_url)
        return parts.port or (443 if parts.scheme == "https" else 80)

    @property
    def https(self) -> bool:
        return urlsplit(self.base_url).scheme == "https"

    def url(self, path: str) -> str:
        return self.base_url.rstrip("/") + path

    def basic_header(self) -> str:
        """`Basic <b64(user:pass)>`, or `Basic ` (empty credentials) without auth, as SillyTavern sends."""
        creds = ":".join(self.auth) if self.auth else ""
        return "Basic " + base64.b64encode(creds.encode()).decode()


def parse_auth(value: str | None) -> tuple[str, str] | None:
    """`user:pass` -> (user, pass)."""
    if not value:
        return None
    user, _, password = value.partition(":")
    return user, password


def make_init_image(width: int = 96, height: int = 64) -> Image.Image:
    """A small non-square RGB test card (gradient + block), so resize modes differ."""
    img = Image.new("RGB", (width, height))
    px = img.load()
    for y in range(height):
        for x in range(width):
            px[x, y] = (x * 255 // max(1, width - 1), y * 255 // max(1, height - 1), 96)
    for y in range(height // 4, height // 2):
        for x in range(width // 4, width // 2):
            px[x, y] = (240, 240, 240)
    return img


def png_b64(img: Image.Image) -> str:
    """Raw base64 PNG (no prefix)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def data_uri(img: Image.Image) -> str:
    return "data:image/png;base64," + png_b64(img)


def decode_image(b64: str) -> Image.Image:
    """Decode raw base64 the way most clients do (`base64.b64decode` + PIL), fully loading it."""
    img = Image.open(io.BytesIO(base64.b64decode(b64)))
    img.load()
    return img


def assert_model_image(img: Image.Image) -> None:
    """A generated image has the models' size and real content."""
    assert img.size == MODEL_SIZE, f"image size {img.size}, expected {MODEL_SIZE}"
    assert img.mode in ("RGB", "RGBA"), f"image mode {img.mode}"


def load_payload(name: str) -> dict[str, Any]:
    return json.loads((PAYLOAD_DIR / f"{name}.json").read_text())


def all_payload_names() -> list[str]:
    return sorted(p.stem for p in PAYLOAD_DIR.glob("*.json"))


def inject_images(obj: Any, img: Image.Image) -> Any:
    """Replace `<init_image>` / `<init_image_data_uri>` placeholders anywhere in a JSON value."""
    if isinstance(obj, str):
        if obj == INIT_IMAGE:
            return png_b64(img)
        if obj == INIT_IMAGE_URI:
            return data_uri(img)
        return obj
    if isinstance(obj, list):
        return [inject_images(v, img) for v in obj]
    if isinstance(obj, dict):
        return {k: inject_images(v, img) for k, v in obj.items()}
    return obj


def warnings_about(warnings: list[str], field_name: str) -> list[str]:
    """Warnings whose text names the field (case-insensitive substring)."""
    return [w for w in warnings if field_name.lower() in str(w).lower()]


def warnings_naming(warnings: list[str], field_name: str) -> list[str]:
    """Warnings that name the field as a word (no letter or digit on either side), for "no warning" checks."""
    pattern = re.compile(r"(?<![a-z0-9])" + re.escape(field_name.lower()) + r"(?![a-z0-9])")
    return [w for w in warnings if pattern.search(str(w).lower())]


def response_warnings(route: str, body: dict[str, Any]) -> list[str]:
    """Warnings as each route returns them: `warnings` on /generate, `info.warnings` on /sdapi."""
    if route == "/generate":
        return list(body.get("warnings") or [])
    info = json.loads(body["info"])
    return list(info.get("warnings") or [])


def is_busy(progress: dict[str, Any]) -> bool:
    """A1111 progress while a job runs (the inverse of the idle check clients use)."""
    state = progress.get("state") or {}
    return bool(state.get("job")) or state.get("job_count", 0) != 0 or progress.get("progress", 0) != 0


def is_idle(progress: dict[str, Any]) -> bool:
    """The idle check of webuiapi `util_wait_for_ready` and SillyTavern `/set-model`."""
    return progress["progress"] == 0.0 and progress["state"]["job_count"] == 0


class Background:
    """Run one call on a thread and keep its result or exception."""

    def __init__(self, fn: Callable[[], Any]):
        self.result: Any = None
        self.error: BaseException | None = None
        self.started = time.monotonic()
        self.finished: float | None = None
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self.result = fn()
        except BaseException as exc:  # noqa: BLE001 - reported by get()
            self.error = exc
        finally:
            self.finished = time.monotonic()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def get(self, timeout: float = 120.0) -> Any:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"call still running after {timeout} s"
        if self.error is not None:
            raise self.error
        return self.result


def poll_while(bg: Background, poll: Callable[[], dict[str, Any]], interval: float = 0.02,
               limit: float = 120.0) -> list[tuple[bool, dict[str, Any]]]:
    """Poll progress until `bg` ends; returns (call_still_running_after_answer, progress) pairs."""
    seen: list[tuple[bool, dict[str, Any]]] = []
    deadline = time.monotonic() + limit
    while bg.alive() and time.monotonic() < deadline:
        answer = poll()
        seen.append((bg.alive(), answer))
        time.sleep(interval)
    return seen


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def interrogation_available(target: Target) -> bool:
    """What /capabilities says: a deployment without the CLIP models answers the routes with 501."""
    import requests

    caps = requests.get(target.url("/capabilities"), auth=target.auth, timeout=30).json()
    return bool(caps.get("interrogate", {}).get("available"))


def assert_structured_answer(body: dict[str, Any], categories: dict[str, list[str]]) -> None:
    """What the picker's panel reads: a winner from each category's labels, a confidence in [0,1]."""
    assert set(body["results"]) == set(categories)
    for name, result in body["results"].items():
        assert result["winner"] in categories[name], f"{name}: {result['winner']!r} is not one of its labels"
        assert 0.0 <= result["confidence"] <= 1.0
    assert isinstance(body["general_tags"], list) and all(isinstance(t, str) for t in body["general_tags"])
