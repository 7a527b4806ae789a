"""What the tests inspect: every session created (not part of pyaxengine)."""

from __future__ import annotations

from typing import Any

created: list[dict[str, Any]] = []
