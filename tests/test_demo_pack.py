"""The demo pack: contract-shaped graphs whose images depend on prompt, seed and time, deterministically."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pi_axera_sd_service.runtime import demo_pack
from pi_axera_sd_service.runtime.demo_pack import demo_pack_dir, make_demo_pack
from pi_axera_sd_service.runtime.model_dir import LoadedModels, load_models, resolve_model_files

FILES = [
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
    "tokenizer/tokenizer_config.json",
    "tokenizer/special_tokens_map.json",
    "text_encoder/sd15_text_encoder_sim.onnx",
    "unet.onnx",
    "vae_decoder.onnx",
    "vae_encoder.onnx",
    "time_input_txt2img.npy",
    "time_input_table.npy",
]


@pytest.fixture(scope="module")
def pack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_pack(tmp_path_factory.mktemp("pack"))


@pytest.fixture(scope="module")
def models(pack: Path) -> LoadedModels:
    files, backend = resolve_model_files(model_dir=pack, backend="onnxruntime")
    return load_models(files, backend)


@pytest.fixture(scope="module")
def vocab(pack: Path) -> dict[str, int]:
    return json.loads((pack / "tokenizer/vocab.json").read_text(encoding="utf-8"))


def prompt_ids(vocab: dict[str, int], words: list[str]) -> np.ndarray:
    """[1,77] int64: BOS, one whole-word token per word, EOS padding."""
    ids = np.full((1, 77), vocab["<|endoftext|>"], np.int64)
    ids[0, 0] = vocab["<|startoftext|>"]
    ids[0, 1 : 1 + len(words)] = [vocab[w + "</w>"] for w in words]
    return ids


def lcm_image(models: LoadedModels, context: np.ndarray, seed: int) -> np.ndarray:
    """4-step LCM txt2img with the pipeline's constants; HWC float image in [0,1]."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float32) ** 2
    acp = np.cumprod(1 - betas)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(models.latent_shape).astype(np.float32)
    names, steps = models.unet_inputs, models.timesteps
    for i, t in enumerate(steps):
        feed = {names.sample: x, names.time: models.time_inputs[i : i + 1], names.context: context}
        eps = models.unet.run(feed)[0]
        a, a_prev = acp[t], acp[steps[i + 1] if i + 1 < len(steps) else t]
        x0 = (x - np.sqrt(1 - a) * eps) / np.sqrt(a)
        last = i + 1 == len(steps)
        x = x0 if last else np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * rng.standard_normal(x.shape)
    image = models.vae_decoder.run({"x": (x / 0.18215).astype(np.float32)})[0]
    return np.clip(image[0] / 2 + 0.5, 0, 1).transpose(1, 2, 0)


def encode(models: LoadedModels, ids: np.ndarray) -> np.ndarray:
    return models.text_encoder.run({"input_ids": ids})[0]


def test_pack_has_the_upstream_layout(tmp_path: Path) -> None:
    make_demo_pack(tmp_path)
    assert all((tmp_path / name).is_file() for name in FILES)
    rows = np.load(tmp_path / "time_input_txt2img.npy")
    assert rows.shape == (4, 1280) and rows.dtype == np.float32
    assert len(np.unique(rows.round(4), axis=0)) == 4


def test_tokenizer_is_clip_format(pack: Path, vocab: dict[str, int]) -> None:
    merges = (pack / "tokenizer/merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0] == "#version: 0.2"
    assert sorted(vocab.values()) == list(range(len(vocab))) and 600 < len(vocab) < 2000
    byte_chars = list(vocab)[:256]
    assert list(vocab)[256:512] == [c + "</w>" for c in byte_chars]
    assert (
        vocab["!"] == 0
        and vocab["<|startoftext|>"] == len(vocab) - 2
        and vocab["<|endoftext|>"] == len(vocab) - 1
    )
    for line in merges[1:]:
        left, right = line.split(" ")
        assert left + right in vocab
    assert "portrait</w>" in vocab and "cat</w>" in vocab  # whole words from the built-in list
    config = json.loads((pack / "tokenizer/tokenizer_config.json").read_text())
    assert config["model_max_length"] == 77 and config["pad_token"] == "<|endoftext|>"


def test_generation_is_deterministic(pack: Path, tmp_path: Path) -> None:
    again = make_demo_pack(tmp_path / "again")
    for name in FILES:
        assert (pack / name).read_bytes() == (again / name).read_bytes(), name


def test_text_encoder_output_depends_on_the_prompt(models: LoadedModels, vocab: dict[str, int]) -> None:
    cat = encode(models, prompt_ids(vocab, ["cat"]))
    dog = encode(models, prompt_ids(vocab, ["dog"]))
    assert cat.shape == (1, 77, 768) and cat.dtype == np.float32
    difference = np.abs(cat - dog).mean(axis=2)[0]
    assert difference[1] > 0.5  # the word's own position
    assert difference[76] > 0.005  # and, through causal mixing, the padding after it
    np.testing.assert_array_equal(cat[0, 0], dog[0, 0])  # BOS position sees only BOS (causal)


def test_unet_depends_on_sample_time_row_and_each_token(models: LoadedModels, vocab: dict[str, int]) -> None:
    rng = np.random.default_rng(0)
    names = models.unet_inputs
    context = encode(models, prompt_ids(vocab, ["red", "castle"]))
    feed = {
        names.sample: rng.standard_normal((1, 4, 64, 64)).astype(np.float32),
        names.time: models.time_inputs[1:2],
        names.context: context,
    }
    base = models.unet.run(feed)[0]

    def changed(**override: np.ndarray) -> float:
        return float(np.abs(models.unet.run({**feed, **override})[0] - base).mean())

    assert changed(**{names.sample: feed[names.sample] + 0.5}) > 0.1
    assert changed(**{names.time: models.time_inputs[3:4]}) > 0.1
    emphasised = context.copy()
    emphasised[0, 2] *= 1.5  # "(castle:1.5)"
    assert changed(**{names.context: emphasised}) > 0.01


def test_lcm_images_are_colourful_and_vary_with_prompt_and_seed(models: LoadedModels, vocab) -> None:
    cat = encode(models, prompt_ids(vocab, ["portrait", "of", "a", "cat"]))
    sea = encode(models, prompt_ids(vocab, ["blue", "ocean", "sunset"]))
    cat0, cat1, sea0 = lcm_image(models, cat, 0), lcm_image(models, cat, 1), lcm_image(models, sea, 0)
    for image in (cat0, cat1, sea0):
        assert image.shape == (512, 512, 3)
        assert 0.2 < image.mean() < 0.8  # not black, white or flat grey
        assert image.std() > 0.1
        assert (image.std(axis=2) > 0.1).mean() > 0.3  # colourful: channels differ on many pixels
        assert ((image < 0.02) | (image > 0.98)).mean() < 0.2  # not saturated noise
    prompt_change = np.abs(cat0 - sea0).mean()
    seed_change = np.abs(cat0 - cat1).mean()
    assert prompt_change > 0.1 and seed_change > 0.02
    assert prompt_change > seed_change  # a prompt sets the picture, a seed varies it


def test_vae_encoder_approximately_inverts_the_decoder(models: LoadedModels) -> None:
    yy, xx = np.mgrid[0:64, 0:64] / 64
    phases = np.random.default_rng(3).uniform(0, 6.3, (4, 1, 1))
    latent = np.sin(2 * np.pi * (2 * xx + yy) + phases)[None].astype(np.float32)  # smooth, like images
    image = models.vae_decoder.run({"x": latent / 0.18215})[0]
    moments = models.vae_encoder.run({"image_sample": image})[0]
    assert moments.shape == (1, 8, 64, 64)
    np.testing.assert_allclose(moments[:, 4:], -6.0)
    again = models.vae_decoder.run({"x": moments[:, :4]})[0]
    assert np.abs(again - image).mean() < 0.1 * np.abs(image).mean()


def test_demo_pack_dir_generates_once_and_regenerates_when_stale(tmp_path: Path) -> None:
    folder = demo_pack_dir(tmp_path)
    assert folder == tmp_path / f"demo_pack_v{demo_pack.PACK_VERSION}"
    assert all((folder / name).is_file() for name in FILES)
    stamp = (folder / demo_pack.STAMP_FILE).stat().st_mtime_ns
    assert demo_pack_dir(tmp_path) == folder
    assert (folder / demo_pack.STAMP_FILE).stat().st_mtime_ns == stamp  # reused, not rebuilt
    (folder / demo_pack.STAMP_FILE).write_text('{"fingerprint": "older generator"}')
    (folder / "unet.onnx").write_bytes(b"broken")
    demo_pack_dir(tmp_path)
    assert (folder / "unet.onnx").stat().st_size > 1000
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]  # no temp dirs left behind


@pytest.mark.parametrize("stamp", ["[]", '"text"', "null", "{broken"])
def test_unreadable_stamp_regenerates_instead_of_crashing(tmp_path: Path, stamp: str) -> None:
    folder = demo_pack_dir(tmp_path)
    (folder / demo_pack.STAMP_FILE).write_text(stamp)
    assert demo_pack_dir(tmp_path) == folder
    assert json.loads((folder / demo_pack.STAMP_FILE).read_text())["fingerprint"]


def test_fingerprint_covers_every_generator_module() -> None:
    from pi_axera_sd_service.runtime import demo_tokenizer

    sources = {Path(p).name for p in demo_pack.GENERATOR_SOURCES}
    assert {Path(demo_pack.__file__).name, Path(demo_tokenizer.__file__).name} <= sources


def test_pack_table_holds_the_four_rows(pack: Path, models: LoadedModels) -> None:
    table = np.load(pack / "time_input_table.npy")
    assert table.shape == (1000, 1280) and table.dtype == np.float32 and models.time.full
    np.testing.assert_array_equal(np.load(pack / "time_input_txt2img.npy"), table[[999, 759, 499, 259]])
    np.testing.assert_array_equal(models.time_input(679), table[679:680])


def test_only_the_lcm_skeleton_rows_of_the_table_stay_in_memory(pack: Path, models: LoadedModels) -> None:
    """Every LCM schedule runs t = 20k - 1: 50 rows kept (256 KB per device instead of 5 MB)."""
    table = np.load(pack / "time_input_table.npy")
    assert models.time.rows.shape == (50, 1280) and models.time.rows.nbytes == 50 * 1280 * 4
    for t in (19, 339, 679, 999):
        np.testing.assert_array_equal(models.time_input(t), table[t : t + 1])
    with pytest.raises(KeyError, match="timestep 500"):
        models.time_input(500)


def test_table_from_another_unet_is_refused(pack: Path, tmp_path: Path) -> None:
    import shutil

    from pi_axera_sd_service.runtime.session import ModelLoadError

    copy = Path(shutil.copytree(pack, tmp_path / "pack"))
    np.save(copy / "time_input_table.npy", np.load(copy / "time_input_table.npy") * 1.1)
    files, backend = resolve_model_files(model_dir=copy, backend="onnxruntime")
    with pytest.raises(ModelLoadError, match="different UNets"):
        load_models(files, backend)
    (copy / "time_input_txt2img.npy").unlink()  # a table alone is enough
    assert load_models(files, backend).time.full
    np.save(copy / "time_input_table.npy", np.zeros((999, 1280), np.float32))
    with pytest.raises(ModelLoadError, match=r"float32\[1000,1280\]"):
        load_models(files, backend)
