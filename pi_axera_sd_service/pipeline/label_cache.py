"""Label embeddings: the tag list's, built in slices and kept on disk; category labels' in an LRU.

`LabelIndex` encodes the tag list a slice at a time (`build_step`, run by the NPU worker between jobs)
and answers `scores` from what is done so far. The finished matrix is saved as
`<cache_dir>/clip_labels/<key>.npy`, the key being sha256 of the text model's fingerprint, the list and
the template, so a second start loads it instead of encoding again and a changed list is rebuilt.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

Encode = Callable[[Sequence[str]], np.ndarray]  # labels -> float32 [n,dim], unit rows
CACHE_SUBDIR = "clip_labels"


def index_key(text_fingerprint: str, labels: Sequence[str], template: str) -> str:
    """sha256 over the text model's fingerprint, the list (one label a line) and the template."""
    digest = hashlib.sha256()
    for part in (text_fingerprint, "\n".join(labels), template):
        digest.update(hashlib.sha256(part.encode("utf-8")).digest())
    return digest.hexdigest()


@dataclass(frozen=True)
class LabelScores:
    """Cosines of an image against the labels encoded so far."""

    scores: np.ndarray  # float32 [ready]
    labels: Sequence[str]  # the first `ready` labels
    complete: bool
    total: int

    @property
    def ready(self) -> int:
        return len(self.labels)


class LabelIndex:
    """The tag list's embeddings: loaded from disk, or built `build_step` by `build_step`."""

    def __init__(self, labels: Sequence[str], encode: Encode, cache_dir: Path | None,
                 text_fingerprint: str, template: str, dim: int = 512):
        self.labels = list(labels)
        self._encode = encode
        self.key = index_key(text_fingerprint, self.labels, template)
        self.path = Path(cache_dir) / CACHE_SUBDIR / f"{self.key}.npy" if cache_dir is not None else None
        self._lock = threading.Lock()
        self._matrix = np.zeros((len(self.labels), dim), dtype=np.float32)
        self._ready = 0
        self._positions = {name: i for i, name in reversed(list(enumerate(self.labels)))}  # first wins
        self.loaded_from_disk = self._load()

    @property
    def total(self) -> int:
        return len(self.labels)

    @property
    def ready(self) -> int:
        return self._ready

    @property
    def complete(self) -> bool:
        return self._ready == self.total

    def _load(self) -> bool:
        if self.path is None or not self.path.is_file():
            return False
        try:
            matrix = np.load(self.path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            log.warning("tag embedding cache %s unreadable (%s): rebuilding it", self.path, exc)
            return False
        if matrix.shape != self._matrix.shape:
            log.warning("tag embedding cache %s has shape %s, expected %s: rebuilding it",
                        self.path, matrix.shape, self._matrix.shape)
            return False
        self._matrix = np.ascontiguousarray(matrix, dtype=np.float32)
        self._ready = self.total
        return True

    def build_step(self, max_labels: int) -> bool:
        """Encode up to `max_labels` more labels; save to disk when the last one is done. Returns done."""
        if self.complete:
            return True
        start = self._ready
        stop = min(self.total, start + max(1, max_labels))
        rows = self._encode(self.labels[start:stop])
        with self._lock:
            self._matrix[start:stop] = rows
            self._ready = stop
        if self.complete:
            self._save()
        return self.complete

    def build_all(self, slice_size: int = 256) -> None:
        """Build to the end (one-shot tools; the service uses `build_step` between jobs)."""
        while not self.build_step(slice_size):
            pass

    def _save(self) -> None:
        """Atomic write; a read-only cache folder only costs a rebuild on the next start."""
        if self.path is None:
            return
        temp: str | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, temp = tempfile.mkstemp(prefix=".labels_", suffix=".npy", dir=self.path.parent)
            with os.fdopen(fd, "wb") as handle:
                np.save(handle, self._matrix)
            os.replace(temp, self.path)
            temp = None
        except OSError as exc:
            log.warning("cannot save the tag embedding cache to %s: %s", self.path, exc)
        finally:
            if temp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(temp)

    def scores(self, image_embedding: np.ndarray) -> LabelScores:
        """Cosines against the labels done so far (all of them once `complete`)."""
        with self._lock:
            ready = self._ready
            scores = self._matrix[:ready] @ image_embedding
        return LabelScores(scores.astype(np.float32), self.labels[:ready], ready == self.total, self.total)

    def embedding(self, label: str) -> np.ndarray | None:
        """The unit vector of `label` when it is in the list and already encoded, else None."""
        position = self._positions.get(label)
        if position is None or position >= self._ready:
            return None
        return self._matrix[position]


class LabelEmbeddingLRU:
    """Embeddings of on-demand labels (structured categories), the `max_entries` most recent kept."""

    def __init__(self, encode: Encode, max_entries: int, fallback: LabelIndex | None = None):
        self._encode = encode
        self.max_entries = max_entries
        self._fallback = fallback
        self._entries: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get_many(self, labels: Sequence[str]) -> dict[str, np.ndarray]:
        """label -> unit vector for every label; only the ones not cached are encoded (one batch)."""
        found: dict[str, np.ndarray] = {}
        missing: list[str] = []
        with self._lock:
            for label in dict.fromkeys(labels):
                if label in self._entries:
                    self._entries.move_to_end(label)
                    found[label] = self._entries[label]
                    self.hits += 1
                    continue
                known = self._fallback.embedding(label) if self._fallback is not None else None
                if known is not None:
                    found[label] = known
                    self.hits += 1
                else:
                    missing.append(label)
        if missing:
            rows = self._encode(missing)
            with self._lock:
                self.misses += len(missing)
                for label, row in zip(missing, rows, strict=True):
                    found[label] = row
                    self._entries[label] = row
                    self._entries.move_to_end(label)
                while len(self._entries) > self.max_entries:
                    self._entries.popitem(last=False)
        return found
