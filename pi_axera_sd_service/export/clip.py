"""export-clip: CLIP (default openai/clip-vit-base-patch32) to the files interrogation serves from.

Writes into OUT_DIR:
- `clip_base_vision.onnx`: `pixel_values` float32 [1,3,224,224] -> `last_hidden_state`,
  `pooler_output` [1,768];
- `clip_base_text.onnx`: `input_ids` int32 [1,77] -> `last_hidden_state`, `pooler_output` [1,512];
  both static batch 1, opset 14, eager attention (what Pulsar2 accepted upstream; a dynamic batch axis
  made it fail);
- `clip_visual_projection.npy` [768,512] and `clip_text_projection.npy` [512,512] (`weight.T`);
- `interrogate_tags.txt`: the given text file's lines, or the ImageNet-21k lemmas timm ships;
- `pulsar2/`: U16 MinMax build configs, the calibration tars (`Numpy` format) and BUILD.md with the
  `pulsar2 build` commands that make the two `.axmodel` files.

torch and transformers are imported inside the functions only.
"""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import tarfile
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..pipeline.clip import label_ids, preprocess
from ..pipeline.images import decode_image_bytes
from ..pipeline.tokenizer import ClipTokenizer
from ..runtime.clip_models import (
    CONTEXT_LEN,
    IMAGE_SIZE,
    TAGS_FILE,
    TEXT_FILE,
    TEXT_PROJECTION_FILE,
    VISION_FILE,
    VISUAL_PROJECTION_FILE,
    check_clip_text,
    check_clip_vision,
)

log = logging.getLogger(__name__)

DEFAULT_MODEL = "openai/clip-vit-base-patch32"
OPSET = 14
CALIBRATION_SIZE = 50
TIMM_LEMMAS = ("data/_info/imagenet21k_goog_synsets.txt", "data/_info/imagenet_synset_to_lemma.txt")
MAX_CALIBRATION_PIXELS = 40_000_000


# --- tag list ------------------------------------------------------------------------------------


def timm_imagenet21k_tags() -> list[str]:
    """The first lemma of each ImageNet-21k synset, from the files timm ships (no import of timm)."""
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "no tag list: give --tags FILE (one tag a line), or pip install timm for its ImageNet-21k lemmas"
        )
    root = Path(next(iter(spec.submodule_search_locations)))
    synsets_path, lemmas_path = (root / name for name in TIMM_LEMMAS)
    lemmas = {}
    for line in lemmas_path.read_text(encoding="utf-8").splitlines():
        synset, _, names = line.partition("\t")
        lemmas[synset.strip()] = names.split(",")[0].strip().replace("_", " ")
    synsets = synsets_path.read_text(encoding="utf-8").split()
    return list(dict.fromkeys(lemmas[s] for s in synsets if lemmas.get(s)))


def read_tag_file(path: Path) -> list[str]:
    """Stripped, non-blank lines, first occurrence kept."""
    lines = (line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines())
    tags = list(dict.fromkeys(line for line in lines if line))
    if not tags:
        raise ValueError(f"{path}: no tags in the file")
    return tags


# --- ONNX graphs ---------------------------------------------------------------------------------


def load_clip_model(model: Any) -> Any:
    """A CLIPModel instance as is, or `CLIPModel.from_pretrained(name or folder)` with eager attention."""
    from transformers import CLIPModel

    if isinstance(model, CLIPModel):
        loaded = model
    else:
        loaded = CLIPModel.from_pretrained(str(model), attn_implementation="eager")
    if hasattr(loaded, "set_attn_implementation"):  # sdpa graphs are what Pulsar2 cannot take
        loaded.set_attn_implementation("eager")
    else:
        for config in (loaded.config, loaded.config.text_config, loaded.config.vision_config):
            config._attn_implementation = "eager"
    return loaded.eval()


def export_graphs(clip: Any, out_dir: Path, opset: int = OPSET) -> tuple[Path, Path]:
    """The vision and text ONNX graphs, static batch 1, outputs (last_hidden_state, pooler_output)."""
    import torch

    class Vision(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.vision_model = clip.vision_model

        def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            out = self.vision_model(pixel_values=pixel_values)
            return out.last_hidden_state, out.pooler_output

    class Text(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.text_model = clip.text_model

        def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            out = self.text_model(input_ids=input_ids.long())  # fed int32 on the NPU (src_dtype S32)
            return out.last_hidden_state, out.pooler_output

    vision_path, text_path = out_dir / f"{VISION_FILE}.onnx", out_dir / f"{TEXT_FILE}.onnx"
    examples = (
        (Vision(), torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE), "pixel_values", vision_path),
        (Text(), torch.zeros(1, CONTEXT_LEN, dtype=torch.int32), "input_ids", text_path),
    )
    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter is deliberate (opset 14, as Pulsar2 took upstream); tracing CLIP's
        # shape checks is expected to freeze them (static batch 1, 224x224, 77 tokens).
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="Exporting aten::index")  # EOS indices are >= 0
        for module, example, input_name, path in examples:
            torch.onnx.export(
                module.eval(), (example,), str(path), dynamo=False, opset_version=opset,
                input_names=[input_name], output_names=["last_hidden_state", "pooler_output"],
                do_constant_folding=True,
            )
    return vision_path, text_path


def save_projections(clip: Any, out_dir: Path) -> tuple[Path, Path]:
    """`visual_projection.weight.T` [768,512] and `text_projection.weight.T` [512,512] as float32 .npy."""
    paths = (out_dir / VISUAL_PROJECTION_FILE, out_dir / TEXT_PROJECTION_FILE)
    for layer, path in zip((clip.visual_projection, clip.text_projection), paths, strict=True):
        np.save(path, layer.weight.detach().float().numpy().T.astype(np.float32))
    return paths


def check_exported(vision_path: Path, text_path: Path) -> None:
    """Load both graphs on onnxruntime (when installed) and check the serving contract."""
    if importlib.util.find_spec("onnxruntime") is None:
        log.warning("onnxruntime not installed: the exported graphs were not checked against the contract")
        return
    from ..runtime.onnx_backend import OnnxSession

    check_clip_vision(OnnxSession(vision_path))
    check_clip_text(OnnxSession(text_path))


# --- Pulsar2 configs and calibration -------------------------------------------------------------


def _tar_of_arrays(path: Path, arrays: Iterable[np.ndarray]) -> int:
    """A tar of `<i>.npy` files (Pulsar2 `calibration_format: Numpy`); returns the count."""
    count = 0
    with tarfile.open(path, "w") as tar:
        for count, array in enumerate(arrays, start=1):
            buffer = io.BytesIO()
            np.save(buffer, array)
            info = tarfile.TarInfo(f"{count - 1}.npy")
            info.size = buffer.tell()
            buffer.seek(0)
            tar.addfile(info, buffer)
    return count


def calibration_images(folder: Path | None, count: int) -> list[Image.Image]:
    """Up to `count` images from `folder` (PNG/JPEG/WEBP); without one, synthetic gradients and noise."""
    if folder is not None:
        suffixes = (".png", ".jpg", ".jpeg", ".webp")
        files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in suffixes)
        if not files:
            raise FileNotFoundError(f"{folder}: no PNG/JPEG/WEBP calibration images")
        return [decode_image_bytes(p.read_bytes(), MAX_CALIBRATION_PIXELS) for p in files[:count]]
    log.warning("no --calibration-images: calibrating on synthetic images (real photos quantise better)")
    rng = np.random.default_rng(0)
    images = []
    for i in range(count):
        base = rng.uniform(0, 255, 3)
        ramp = np.linspace(0, 1, IMAGE_SIZE)[:, None, None] * rng.uniform(-120, 120, 3)
        noise = rng.normal(0, 10 + 4 * (i % 8), (IMAGE_SIZE, IMAGE_SIZE, 3))
        pixels = np.clip(base + ramp + noise, 0, 255).astype(np.uint8)
        images.append(Image.fromarray(pixels, "RGB"))
    return images


def pulsar2_config(input_name: str, dataset: str, size: int, src_dtype: str | None = None) -> dict:
    """U16 MinMax NPU3 build config, as upstream built the CLIP models."""
    config: dict = {
        "model_type": "ONNX",
        "npu_mode": "NPU3",
        "quant": {
            "input_configs": [{
                "tensor_name": input_name,
                "calibration_dataset": dataset,
                "calibration_size": size,
                "calibration_format": "Numpy",
            }],
            "calibration_method": "MinMax",
            "precision_analysis": False,
            "conv_bias_data_type": "FP32",
            "layer_configs": [
                {"start_tensor_names": ["DEFAULT"], "end_tensor_names": ["DEFAULT"], "data_type": "U16"}
            ],
        },
        "compiler": {"npu_perf": False},
    }
    if src_dtype is not None:
        config["input_processors"] = [{"tensor_name": input_name, "src_dtype": src_dtype}]
    return config


def write_pulsar2_kit(out_dir: Path, tags: Sequence[str], tokenizer: ClipTokenizer,
                      images_folder: Path | None, size: int = CALIBRATION_SIZE) -> Path:
    """`pulsar2/`: calibration tars, the two configs and BUILD.md."""
    kit = out_dir / "pulsar2"
    kit.mkdir(parents=True, exist_ok=True)
    n_vision = _tar_of_arrays(kit / "clip_vision_calib.tar",
                              (preprocess(image) for image in calibration_images(images_folder, size)))
    step = max(1, len(tags) // size)
    n_text = _tar_of_arrays(kit / "clip_text_calib.tar",
                            (label_ids(tokenizer, tag) for tag in list(tags)[::step][:size]))
    configs = {
        "clip_vision_u16.json": pulsar2_config("pixel_values", "./clip_vision_calib.tar", n_vision),
        "clip_text_u16.json": pulsar2_config("input_ids", "./clip_text_calib.tar", n_text, "S32"),
    }
    for name, config in configs.items():
        (kit / name).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (kit / "BUILD.md").write_text(BUILD_NOTES, encoding="utf-8")
    return kit


BUILD_NOTES = f"""# Building the CLIP axmodels with Pulsar2 (in the Pulsar2 docker image, from this folder)

    pulsar2 build --input ../{VISION_FILE}.onnx --config clip_vision_u16.json \\
        --output_dir build_vision --output_name {VISION_FILE}.axmodel --target_hardware AX650
    pulsar2 build --input ../{TEXT_FILE}.onnx --config clip_text_u16.json \\
        --output_dir build_text --output_name {TEXT_FILE}.axmodel --target_hardware AX650

Copy `build_vision/{VISION_FILE}.axmodel`, `build_text/{TEXT_FILE}.axmodel`,
`../{VISUAL_PROJECTION_FILE}`, `../{TEXT_PROJECTION_FILE}` and `../{TAGS_FILE}`
into the service's TEXT_MODEL_DIR (default MODEL_DIR), then run
`pi-axera-sd check-models`. The calibration tars hold {CALIBRATION_SIZE} preprocessed images (pixel_values
float32[1,3,224,224]) and tag prompts (input_ids int32[1,77]); re-run export-clip with
--calibration-images DIR to calibrate on your own photos.
"""


# --- the command ---------------------------------------------------------------------------------


def export_clip(out_dir: Path, model: Any = DEFAULT_MODEL, tags_file: Path | None = None,
                tokenizer_dir: Path | None = None, images_folder: Path | None = None,
                opset: int = OPSET) -> list[Path]:
    """Write everything interrogation needs into `out_dir`; returns the files written (kit folder last).

    `model`: a CLIPModel, a local folder or a Hugging Face name (downloaded by transformers on this
    machine; the service itself never downloads). `tokenizer_dir`: a CLIP `vocab.json`/`merges.txt`
    folder for the text calibration prompts (default: the model folder, else ./models/tokenizer).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tags = read_tag_file(tags_file) if tags_file is not None else timm_imagenet21k_tags()
    tokenizer = ClipTokenizer.from_dir(_tokenizer_folder(model, tokenizer_dir))
    clip = load_clip_model(model)
    vision_path, text_path = export_graphs(clip, out_dir, opset)
    check_exported(vision_path, text_path)
    projections = save_projections(clip, out_dir)
    tags_path = out_dir / TAGS_FILE
    tags_path.write_text("\n".join(tags) + "\n", encoding="utf-8")
    kit = write_pulsar2_kit(out_dir, tags, tokenizer, images_folder)
    return [vision_path, text_path, *projections, tags_path, kit]


def _tokenizer_folder(model: Any, tokenizer_dir: Path | None) -> Path:
    if tokenizer_dir is not None:
        return Path(tokenizer_dir)
    if isinstance(model, (str, Path)) and (Path(model) / "vocab.json").is_file():
        return Path(model)
    if isinstance(model, str) and not Path(model).exists():
        from huggingface_hub import snapshot_download  # transformers' own dependency

        return Path(snapshot_download(model, allow_patterns=["vocab.json", "merges.txt", "*.json"]))
    return Path("models/tokenizer")
