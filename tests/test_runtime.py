"""Runtime layer: sessions, contract checks at load, model folders (axengine: test_axengine.py)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from pi_axera_sd_service.runtime.checks import check_models
from pi_axera_sd_service.runtime.demo_pack import make_demo_pack
from pi_axera_sd_service.runtime.model_dir import (
    file_sha256,
    format_check_lines,
    load_models,
    resolve_model_files,
)
from pi_axera_sd_service.runtime.onnx_backend import OnnxSession
from pi_axera_sd_service.runtime.session import FeedError, ModelLoadError, prepare_feed

TIME_NAME = "/down_blocks.0/resnets.0/act_1/Mul_output_0"


def write_graph(
    path: Path, inputs: list[tuple[str, int, list[int]]], outputs: list[tuple[str, list[int]]]
) -> Path:
    """An ONNX file with the given inputs and float32 zero outputs of the given shapes."""
    nodes, initializers = [], []
    for name, shape in outputs:
        shape_name = f"{name}_shape"
        initializers.append(helper.make_tensor(shape_name, TensorProto.INT64, [len(shape)], shape))
        nodes.append(helper.make_node("ConstantOfShape", [shape_name], [name]))
    graph = helper.make_graph(
        nodes,
        "test",
        [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path))
    return path


F = TensorProto.FLOAT


@pytest.fixture(scope="module")
def pack_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_pack(tmp_path_factory.mktemp("pack"))


@pytest.fixture
def pack(pack_template: Path, tmp_path: Path) -> Path:
    """A private copy of the demo pack that a test may break."""
    return Path(shutil.copytree(pack_template, tmp_path / "models"))


def load_dir(folder: Path, **kwargs):
    files, backend = resolve_model_files(model_dir=folder, backend=kwargs.pop("backend", "onnxruntime"))
    return load_models(files, backend, **kwargs)


# --- sessions and feeds ---------------------------------------------------------------------------


def test_prepare_feed_casts_to_session_dtypes_and_rejects_wrong_shapes(tmp_path: Path) -> None:
    path = write_graph(tmp_path / "m.onnx", [("ids", TensorProto.INT32, [1, 77])], [("out", [1, 2])])
    session = OnnxSession(path)
    assert session.inputs[0].dtype == np.int32
    fed = prepare_feed(session, {"ids": np.zeros((1, 77), np.int64)})
    assert fed["ids"].dtype == np.int32
    assert session.run({"ids": np.zeros((1, 77), np.int64)})[0].shape == (1, 2)
    with pytest.raises(FeedError) as err:
        prepare_feed(session, {"ids": np.zeros((1, 76), np.int32)})
    assert all(s in str(err.value) for s in ("m.onnx", "'ids'", "int32[1,77]", "int32[1,76]"))
    with pytest.raises(FeedError, match="'ids' missing"):
        prepare_feed(session, {"input_ids": np.zeros((1, 77), np.int32)})


def test_unloadable_file_is_a_model_load_error(tmp_path: Path) -> None:
    bad = tmp_path / "unet.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(ModelLoadError, match="unet.onnx"):
        OnnxSession(bad)


# --- contract checks at load ----------------------------------------------------------------------


def test_demo_pack_loads_with_contract_names(pack: Path, tmp_path: Path) -> None:
    models = load_dir(pack, cache_dir=tmp_path / "cache")
    assert models.backend == "onnxruntime"
    assert models.unet_inputs.time == TIME_NAME
    assert models.latent_shape == (1, 4, 64, 64) and models.image_size == (512, 512)
    assert models.time_inputs.shape == (4, 1280) and models.time_inputs.dtype == np.float32
    assert models.vae_encoder is not None and models.model_name == "unet"
    assert models.model_sha256 == file_sha256(pack / "unet.onnx")


def test_unet_time_input_with_wrong_shape_is_rejected(pack: Path) -> None:
    write_graph(
        pack / "unet.onnx",
        [("sample", F, [1, 4, 64, 64]), (TIME_NAME, F, [1, 320]), ("encoder_hidden_states", F, [1, 77, 768])],
        [("eps", [1, 4, 64, 64])],
    )
    with pytest.raises(ModelLoadError) as err:
        load_dir(pack)
    message = str(err.value)
    assert "unet.onnx" in message and "time input" in message
    assert "float32[1,1280]" in message and f"{TIME_NAME} float32[1,320]" in message


def test_unet_inputs_are_found_by_shape_not_name(pack: Path) -> None:
    write_graph(
        pack / "unet.onnx",
        [("ctx", F, [1, 77, 768]), ("latent", F, [1, 4, 64, 64]), ("temb", F, [1, 1280])],
        [("eps", [1, 4, 64, 64])],
    )
    names = load_dir(pack).unet_inputs
    assert (names.sample, names.time, names.context) == ("latent", "temb", "ctx")


def test_unet_with_float16_input_is_rejected(pack: Path) -> None:
    write_graph(
        pack / "unet.onnx",
        [
            ("sample", TensorProto.FLOAT16, [1, 4, 64, 64]),
            (TIME_NAME, F, [1, 1280]),
            ("ehs", F, [1, 77, 768]),
        ],
        [("eps", [1, 4, 64, 64])],
    )
    with pytest.raises(ModelLoadError, match=r"UNet input 'sample': expected float32, found sample float16"):
        load_dir(pack)


def test_text_encoder_with_float_ids_is_rejected(pack: Path) -> None:
    write_graph(
        pack / "text_encoder/sd15_text_encoder_sim.onnx",
        [("input_ids", F, [1, 77])],
        [("last_hidden_state", [1, 77, 768])],
    )
    with pytest.raises(ModelLoadError) as err:
        load_dir(pack)
    message = str(err.value)
    assert "sd15_text_encoder_sim.onnx" in message and "'input_ids'" in message
    assert "int32[1,77] or int64[1,77]" in message and "found input_ids float32[1,77]" in message


def test_vae_decoder_for_another_size_is_rejected(pack: Path) -> None:
    write_graph(pack / "vae_decoder.onnx", [("x", F, [1, 4, 64, 64])], [("img", [1, 3, 256, 256])])
    with pytest.raises(
        ModelLoadError, match=r"vae_decoder.onnx.*float32\[1,3,512,512\].*img float32\[1,3,256,256\]"
    ):
        load_dir(pack)


def test_vae_encoder_input_name_is_read_from_the_session(pack: Path) -> None:
    write_graph(pack / "vae_encoder.onnx", [("x", F, [1, 3, 512, 512])], [("moments", [1, 8, 64, 64])])
    assert load_dir(pack).vae_encoder.inputs[0].name == "x"


def test_time_rows_with_wrong_width_are_rejected(pack: Path) -> None:
    np.save(pack / "time_input_txt2img.npy", np.zeros((4, 320), np.float32))
    with pytest.raises(ModelLoadError, match=r"time_input_txt2img.npy.*\[N>=4,1280\].*float32\[4,320\]"):
        load_dir(pack)


# --- model folders --------------------------------------------------------------------------------


def test_missing_folder_names_the_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError) as err:
        load_dir(tmp_path / "nowhere")
    assert "tokenizer" in str(err.value) and "nowhere" in str(err.value)


@pytest.mark.parametrize(
    "removed",
    ["unet.onnx", "vae_decoder.onnx", "text_encoder/sd15_text_encoder_sim.onnx", "tokenizer/merges.txt"],
)
def test_incomplete_folder_names_the_missing_file(pack: Path, removed: str) -> None:
    (pack / removed).unlink()
    with pytest.raises(ModelLoadError) as err:
        load_dir(pack)
    assert Path(removed).name in str(err.value)
    assert err.value.path is not None and err.value.path.name == Path(removed).name


def test_missing_vae_encoder_only_disables_img2img(pack: Path) -> None:
    (pack / "vae_encoder.onnx").unlink()
    assert load_dir(pack).vae_encoder is None


def test_explicit_files_override_model_dir_and_text_model_dir(tmp_path: Path) -> None:
    files, backend = resolve_model_files(
        model_dir=tmp_path / "m",
        text_model_dir=tmp_path / "t",
        unet_model=tmp_path / "other/my_unet.onnx",
        backend="onnxruntime",
    )
    assert files.unet == tmp_path / "other/my_unet.onnx"
    assert files.vae_decoder == tmp_path / "m/vae_decoder.onnx"
    assert files.tokenizer_dir == tmp_path / "t/tokenizer"
    assert files.text_encoder == tmp_path / "t/text_encoder/sd15_text_encoder_sim.onnx"
    assert files.time_input_txt2img == tmp_path / "m/time_input_txt2img.npy"


def test_axmodel_on_onnxruntime_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="unet.axmodel.*onnxruntime"):
        resolve_model_files(model_dir=tmp_path, unet_model=tmp_path / "unet.axmodel", backend="onnxruntime")


def test_check_models_reports_every_model_and_the_fault(pack: Path) -> None:
    write_graph(pack / "vae_decoder.onnx", [("x", F, [1, 4, 32, 32])], [("img", [1, 3, 256, 256])])
    files, backend = resolve_model_files(model_dir=pack, backend="onnxruntime")
    lines = check_models(files, backend)
    status = {line.role: line.ok for line in lines}
    assert status == {
        "tokenizer": True,
        "time_input": True,
        "text_encoder": True,
        "unet": True,
        "vae_decoder": False,
        "vae_encoder": True,
        "clip_vision": True,
        "clip_text": True,
        "clip_visual_projection": True,
        "clip_text_projection": True,
        "interrogate_tags": True,
        "interrogation": True,
    }
    report = format_check_lines(lines)
    assert "[FAIL] vae_decoder" in report and "x float32[1,4,32,32]" in report
    assert report.endswith("1 problem(s) found")


def test_corrupt_vocab_fails_check_models_and_load(pack: Path) -> None:
    (pack / "tokenizer" / "vocab.json").write_text("{broken", encoding="utf-8")
    files, backend = resolve_model_files(model_dir=pack, backend="onnxruntime")
    (line,) = [line for line in check_models(files, backend) if line.role == "tokenizer"]
    assert not line.ok and "vocab.json" in line.status
    with pytest.raises(ModelLoadError, match="vocab.json"):
        load_models(files, backend)


def test_vae_with_two_inputs_names_them_all(pack: Path) -> None:
    write_graph(pack / "vae_decoder.onnx", [("x", F, [1, 4, 64, 64]), ("extra", F, [1])],
                [("img", [1, 3, 512, 512])])
    files, backend = resolve_model_files(model_dir=pack, backend="onnxruntime")
    with pytest.raises(ModelLoadError) as err:
        load_models(files, backend)
    message = str(err.value)
    assert "vae_decoder.onnx" in message and "x float32[1,4,64,64]" in message
    assert "extra float32[1]" in message


def test_hash_is_cached_by_size_and_mtime(tmp_path: Path) -> None:
    model = tmp_path / "unet.onnx"
    model.write_bytes(b"weights v1")
    cache = tmp_path / "cache"
    real = file_sha256(model, cache)
    table = json.loads((cache / "hashes.json").read_text())
    (entry,) = table.values()
    entry["sha256"] = "remembered"
    (cache / "hashes.json").write_text(json.dumps(table))
    assert file_sha256(model, cache) == "remembered"  # not re-read while size and mtime match
    model.write_bytes(b"weights v2")
    os.utime(model, ns=(1, 1))
    assert file_sha256(model, cache) not in ("remembered", real)


@pytest.mark.parametrize(
    "content",
    ["[]", '"text"', "null", "{broken", '{"KEY": "not a dict"}', '{"KEY": {"size": 3, "sha256": null}}'],
)
def test_corrupt_hash_cache_is_ignored_and_rewritten(tmp_path: Path, content: str) -> None:
    model = tmp_path / "unet.onnx"
    model.write_bytes(b"abc")
    cache = tmp_path / "cache"
    cache.mkdir()
    stat = model.stat()
    content = content.replace("KEY", str(model.resolve()))
    content = content.replace('"size": 3', f'"size": 3, "mtime_ns": {stat.st_mtime_ns}')
    (cache / "hashes.json").write_text(content, encoding="utf-8")
    expected = hashlib.sha256(b"abc").hexdigest()
    assert file_sha256(model, cache) == expected
    assert json.loads((cache / "hashes.json").read_text())[str(model.resolve())]["sha256"] == expected


def test_unwritable_hash_cache_still_hashes_and_leaves_no_temp_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tmp_path / "unet.onnx"
    model.write_bytes(b"abc")
    cache = tmp_path / "cache"
    cache.mkdir()

    def refuse(*args: object) -> None:
        raise PermissionError("read-only file system")

    monkeypatch.setattr(os, "replace", refuse)
    assert file_sha256(model, cache) == hashlib.sha256(b"abc").hexdigest()
    assert list(cache.iterdir()) == []
    a_file = tmp_path / "not_a_dir"
    a_file.write_text("x")
    assert file_sha256(model, a_file) == hashlib.sha256(b"abc").hexdigest()
