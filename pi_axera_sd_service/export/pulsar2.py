"""Pulsar2 build configs and calibration sets for the exported models.

The configs follow the ones the published axmodels were built with ([orig] `model_convert/configs/`):
every layer U16, MinMax calibration, NPU3 (AX650N), end-to-end precision analysis. The calibration
sets are written by running the exported ONNX files through this package's own pipeline on the CPU
(onnxruntime; no torch needed):
- text encoder: `Numpy` format, one int [1,77] `input_ids` array per prompt;
- UNet: `NumpyObject` format, one {input name: array} dict per (prompt, step);
- VAE decoder: `NumpyObject`, {"x": final latent / 0.18215} per prompt;
- VAE encoder: `Image` format, the decoded images as PNG (mean/std 127.5 map them to [-1,1]).
The compile itself (`pulsar2 build`) runs in Axera's toolchain container on an x86 PC.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

CALIBRATION_DIR = "calibration"
NPU_MODE = "NPU3"  # AX650N


def _quant(dataset: str, size: int, fmt: str, **extra: object) -> dict:
    return {
        "input_configs": [{"tensor_name": "DEFAULT", "calibration_dataset": dataset,
                           "calibration_size": size, "calibration_format": fmt, **extra}],
        "calibration_method": "MinMax",
        "precision_analysis": True,
        "precision_analysis_method": "EndToEnd",
        "layer_configs": [
            {"start_tensor_names": ["DEFAULT"], "end_tensor_names": ["DEFAULT"], "data_type": "U16"}
        ],
    }


def build_configs(calibration_dir: str = CALIBRATION_DIR) -> dict[str, dict]:
    """Config per model, keyed by the ONNX file it builds; dataset paths are relative to the export folder."""
    latent_input = [{"tensor_name": "DEFAULT", "tensor_format": "AutoColorSpace", "tensor_layout": "NCHW"}]
    smooth = {"conv_bias_data_type": "FP32", "enable_smooth_quant": True, "disable_auto_refine_scale": True}
    return {
        "text_encoder/sd15_text_encoder_sim.onnx": {
            "model_type": "ONNX", "npu_mode": NPU_MODE,
            "quant": {**_quant(f"{calibration_dir}/text_encoder.tar", -1, "Numpy"), **smooth},
            "input_processors": [{"tensor_name": "DEFAULT", "src_dtype": "U32"}],
            "compiler": {"npu_perf": False},
        },
        "unet.onnx": {
            "model_type": "ONNX", "npu_mode": NPU_MODE,
            "quant": _quant(f"{calibration_dir}/unet.tar", -1, "NumpyObject"),
            "input_processors": latent_input,
            "compiler": {"check": 0},
        },
        "vae_decoder.onnx": {
            "model_type": "ONNX", "npu_mode": NPU_MODE,
            "quant": _quant(f"{calibration_dir}/vae_decoder.tar", -1, "NumpyObject"),
            "input_processors": latent_input,
            "compiler": {"check": 0},
        },
        "vae_encoder.onnx": {
            "model_type": "ONNX", "npu_mode": NPU_MODE,
            "quant": {**_quant(f"{calibration_dir}/vae_encoder.tar", -1, "Image",
                               calibration_mean=[127.5] * 3, calibration_std=[127.5] * 3), **smooth},
            "input_processors": [{"tensor_name": "DEFAULT", "tensor_format": "RGB", "tensor_layout": "NCHW",
                                  "mean": [0, 0, 0], "std": [1, 1, 1]}],
            "compiler": {"npu_perf": False, "check": 0},
        },
    }


def config_name(onnx_file: str) -> str:
    """`text_encoder/sd15_text_encoder_sim.onnx` -> `sd15_text_encoder_sim_u16.json`."""
    return Path(onnx_file).stem + "_u16.json"


def write_build_configs(folder: Path) -> list[Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for onnx_file, config in build_configs().items():
        path = folder / config_name(onnx_file)
        path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        written.append(path)
    return written


def build_commands(export_dir: str = ".", output_dir: str = "axmodels") -> list[str]:
    """The `pulsar2 build` command per model, run from the export folder inside the toolchain container."""
    commands = []
    for onnx_file in build_configs():
        axmodel = Path(onnx_file).with_suffix(".axmodel").name
        commands.append(
            f"pulsar2 build --input {export_dir}/{onnx_file} --output_dir {output_dir} "
            f"--output_name {axmodel} --config {export_dir}/pulsar2/{config_name(onnx_file)}"
        )
    return commands


class _Tar:
    """A tar archive written member by member from memory."""

    def __init__(self, path: Path) -> None:
        self.tar = tarfile.open(path, "w")  # noqa: SIM115 (closed by close())
        self.count = 0

    def add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        self.tar.addfile(info, io.BytesIO(data))
        self.count += 1

    def add_npy(self, name: str, value: np.ndarray | Mapping[str, np.ndarray]) -> None:
        buffer = io.BytesIO()
        if isinstance(value, Mapping):  # NumpyObject: a pickled {input name: array}
            np.save(buffer, dict(value), allow_pickle=True)
        else:
            np.save(buffer, value)
        self.add(name, buffer.getvalue())

    def close(self) -> None:
        self.tar.close()


class _Recording:
    """A Session that passes runs through and keeps each feed (for the calibration sets)."""

    def __init__(self, session, feeds: list[dict[str, np.ndarray]]) -> None:
        self._session = session
        self.feeds = feeds
        self.path, self.backend = session.path, session.backend
        self.inputs, self.outputs = session.inputs, session.outputs

    def run(self, feed):
        self.feeds.append({name: np.array(value) for name, value in feed.items()})
        return self._session.run(feed)


def write_calibration(model_dir: Path, prompts: list[str], out_dir: Path | None = None, steps: int = 4,
                      seed: int = 0) -> dict[str, int]:
    """Run every prompt through the exported ONNX models and write the four calibration tars."""
    from ..pipeline.generate import ImageJob, Pipeline
    from ..pipeline.scheduler import txt2img_timesteps
    from ..pipeline.tokenizer import ClipTokenizer
    from ..runtime.model_dir import load_models, resolve_model_files

    if not prompts:
        raise ValueError("no prompts: give at least one (one per line)")
    model_dir = Path(model_dir)
    out_dir = Path(out_dir) if out_dir is not None else model_dir / CALIBRATION_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    feeds: dict[str, list[dict[str, np.ndarray]]] = {}

    def record(role: str, session):
        return _Recording(session, feeds.setdefault(role, []))

    files, backend = resolve_model_files(model_dir=model_dir, backend="onnxruntime")
    models = load_models(files, backend, wrap=record)
    pipeline = Pipeline(models, ClipTokenizer.from_dir(models.tokenizer_dir))
    timesteps = txt2img_timesteps(steps, models.time.full)
    roles = ("text_encoder", "unet", "vae_decoder", "vae_encoder")
    tars = {role: _Tar(out_dir / f"{role}.tar") for role in roles}
    try:
        for p, prompt in enumerate(prompts):
            for feed in feeds.values():
                feed.clear()
            output = pipeline.generate(ImageJob(prompt=prompt, negative_prompt="", seed=seed + p, subseed=0,
                                                subseed_strength=0.0, timesteps=timesteps, cfg_scale=1.0,
                                                init_image=None))
            for feed in feeds.get("text_encoder", [])[:1]:
                tars["text_encoder"].add_npy(f"text_{p}.npy", next(iter(feed.values())))
            for i, feed in enumerate(feeds.get("unet", [])):
                tars["unet"].add_npy(f"unet_{p}_{i}.npy", feed)
            for feed in feeds.get("vae_decoder", [])[-1:]:
                tars["vae_decoder"].add_npy(f"vae_decoder_{p}.npy", feed)
            png = io.BytesIO()
            output.image.save(png, format="PNG")
            tars["vae_encoder"].add(f"image_{p}.png", png.getvalue())
    finally:
        for tar in tars.values():
            tar.close()
    return {role: tar.count for role, tar in tars.items()}
