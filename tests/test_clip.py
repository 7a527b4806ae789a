"""CLIP interrogation below the service: preprocessing, demo CLIP models, scoring rules, limits, loader."""

from __future__ import annotations

import base64
import io
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pi_axera_sd_service.pipeline.clip import (
    LOGIT_SCALE,
    Interrogation,
    TagScore,
    classify,
    general_tags,
    pick_tags,
    preprocess,
)
from pi_axera_sd_service.pipeline.images import ImageDecodeError, decode_image_b64
from pi_axera_sd_service.pipeline.interrogator import (
    CategoriesError,
    InterrogationLimits,
    Interrogator,
    validate_categories,
)
from pi_axera_sd_service.pipeline.tokenizer import ClipTokenizer
from pi_axera_sd_service.runtime.clip_models import (
    CLIP_MEAN,
    CLIP_STD,
    ClipModels,
    InterrogationOff,
    clip_check_lines,
    load_clip_models,
    resolve_clip_files,
    try_load_clip_models,
)
from pi_axera_sd_service.runtime.model_dir import format_check_lines
from pi_axera_sd_service.runtime.session import ModelLoadError
from pi_axera_sd_service.settings import Settings
from tests.test_runtime import write_graph

F = 1  # onnx TensorProto.FLOAT
RED, GREEN, BLUE = (210, 30, 35), (35, 170, 45), (25, 45, 200)
LIMITS = InterrogationLimits.from_settings(Settings())
PICKER_CATEGORIES = {  # the picker's knobs send lists like these
    "colour": ["red", "green", "blue", "yellow"],
    "animal": ["cat", "dog"],
    "place": ["forest", "ocean", "mountain", "house"],
}


def solid(colour: tuple[int, int, int], size: tuple[int, int] = (320, 240)) -> Image.Image:
    return Image.new("RGB", size, colour)


def mostly(colour: tuple[int, int, int], other: tuple[int, int, int]) -> Image.Image:
    """A 3/4 `colour`, 1/4 `other` image."""
    image = solid(colour, (400, 300))
    image.paste(other, (300, 0, 400, 300))
    return image


def png_b64(image: Image.Image, **save: object) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **save)
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def clip_models(demo_pack: Path) -> ClipModels:
    return load_clip_models(resolve_clip_files("onnxruntime", model_dir=demo_pack), "onnxruntime")


@pytest.fixture()
def interrogator(clip_models: ClipModels, tmp_path: Path) -> Interrogator:
    tokenizer = ClipTokenizer.from_dir(clip_models.files.tokenizer_dir)
    built = Interrogator(clip_models, tokenizer, tmp_path / "cache", LIMITS, lru_size=64)
    built.index.build_all()
    return built


# --- preprocessing -------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(640, 480), (300, 500), (224, 224), (50, 31), (1001, 223)])
def test_preprocess_matches_the_transformers_clip_processor(size: tuple[int, int]) -> None:
    transformers = pytest.importorskip("transformers")
    rng = np.random.default_rng(sum(size))
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")
    processor_class = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    expected = processor_class()(images=image, return_tensors="np")["pixel_values"]
    ours = preprocess(image)
    assert ours.shape == expected.shape == (1, 3, 224, 224) and ours.dtype == np.float32
    assert np.abs(ours - expected).max() <= 1e-5


def test_preprocess_normalises_with_clip_mean_and_std() -> None:
    colour = (200, 100, 50)
    pixels = preprocess(solid(colour, (500, 300)))
    want = (np.array(colour) / 255.0 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    assert np.allclose(pixels[0].reshape(3, -1), want[:, None], atol=1e-5)


def test_preprocess_crops_the_centre_of_the_long_side() -> None:
    image = solid(BLUE, (600, 200))  # 3:1 -> 672x224, the middle 224 columns kept
    image.paste(RED, (250, 0, 350, 200))  # a red band in the middle, 100 of 600 columns
    red_channel = preprocess(image)[0, 0]
    column_is_red = red_channel.mean(axis=0) > 0.5
    # 100/600 of 672 px = 112 px of red, centred in the 224 crop
    assert 100 <= column_is_red.sum() <= 124 and column_is_red[112] and not column_is_red[:40].any()


def test_decode_applies_exif_orientation_and_white_background() -> None:
    image = solid(RED, (300, 200))
    image.paste(BLUE, (0, 100, 300, 200))  # top red, bottom blue as stored
    exif = Image.Exif()
    exif[0x0112] = 3  # rotate 180 on display
    pixels = preprocess(decode_image_b64(png_b64(image, exif=exif.tobytes()), 10**7))
    assert pixels[0, 2, 5, 112] > pixels[0, 0, 5, 112]  # top row is now blue
    transparent = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    white = preprocess(decode_image_b64("data:image/png;base64," + png_b64(transparent), 10**7))
    assert np.allclose(white, preprocess(solid((255, 255, 255))), atol=1e-6)


def test_bad_images_raise_the_img2img_decode_error() -> None:
    for data in ("", "not base64 !!", base64.b64encode(b"GIF89a nonsense").decode()):
        with pytest.raises(ImageDecodeError):
            decode_image_b64(data, 10**7)


# --- the demo models, end to end -----------------------------------------------------------------


@pytest.mark.parametrize(("colour", "other", "top", "below"), [
    (RED, BLUE, "red", "blue"),
    (GREEN, RED, "green", "red"),
    (BLUE, GREEN, "blue", "green"),
])
def test_demo_interrogation_names_the_main_colour(
    interrogator: Interrogator, colour: tuple, other: tuple, top: str, below: str
) -> None:
    image = decode_image_b64(png_b64(mostly(colour, other)), 10**7)
    result = interrogator.interrogate(image)
    assert result.complete and result.tags[0].tag == top
    assert result.caption.split(", ")[0] == top
    scores = interrogator.index.scores(interrogator.encoder.embed_image(image))
    by_label = dict(zip(scores.labels, scores.scores, strict=True))
    assert by_label[top] > by_label[below]
    body = result.response()
    assert set(body) == {"caption", "interrogations"}
    assert body["interrogations"][0] == {"tag": top, "score": pytest.approx(result.tags[0].score)}


def test_structured_answers_winners_from_the_given_labels_and_follows_the_image(
    interrogator: Interrogator,
) -> None:
    categories = validate_categories(PICKER_CATEGORIES, interrogator.limits)
    answers = {}
    for name, colour in (("red", RED), ("green", GREEN)):
        body = interrogator.structured(solid(colour), categories).response()
        assert set(body["results"]) == set(PICKER_CATEGORIES)
        for category, result in body["results"].items():
            assert result["winner"] in PICKER_CATEGORIES[category]
            assert 0.0 <= result["confidence"] <= 1.0
        assert body["general_tags"] and body["general_tags"][0] == name
        answers[name] = body["results"]["colour"]["winner"]
    assert answers == {"red": "red", "green": "green"}


def test_structured_leaves_out_empty_categories(interrogator: Interrogator) -> None:
    body = interrogator.structured(solid(RED), {"colour": ["red", "blue"], "nothing": []}).response()
    assert list(body["results"]) == ["colour"]


def test_interrogation_answers_from_a_partial_tag_cache(clip_models: ClipModels, tmp_path: Path) -> None:
    tokenizer = ClipTokenizer.from_dir(clip_models.files.tokenizer_dir)
    partial = Interrogator(clip_models, tokenizer, tmp_path, LIMITS, lru_size=64)
    empty = partial.interrogate(solid(RED)).response()
    assert empty["caption"] == "" and empty["tags_complete"] is False
    assert empty["tags_prepared"] == f"0/{len(clip_models.tags)}"
    partial.build_step(1)  # the first tag only ("red" in the demo list)
    body = partial.interrogate(solid(BLUE)).response()
    assert body["tags_prepared"] == f"1/{len(clip_models.tags)}"
    assert [item["tag"] for item in body["interrogations"]] == [clip_models.tags[0]]  # single best


# --- scoring rules -------------------------------------------------------------------------------


def test_pick_tags_threshold_top_k_and_single_best_fallback() -> None:
    labels = [f"t{i}" for i in range(15)]
    scores = np.linspace(0.26, 0.40, 15).astype(np.float32)[::-1]  # t0 best (0.40), 0.01 apart
    rng = np.random.default_rng(3)
    order = rng.permutation(15)  # the input order does not matter
    picked = pick_tags(scores[order], [labels[i] for i in order], threshold=0.22, top_k=10)
    assert [t.tag for t in picked] == labels[:10]
    few = pick_tags(scores, labels, threshold=0.345, top_k=10)
    assert [t.tag for t in few] == labels[:6]
    assert pick_tags(scores, labels, threshold=0.9, top_k=10) == [TagScore("t0", pytest.approx(0.40))]
    assert Interrogation(picked[:3]).caption == "t0, t1, t2"


def test_general_tags_are_the_top_k_above_the_cutoff() -> None:
    labels = [f"t{i}" for i in range(12)]
    scores = np.array([0.5, 0.1, 0.3, 0.21, 0.2, 0.25, 0.22, 0.23, 0.24, 0.26, 0.27, 0.28], np.float32)
    assert general_tags(scores, labels, threshold=0.2, top_k=10) == [
        "t0", "t2", "t11", "t10", "t9", "t5", "t8", "t7", "t6", "t3"]
    assert general_tags(scores, labels, threshold=0.2, top_k=3) == ["t0", "t2", "t11"]


def test_classify_is_a_softmax_over_100_times_cosine() -> None:
    image = np.array([1.0, 0.0], np.float32)
    labels = np.array([[0.30, 0.0], [0.29, 0.0]], np.float32)  # cosines 0.30 and 0.29
    winner, confidence = classify(image, labels, ["a", "b"])
    assert winner == "a"
    assert confidence == pytest.approx(1 / (1 + np.exp(-LOGIT_SCALE * 0.01)), rel=1e-4)


# --- request limits ------------------------------------------------------------------------------


@pytest.mark.parametrize(("categories", "named"), [
    ({f"c{i}": ["x"] for i in range(4)}, "interrogate_max_categories"),
    ({"c": ["x"] * 6}, "interrogate_max_labels_per_category"),
    ({"c": ["x" * 21]}, "interrogate_max_label_chars"),
    ({"c": "red"}, "list of label strings"),
    ({"c": ["red", 3]}, "list of label strings"),
    ({"c": ["  "]}, "must not be empty"),
    ({}, "non-empty object"),
    (["red"], "non-empty object"),
])
def test_limits_refuse_with_a_message_naming_the_limit(categories: object, named: str) -> None:
    limits = replace(LIMITS, max_categories=3, max_labels_per_category=5, max_label_chars=20)
    with pytest.raises(CategoriesError, match=named):
        validate_categories(categories, limits)
    assert validate_categories({"c": ["x" * 20] * 5}, limits) == {"c": ["x" * 20] * 5}


# --- loader and check-models ---------------------------------------------------------------------


def test_absent_models_turn_interrogation_off_with_a_reason(demo_pack: Path, tmp_path: Path) -> None:
    shutil.copytree(demo_pack / "tokenizer", tmp_path / "tokenizer")
    files = resolve_clip_files("onnxruntime", model_dir=tmp_path)
    off = try_load_clip_models(files, "onnxruntime")
    assert isinstance(off, InterrogationOff)
    assert str(off).startswith("interrogation off: ") and "clip_base_vision.onnx" in off.reason
    lines = clip_check_lines(files, "onnxruntime")
    assert all(line.ok for line in lines)
    assert "interrogation off" in format_check_lines(lines)


def test_wrong_contracts_are_refused_naming_file_and_shapes(demo_pack: Path, tmp_path: Path) -> None:
    folder = tmp_path / "models"
    shutil.copytree(demo_pack, folder)
    write_graph(folder / "clip_base_vision.onnx", [("pixel_values", F, [1, 3, 256, 256])],
                [("hidden", [1, 50, 768]), ("pooled", [1, 768])])
    files = resolve_clip_files("onnxruntime", model_dir=folder)
    with pytest.raises(ModelLoadError, match=r"clip_base_vision.onnx.*float32\[1,3,224,224\]"):
        load_clip_models(files, "onnxruntime")
    shutil.copy(demo_pack / "clip_base_vision.onnx", folder)
    np.save(folder / "clip_text_projection.npy", np.zeros((768, 512), np.float32))
    off = try_load_clip_models(files, "onnxruntime")
    assert isinstance(off, InterrogationOff) and "clip_text_projection.npy" in off.reason
    report = format_check_lines(clip_check_lines(files, "onnxruntime"))
    assert "[FAIL] clip_text_projection" in report and "float32[512,512]" in report
    assert "[FAIL] interrogation" in report


def test_axmodel_paths_are_refused_on_onnxruntime(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="axmodel"):
        resolve_clip_files("onnxruntime", model_dir=tmp_path, clip_vision_model=tmp_path / "v.axmodel")
    files = resolve_clip_files("axengine", model_dir=tmp_path)
    assert files.vision.name == "clip_base_vision.axmodel" and files.text.name == "clip_base_text.axmodel"


def test_check_models_cli_says_interrogation_is_off_and_why(demo_pack: Path, tmp_path: Path) -> None:
    folder = tmp_path / "models"
    shutil.copytree(demo_pack, folder, ignore=shutil.ignore_patterns("clip_*", "interrogate_tags.txt"))
    proc = subprocess.run([sys.executable, "-m", "pi_axera_sd_service", "check-models", folder],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "interrogation off: no CLIP model at" in proc.stdout and "clip_base_vision.onnx" in proc.stdout
    env = {**os.environ, "CLIP_VISION_MODEL": str(demo_pack / "clip_base_vision.onnx")}
    proc = subprocess.run([sys.executable, "-m", "pi_axera_sd_service", "check-models", folder],
                          capture_output=True, text=True, timeout=300, env=env)
    assert f"[OK] clip_vision: {demo_pack / 'clip_base_vision.onnx'}" in proc.stdout, proc.stdout


def test_timm_lemma_list_is_read_without_importing_timm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pi_axera_sd_service.export.clip import timm_imagenet21k_tags

    info = tmp_path / "timm" / "data" / "_info"
    info.mkdir(parents=True)
    (tmp_path / "timm" / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    (info / "imagenet21k_goog_synsets.txt").write_text("n1\nn2\nn3\nn4\n")
    (info / "imagenet_synset_to_lemma.txt").write_text(
        "n0\tunused\nn1\torganism, being\nn2\tpalm_tree\nn3\torganism\nn4\tsea, ocean\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert timm_imagenet21k_tags() == ["organism", "palm tree", "sea"]


def test_tag_list_skips_blanks_and_repeats_and_refuses_an_empty_file(tmp_path: Path) -> None:
    from pi_axera_sd_service.runtime.clip_models import read_tags

    (tmp_path / "tags.txt").write_text(" dog \n\ncat\ndog\n", encoding="utf-8")
    assert read_tags(tmp_path / "tags.txt") == ["dog", "cat"]
    (tmp_path / "empty.txt").write_text("\n \n", encoding="utf-8")
    with pytest.raises(ModelLoadError, match="empty"):
        read_tags(tmp_path / "empty.txt")


def test_serving_and_interrogation_import_neither_torch_nor_transformers() -> None:
    code = (
        "import sys\n"
        "import pi_axera_sd_service.api.app, pi_axera_sd_service.cli\n"
        "import pi_axera_sd_service.pipeline.interrogator, pi_axera_sd_service.runtime.demo_clip\n"
        "import pi_axera_sd_service.export.clip\n"  # the exporter imports them only when it runs
        "heavy = sorted(m for m in ('torch', 'transformers', 'diffusers') if m in sys.modules)\n"
        "print(heavy)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr
