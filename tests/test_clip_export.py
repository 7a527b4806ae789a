"""export-clip on a tiny randomly initialised CLIPModel: our ONNX + numpy path equals transformers'."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pi_axera_sd_service.pipeline.clip import ClipEncoder, normalise_rows, preprocess
from pi_axera_sd_service.pipeline.tokenizer import ClipTokenizer
from pi_axera_sd_service.runtime.clip_models import load_clip_models, resolve_clip_files
from pi_axera_sd_service.runtime.demo_tokenizer import write_tokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")

TAGS = ["red", "green", "blue", "cat", "dog", "tree", "sky", "a small house"]


def tiny_clip(tokenizer_dir: Path):
    vocab = json.loads((tokenizer_dir / "vocab.json").read_text(encoding="utf-8"))
    text = {"vocab_size": len(vocab), "hidden_size": 512, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 8, "max_position_embeddings": 77,
            "bos_token_id": vocab["<|startoftext|>"], "eos_token_id": vocab["<|endoftext|>"],
            "pad_token_id": vocab["<|endoftext|>"]}
    vision = {"hidden_size": 768, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 12,
              "image_size": 224, "patch_size": 32}
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=512)
    torch.manual_seed(0)
    return transformers.CLIPModel(config).eval()


def features(output) -> np.ndarray:
    """get_*_features returns a tensor (transformers 4) or an output whose pooler_output is projected (5)."""
    tensor = output if isinstance(output, torch.Tensor) else output.pooler_output
    return tensor.detach().numpy()


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory):
    from pi_axera_sd_service.export.clip import export_clip

    root = tmp_path_factory.mktemp("export")
    write_tokenizer(root / "tokenizer")
    tags_file = root / "tags.txt"
    tags_file.write_text("\n".join([*TAGS, "", "red"]) + "\n", encoding="utf-8")
    model = tiny_clip(root / "tokenizer")
    written = export_clip(root, model=model, tags_file=tags_file, tokenizer_dir=root / "tokenizer")
    return root, model, written


def test_exported_embeddings_match_transformers(exported) -> None:
    root, model, _ = exported
    files = resolve_clip_files("onnxruntime", model_dir=root)
    models = load_clip_models(files, "onnxruntime")
    encoder = ClipEncoder(models, ClipTokenizer.from_dir(root / "tokenizer"))
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (180, 260, 3), dtype=np.uint8), "RGB")
    ours_image = encoder.embed_image(image)
    ours_text = encoder.embed_labels(TAGS)
    with torch.no_grad():
        pixels = torch.from_numpy(preprocess(image))
        theirs_image = normalise_rows(features(model.get_image_features(pixel_values=pixels)))[0]
        ids = torch.from_numpy(np.concatenate([encoder.label_ids(tag) for tag in TAGS]).astype(np.int64))
        theirs_text = normalise_rows(features(model.get_text_features(input_ids=ids)))
    assert np.abs(ours_image - theirs_image).max() <= 1e-4
    assert np.abs(ours_text - theirs_text).max() <= 1e-4
    assert models.tags == TAGS  # blank lines and repeats dropped


def test_export_writes_static_graphs_and_a_pulsar2_kit(exported) -> None:
    import onnx

    root, _, written = exported
    assert {p.name for p in written} >= {"clip_base_vision.onnx", "clip_base_text.onnx", "pulsar2",
                                         "clip_visual_projection.npy", "clip_text_projection.npy"}
    for name, want in (("clip_base_vision.onnx", [1, 3, 224, 224]), ("clip_base_text.onnx", [1, 77])):
        graph = onnx.load(str(root / name))
        assert graph.opset_import[0].version == 14
        dims = graph.graph.input[0].type.tensor_type.shape.dim
        assert [d.dim_value for d in dims] == want and not any(d.dim_param for d in dims)
        ops = {node.op_type for node in graph.graph.node}
        assert "Softmax" in ops and "MatMul" in ops  # eager attention, spelled out in plain ops
    kit = root / "pulsar2"
    text_config = json.loads((kit / "clip_text_u16.json").read_text())
    assert text_config["quant"]["input_configs"][0]["tensor_name"] == "input_ids"
    assert text_config["input_processors"][0]["src_dtype"] == "S32"
    with tarfile.open(kit / "clip_vision_calib.tar") as tar:
        members = tar.getmembers()
        first = np.load(io.BytesIO(tar.extractfile(members[0]).read()))
    assert len(members) == 50 and first.shape == (1, 3, 224, 224) and first.dtype == np.float32
    with tarfile.open(kit / "clip_text_calib.tar") as tar:
        ids = np.load(io.BytesIO(tar.extractfile(tar.getmembers()[0]).read()))
    assert ids.shape == (1, 77) and ids.dtype == np.int32
    assert "pulsar2 build" in (kit / "BUILD.md").read_text()


def test_export_clip_without_a_tag_source_is_a_clear_cli_error(tmp_path: Path) -> None:
    from pi_axera_sd_service.export import clip as export_module

    try:
        export_module.timm_imagenet21k_tags()
        pytest.skip("timm is installed here: its list is the default")
    except FileNotFoundError:
        pass
    proc = subprocess.run([sys.executable, "-m", "pi_axera_sd_service", "export-clip", tmp_path / "out",
                           "--model", tmp_path / "no-model"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "--tags" in proc.stderr
