"""CLIP interrogation in numpy: preprocessing, image/label embeddings, and the upstream scoring rules.

- Preprocessing as CLIP's image processor: shortest side to 224 (Pillow bicubic, long side truncated as
  `int(224 * long / short)`), centre crop 224 (offsets rounded down), /255, CLIP mean/std, NCHW float32.
  Images come from `images.decode_image_b64` (RGB, alpha on white, EXIF orientation applied).
- Labels are prompted as `a photo of a {label}`, tokenized by our ClipTokenizer (same vocabulary).
- Embeddings: pooled output @ projection, L2-normalised.
- `pick_tags`: cosine >= threshold, best first, top-k; the single best tag when none passes.
  `caption` = the tags joined with ", " (upstream service; A1111's CLIP caption is also comma-separated).
- `classify`: softmax over 100 x cosine within a category -> winner and confidence.
- `general_tags`: the top-k tags by cosine, keeping those with cosine > threshold.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from ..runtime.clip_models import CLIP_MEAN, CLIP_STD, IMAGE_SIZE, ClipModels
from ..runtime.session import prepare_feed
from .conditioning import tokenize_weighted
from .tokenizer import ClipTokenizer

TEMPLATE = "a photo of a {label}"
LOGIT_SCALE = 100.0  # CLIP's trained temperature, as upstream


# --- preprocessing -------------------------------------------------------------------------------


def preprocess(image: Image.Image, size: int = IMAGE_SIZE) -> np.ndarray:
    """RGB image -> pixel_values float32 [1,3,size,size]."""
    image = image.convert("RGB")
    width, height = image.size
    short, long = min(width, height), max(width, height)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if width <= height else (new_long, size)
    resized = image.resize((new_w, new_h), resample=Image.Resampling.BICUBIC)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    cropped = resized.crop((left, top, left + size, top + size))
    pixels = np.asarray(cropped, dtype=np.float32) / 255.0
    normalised = (pixels - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)
    return np.ascontiguousarray(normalised.transpose(2, 0, 1)[None], dtype=np.float32)


def normalise_rows(vectors: np.ndarray) -> np.ndarray:
    """Each row scaled to unit L2 norm (zero rows stay zero)."""
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)


# --- embeddings ----------------------------------------------------------------------------------


def label_ids(tokenizer: ClipTokenizer, label: str, template: str = TEMPLATE) -> np.ndarray:
    """int32 [1,77]: BOS, the templated label's tokens (at most 75), EOS, padding."""
    ids = tokenize_weighted(tokenizer, [(template.format(label=label), 1.0)])[0]
    return ids.astype(np.int32)[None]


class ClipEncoder:
    """Image and label embeddings (unit vectors of CLIP's 512-d joint space) from loaded ClipModels."""

    def __init__(self, models: ClipModels, tokenizer: ClipTokenizer, template: str = TEMPLATE):
        self.models = models
        self.tokenizer = tokenizer
        self.template = template
        self._ids_name = models.text.inputs[0].name
        self._pixels_name = models.vision.inputs[0].name

    def embed_image(self, image: Image.Image) -> np.ndarray:
        """float32 [512], unit norm: one vision call."""
        vision = self.models.vision
        feed = prepare_feed(vision, {self._pixels_name: preprocess(image)})
        pooled = vision.run(feed)[self.models.vision_pooled]
        return normalise_rows(pooled.reshape(1, -1) @ self.models.visual_projection)[0]

    def label_ids(self, label: str) -> np.ndarray:
        return label_ids(self.tokenizer, label, self.template)

    def embed_labels(self, labels: Sequence[str]) -> np.ndarray:
        """float32 [len(labels),512], unit rows: one text call per label (the models are batch 1)."""
        text = self.models.text
        rows = [
            text.run(prepare_feed(text, {self._ids_name: self.label_ids(label)}))[self.models.text_pooled]
            .reshape(-1)
            for label in labels
        ]
        if not rows:
            return np.zeros((0, self.models.text_projection.shape[1]), dtype=np.float32)
        return normalise_rows(np.stack(rows) @ self.models.text_projection)


# --- scoring -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TagScore:
    tag: str
    score: float


def top_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest scores, best first (a partial sort: the tag list has ~20,000 entries)."""
    k = min(k, len(scores))
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    best = np.argpartition(-scores, k - 1)[:k]
    return best[np.argsort(-scores[best], kind="stable")]


def pick_tags(scores: np.ndarray, labels: Sequence[str], threshold: float, top_k: int) -> list[TagScore]:
    """Tags with cosine >= threshold, best first, at most top_k; the single best when none passes."""
    if len(labels) == 0:
        return []
    order = top_indices(scores, max(top_k, 1))
    passing = [TagScore(labels[i], float(scores[i])) for i in order[:top_k] if scores[i] >= threshold]
    return passing or [TagScore(labels[order[0]], float(scores[order[0]]))]


def caption_of(tags: Sequence[TagScore]) -> str:
    """The upstream caption: the tags joined with ", "."""
    return ", ".join(tag.tag for tag in tags)


def general_tags(scores: np.ndarray, labels: Sequence[str], threshold: float, top_k: int) -> list[str]:
    """The top_k labels by cosine, keeping those with cosine > threshold (upstream order: best first)."""
    return [labels[i] for i in top_indices(scores, top_k) if scores[i] > threshold]


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max())
    return shifted / shifted.sum()


def classify(image_embedding: np.ndarray, label_embeddings: np.ndarray, labels: Sequence[str]
             ) -> tuple[str, float]:
    """(winner, confidence): softmax over 100 x cosine of the labels of one category."""
    probabilities = softmax(LOGIT_SCALE * (label_embeddings @ image_embedding).astype(np.float64))
    best = int(np.argmax(probabilities))
    return labels[best], float(probabilities[best])


# --- results -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Interrogation:
    """What /sdapi/v1/interrogate answers; `complete` is False while the tag cache is still building."""

    tags: list[TagScore]
    complete: bool = True
    labels_ready: int = 0
    labels_total: int = 0

    @property
    def caption(self) -> str:
        return caption_of(self.tags)

    def response(self) -> dict:
        """`{caption, interrogations: [{tag, score}]}`, plus `tags_complete: false` and `tags_prepared`
        ("ready/total") while the tag list is still being prepared."""
        body: dict = {
            "caption": self.caption,
            "interrogations": [{"tag": t.tag, "score": t.score} for t in self.tags],
        }
        if not self.complete:
            body["tags_complete"] = False
            body["tags_prepared"] = f"{self.labels_ready}/{self.labels_total}"
        return body


@dataclass(frozen=True)
class CategoryResult:
    winner: str
    confidence: float


@dataclass(frozen=True)
class StructuredInterrogation:
    """What /sdapi/v1/interrogate/structured answers."""

    results: dict[str, CategoryResult]
    general_tags: list[str] = field(default_factory=list)
    complete: bool = True
    labels_ready: int = 0
    labels_total: int = 0

    def response(self) -> dict:
        """`{results: {category: {winner, confidence}}, general_tags: [...]}` (+ the two progress keys
        of `Interrogation.response` while the tag list is still being prepared)."""
        body: dict = {
            "results": {
                name: {"winner": r.winner, "confidence": r.confidence} for name, r in self.results.items()
            },
            "general_tags": list(self.general_tags),
        }
        if not self.complete:
            body["tags_complete"] = False
            body["tags_prepared"] = f"{self.labels_ready}/{self.labels_total}"
        return body


def classify_categories(
    image_embedding: np.ndarray, categories: Mapping[str, Sequence[str]], embeddings: Mapping[str, np.ndarray]
) -> dict[str, CategoryResult]:
    """Per category: winner and confidence; `embeddings` maps each label to its unit vector.

    Categories with no labels are left out (upstream).
    """
    results: dict[str, CategoryResult] = {}
    for name, labels in categories.items():
        if not labels:
            continue
        matrix = np.stack([embeddings[label] for label in labels])
        winner, confidence = classify(image_embedding, matrix, labels)
        results[name] = CategoryResult(winner, confidence)
    return results
