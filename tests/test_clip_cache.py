"""The tag-list embedding cache (slices, disk, invalidation) and the category-label LRU."""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pi_axera_sd_service.pipeline.clip import TEMPLATE
from pi_axera_sd_service.pipeline.interrogator import InterrogationLimits, Interrogator
from pi_axera_sd_service.pipeline.label_cache import LabelEmbeddingLRU, LabelIndex
from pi_axera_sd_service.pipeline.tokenizer import ClipTokenizer
from pi_axera_sd_service.runtime.clip_models import load_clip_models, resolve_clip_files
from pi_axera_sd_service.settings import Settings
from tests.conftest import WrapRecorder

DIM = 8
LABELS = [f"label {i}" for i in range(23)]


class CountingEncoder:
    """A deterministic fake text encoder: a unit vector per label, every label it encodes counted."""

    def __init__(self) -> None:
        self.encoded: list[str] = []

    def __call__(self, labels: Sequence[str]) -> np.ndarray:
        self.encoded += list(labels)
        rows = [np.random.default_rng(zlib.crc32(label.encode())).normal(0, 1, DIM) for label in labels]
        matrix = np.array(rows, np.float32).reshape(-1, DIM)
        return matrix / np.linalg.norm(matrix, axis=1, keepdims=True)


def index(encoder: CountingEncoder, cache: Path, labels: Sequence[str] = LABELS,
          fingerprint: str = "text-model-a", template: str = TEMPLATE) -> LabelIndex:
    return LabelIndex(labels, encoder, cache, fingerprint, template, DIM)


def test_build_steps_encode_slices_and_scores_answer_from_what_is_done(tmp_path: Path) -> None:
    encoder = CountingEncoder()
    tags = index(encoder, tmp_path)
    image = encoder(["an image"])[0]
    encoder.encoded.clear()
    assert not tags.complete and tags.scores(image).ready == 0
    assert tags.build_step(5) is False
    assert encoder.encoded == LABELS[:5]
    partial = tags.scores(image)
    assert (partial.ready, partial.total, partial.complete) == (5, 23, False)
    assert list(partial.labels) == LABELS[:5]
    steps = 1
    while not tags.build_step(5):
        steps += 1
    assert steps + 1 == 5 and encoder.encoded == LABELS  # 5+5+5+5+3, each label once
    full = tags.scores(image)
    assert full.complete and np.allclose(full.scores, encoder(LABELS) @ image, atol=1e-6)


def test_cache_is_built_once_and_survives_a_restart(tmp_path: Path) -> None:
    first_encoder = CountingEncoder()
    first = index(first_encoder, tmp_path)
    first.build_all(slice_size=7)
    assert not first.loaded_from_disk and len(first_encoder.encoded) == len(LABELS)
    saved = list((tmp_path / "clip_labels").glob("*.npy"))
    assert [p.name for p in saved] == [f"{first.key}.npy"]

    second_encoder = CountingEncoder()
    second = index(second_encoder, tmp_path)  # a new process: new object, same folder
    assert second.loaded_from_disk and second.complete and second.build_step(5)
    assert second_encoder.encoded == []
    image = first_encoder(["x"])[0]
    assert np.array_equal(second.scores(image).scores, first.scores(image).scores)


@pytest.mark.parametrize("change", ["list", "order", "template", "text model"])
def test_cache_is_rebuilt_when_its_inputs_change(tmp_path: Path, change: str) -> None:
    index(CountingEncoder(), tmp_path).build_all()
    kwargs = {
        "list": {"labels": [*LABELS, "one more"]},
        "order": {"labels": LABELS[::-1]},
        "template": {"template": "a picture of {label}"},
        "text model": {"fingerprint": "text-model-b"},
    }[change]
    encoder = CountingEncoder()
    changed = index(encoder, tmp_path, **kwargs)
    assert not changed.loaded_from_disk and not changed.complete
    changed.build_all()
    assert len(encoder.encoded) == len(changed.labels)


def test_a_corrupt_cache_file_is_rebuilt(tmp_path: Path) -> None:
    built = index(CountingEncoder(), tmp_path)
    built.build_all()
    built.path.write_bytes(b"not an npy file")
    again = index(CountingEncoder(), tmp_path)
    assert not again.loaded_from_disk and again.ready == 0


def test_lru_encodes_only_misses_and_evicts_the_least_recent(tmp_path: Path) -> None:
    encoder = CountingEncoder()
    lru = LabelEmbeddingLRU(encoder, max_entries=3)
    first = lru.get_many(["red", "green", "red"])
    assert encoder.encoded == ["red", "green"] and set(first) == {"red", "green"}
    lru.get_many(["red", "blue"])  # red refreshed; blue added
    assert encoder.encoded == ["red", "green", "blue"] and (lru.hits, lru.misses) == (1, 3)
    lru.get_many(["black"])  # full: green (least recent) goes
    assert len(lru) == 3
    lru.get_many(["red", "blue", "black"])
    assert encoder.encoded[-1] == "black" and lru.hits == 4
    again = lru.get_many(["green"])
    assert encoder.encoded[-1] == "green"
    assert np.array_equal(again["green"], first["green"])


def test_lru_reuses_tag_list_embeddings_already_built(tmp_path: Path) -> None:
    tags_encoder, lru_encoder = CountingEncoder(), CountingEncoder()
    tags = index(tags_encoder, tmp_path)
    tags.build_step(2)
    lru = LabelEmbeddingLRU(lru_encoder, max_entries=8, fallback=tags)
    found = lru.get_many([LABELS[0], LABELS[5]])
    assert lru_encoder.encoded == [LABELS[5]]  # LABELS[0] is done in the index, LABELS[5] not yet
    assert np.allclose(found[LABELS[0]], tags_encoder([LABELS[0]])[0])


def test_interrogator_restart_loads_the_tag_cache_without_text_model_calls(
    demo_pack: Path, tmp_path: Path
) -> None:
    files = resolve_clip_files("onnxruntime", model_dir=demo_pack)
    tokenizer = ClipTokenizer.from_dir(files.tokenizer_dir)
    red = Image.new("RGB", (256, 256), (220, 20, 20))
    answers = []
    for start in range(2):
        wrap = WrapRecorder()
        models = load_clip_models(files, "onnxruntime", wrap=wrap)
        interrogator = Interrogator(models, tokenizer, tmp_path / "cache",
                                    InterrogationLimits.from_settings(Settings()), lru_size=16)
        assert interrogator.tags_complete == (start == 1)
        while not interrogator.build_step(4):
            pass
        text_calls = wrap.calls("clip_text")
        assert text_calls == (len(models.tags) if start == 0 else 0)
        answers.append(interrogator.interrogate(red).response())
        structured = interrogator.structured(red, {"colour": ["red", "blue"]})
        assert structured.results["colour"].winner == "red"
        assert wrap.calls("clip_text") == text_calls  # both labels come from the tag cache
        assert wrap.calls("clip_vision") == 2
    assert answers[0] == answers[1] and answers[0]["caption"].startswith("red")


def test_open_interrogator_from_settings_or_off(demo_pack: Path, tmp_path: Path) -> None:
    from pi_axera_sd_service.pipeline.interrogator import open_interrogator
    from pi_axera_sd_service.runtime.clip_models import InterrogationOff

    settings = Settings(model_dir=demo_pack, cache_dir=tmp_path, interrogate_top_k=1,
                        interrogate_threshold=0.0, interrogate_label_cache_size=2)
    tokenizer = ClipTokenizer.from_dir(demo_pack / "tokenizer")
    files = resolve_clip_files("onnxruntime", text_model_dir=demo_pack, **settings.clip_paths())
    interrogator = open_interrogator(files, "onnxruntime", tokenizer, settings)
    assert isinstance(interrogator, Interrogator) and interrogator.category_labels.max_entries == 2
    interrogator.index.build_all()
    assert len(interrogator.interrogate(Image.new("RGB", (64, 64), (20, 200, 30))).tags) == 1
    missing = settings.model_copy(update={"clip_text_model": tmp_path / "nowhere.onnx"})
    files = resolve_clip_files("onnxruntime", text_model_dir=demo_pack, **missing.clip_paths())
    off = open_interrogator(files, "onnxruntime", tokenizer, missing)
    assert isinstance(off, InterrogationOff) and "nowhere.onnx" in str(off)
