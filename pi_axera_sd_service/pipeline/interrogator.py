"""The interrogation API the service calls: one `Interrogator` over loaded CLIP models.

All NPU work (`build_step`, `interrogate`, `structured`) is meant to run in the NPU worker, one call at a
time; `validate_categories` runs in the request handler before anything is queued.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from ..runtime.clip_models import ClipFiles, ClipModels, InterrogationOff, try_load_clip_models
from ..runtime.model_dir import Wrap
from .clip import (
    TEMPLATE,
    ClipEncoder,
    Interrogation,
    StructuredInterrogation,
    classify_categories,
    general_tags,
    pick_tags,
)
from .label_cache import LabelEmbeddingLRU, LabelIndex
from .tokenizer import ClipTokenizer


class CategoriesError(ValueError):
    """A structured request's `categories` is malformed or over a limit (the message names it): a 400."""


@dataclass(frozen=True)
class InterrogationLimits:
    """Scoring rules and request limits: the settings `interrogate_*` (their defaults are upstream's)."""

    threshold: float
    top_k: int
    general_threshold: float
    general_top_k: int
    max_categories: int
    max_labels_per_category: int
    max_label_chars: int

    @classmethod
    def from_settings(cls, settings: Any) -> InterrogationLimits:
        """From an object with the `interrogate_<field>` attributes (Settings; not imported here)."""
        return cls(**{name: getattr(settings, f"interrogate_{name}") for name in cls.__dataclass_fields__})


def validate_categories(categories: object, limits: InterrogationLimits) -> dict[str, list[str]]:
    """`{name: [label, ...]}` checked against the limits; CategoriesError naming the field or setting."""
    if not isinstance(categories, Mapping) or not categories:
        raise CategoriesError("'categories' must be a non-empty object of {category: [labels]}")
    if len(categories) > limits.max_categories:
        raise CategoriesError(
            f"{len(categories)} categories exceed the limit of {limits.max_categories} "
            "(setting interrogate_max_categories)"
        )
    checked: dict[str, list[str]] = {}
    for name, labels in categories.items():
        if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
            raise CategoriesError(f"category {name!r}: expected a list of label strings")
        if len(labels) > limits.max_labels_per_category:
            raise CategoriesError(
                f"category {name!r}: {len(labels)} labels exceed the limit of "
                f"{limits.max_labels_per_category} (setting interrogate_max_labels_per_category)"
            )
        for label in labels:
            if not label.strip():
                raise CategoriesError(f"category {name!r}: labels must not be empty")
            if len(label) > limits.max_label_chars:
                raise CategoriesError(
                    f"category {name!r}: a label of {len(label)} characters exceeds the limit of "
                    f"{limits.max_label_chars} (setting interrogate_max_label_chars)"
                )
        checked[str(name)] = list(labels)
    return checked


class Interrogator:
    """CLIP interrogation: tag-list index (built in slices), category LRU, the two answers."""

    def __init__(self, models: ClipModels, tokenizer: ClipTokenizer, cache_dir: Path | None,
                 limits: InterrogationLimits, lru_size: int, template: str = TEMPLATE):
        self.models = models
        self.limits = limits
        self.encoder = ClipEncoder(models, tokenizer, template)
        dim = models.text_projection.shape[1]
        self.index = LabelIndex(models.tags, self.encoder.embed_labels, cache_dir,
                                models.text_fingerprint, template, dim)
        self.category_labels = LabelEmbeddingLRU(self.encoder.embed_labels, lru_size, fallback=self.index)

    @property
    def tags_complete(self) -> bool:
        return self.index.complete

    def build_step(self, max_labels: int) -> bool:
        """Encode up to `max_labels` more tags (call between jobs until it returns True)."""
        return self.index.build_step(max_labels)

    def interrogate(self, image: Image.Image) -> Interrogation:
        """Tags of the image from the tag list (what is encoded so far until the cache is complete)."""
        scores = self.index.scores(self.encoder.embed_image(image))
        tags = pick_tags(scores.scores, scores.labels, self.limits.threshold, self.limits.top_k)
        return Interrogation(tags, scores.complete, scores.ready, scores.total)

    def structured(self, image: Image.Image, categories: Mapping[str, list[str]]) -> StructuredInterrogation:
        """Winner and confidence per category (validate with `validate_categories` first) + general tags."""
        image_embedding = self.encoder.embed_image(image)
        wanted = [label for labels in categories.values() for label in labels]
        embeddings = self.category_labels.get_many(wanted)
        results = classify_categories(image_embedding, categories, embeddings)
        scores = self.index.scores(image_embedding)
        general = general_tags(scores.scores, scores.labels, self.limits.general_threshold,
                               self.limits.general_top_k)
        return StructuredInterrogation(results, general, scores.complete, scores.ready, scores.total)


def open_interrogator(clip_files: ClipFiles, backend: str, tokenizer: ClipTokenizer, settings: Any,
                      wrap: Wrap | None = None) -> Interrogator | InterrogationOff:
    """Load the CLIP models and build the Interrogator from Settings, or say why interrogation is off.

    `clip_files`: `resolve_clip_files(backend, text_model_dir=files.tokenizer_dir.parent,
    **settings.clip_paths())`; `tokenizer`: the pipeline's (same vocabulary). The tag cache is not built
    here: call `build_step` between jobs.
    """
    loaded = try_load_clip_models(clip_files, backend, settings.device_id, wrap, settings.cache_dir)
    if isinstance(loaded, InterrogationOff):
        return loaded
    return Interrogator(loaded, tokenizer, settings.cache_dir, InterrogationLimits.from_settings(settings),
                        settings.interrogate_label_cache_size)
