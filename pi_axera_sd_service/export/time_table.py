"""The time table: SiLU(time_embedding(time_proj(t))) for t = 0..999, the UNet's time input at every timestep.

Computed in numpy from the four time-embedding tensors only, read from safetensors without loading the
rest of the UNet (seconds on a Raspberry Pi): a diffusers UNet folder (`unet/config.json` +
`diffusion_pytorch_model*.safetensors`, sharded or not) or a single-file SD1.5 checkpoint
(`model.diffusion_model.time_embed.*`). An optional LoRA is fused into those tensors when it touches them.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np

from ..runtime.contract import NUM_TRAIN_TIMESTEPS, TIME_DIM
from ..runtime.model_dir import TIME_TABLE_FILE

DIFFUSERS_KEYS = {
    "w1": "time_embedding.linear_1.weight",
    "b1": "time_embedding.linear_1.bias",
    "w2": "time_embedding.linear_2.weight",
    "b2": "time_embedding.linear_2.bias",
}
SINGLE_FILE_KEYS = {
    "w1": "model.diffusion_model.time_embed.0.weight",
    "b1": "model.diffusion_model.time_embed.0.bias",
    "w2": "model.diffusion_model.time_embed.2.weight",
    "b2": "model.diffusion_model.time_embed.2.bias",
}
# SD1.5's UNet config (diffusers defaults): what a single-file checkpoint implies.
SD15_TIME_CONFIG = {"block_out_channels": [320], "flip_sin_to_cos": True, "freq_shift": 0}
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")
LORA_LAYERS = {
    "w1": ("linear_1", "time_embed_0", "time_embed.0"),
    "w2": ("linear_2", "time_embed_2", "time_embed.2"),
}


class TimeTableError(ValueError):
    """The source cannot give a time table (missing files or keys, unsupported config)."""


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def sinusoid(dim: int, flip_sin_to_cos: bool, freq_shift: float) -> np.ndarray:
    """float32 [1000, dim]: diffusers' `get_timestep_embedding` for t = 0..999 (float32 as diffusers)."""
    half = dim // 2
    exponent = (-math.log(10000.0) * np.arange(half, dtype=np.float32)) / np.float32(half - freq_shift)
    args = np.arange(NUM_TRAIN_TIMESTEPS, dtype=np.float32)[:, None] * np.exp(exponent)[None, :]
    emb = np.concatenate([np.sin(args), np.cos(args)], axis=1)
    if flip_sin_to_cos:
        emb = np.concatenate([emb[:, half:], emb[:, :half]], axis=1)
    if dim % 2:
        emb = np.pad(emb, ((0, 0), (0, 1)))
    return emb.astype(np.float32)


def compute_table(weights: dict[str, np.ndarray], config: dict) -> np.ndarray:
    """float32 [1000,1280] from the time-embedding tensors (keys w1 b1 w2 b2) and the UNet config."""
    _check_config(config)
    emb = sinusoid(int(config["block_out_channels"][0]), bool(config.get("flip_sin_to_cos", True)),
                   float(config.get("freq_shift", 0)))
    w1, b1, w2, b2 = (weights[k].astype(np.float64) for k in ("w1", "b1", "w2", "b2"))
    hidden = _silu(emb.astype(np.float64) @ w1.T + b1)
    table = _silu(hidden @ w2.T + b2).astype(np.float32)
    if table.shape != (NUM_TRAIN_TIMESTEPS, TIME_DIM):
        raise TimeTableError(f"time embedding gives {list(table.shape)} rows, the contract needs "
                             f"[{NUM_TRAIN_TIMESTEPS},{TIME_DIM}]")
    return table


def _check_config(config: dict) -> None:
    """Only the SD1.5 kind of time embedding: positional sinusoid, SiLU MLP, no post-activation."""
    unsupported = {
        "time_embedding_type": ("positional",),
        "act_fn": ("silu",),
        "timestep_post_act": (None,),
        "time_cond_proj_dim": (None,),
        "time_embedding_act_fn": (None,),
        "class_embed_type": (None,),
        "addition_embed_type": (None,),
    }
    for key, allowed in unsupported.items():
        value = config.get(key, allowed[0])
        if value not in allowed:
            raise TimeTableError(f"UNet config {key}={value!r} is not supported (SD1.5 has {allowed[0]!r})")


def read_time_weights(source: Path) -> tuple[dict[str, np.ndarray], dict]:
    """The four time-embedding tensors and the UNet config, from a folder or a single .safetensors file."""
    source = Path(source)
    if source.is_file():
        return _read_tensors([source], SINGLE_FILE_KEYS), dict(SD15_TIME_CONFIG)
    unet = source / "unet" if (source / "unet" / "config.json").is_file() else source
    config_path = unet / "config.json"
    if not config_path.is_file():
        raise TimeTableError(f"{source}: no UNet config.json (expected a diffusers folder or its unet/)")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    index = unet / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        files = sorted({unet / weight_map[key] for key in DIFFUSERS_KEYS.values() if key in weight_map})
    else:
        files = [unet / name for name in WEIGHT_FILES if (unet / name).is_file()][:1]
    if not files:
        raise TimeTableError(f"{unet}: no {' or '.join(WEIGHT_FILES)} (only safetensors weights are read)")
    return _read_tensors(files, DIFFUSERS_KEYS), config


def _read_tensors(files: list[Path], keys: dict[str, str]) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    found: dict[str, np.ndarray] = {}
    for path in files:
        with safe_open(str(path), framework="np") as handle:
            names = set(handle.keys())
            for short, key in keys.items():
                if key in names:
                    found[short] = np.asarray(handle.get_tensor(key), dtype=np.float32)
    missing = [key for short, key in keys.items() if short not in found]
    if missing:
        raise TimeTableError(f"{', '.join(map(str, files))}: missing {', '.join(missing)}")
    return found


def fuse_lora(weights: dict[str, np.ndarray], lora_file: Path, scale: float) -> list[str]:
    """Add a LoRA's deltas to linear_1/linear_2 in place; returns the layers it touched (often none:
    LCM-LoRA training does not target the time embedding)."""
    from safetensors import safe_open

    touched = []
    with safe_open(str(lora_file), framework="np") as handle:
        keys = [k for k in handle.keys() if "time_embed" in k]  # noqa: SIM118 (safe_open: no iteration)
        for short, names in LORA_LAYERS.items():
            layer = [k for k in keys if any(n in k for n in names)]
            down = next((k for k in layer if re.search(r"(lora_down|lora_A|lora\.down)\.weight$", k)), None)
            up = next((k for k in layer if re.search(r"(lora_up|lora_B|lora\.up)\.weight$", k)), None)
            if down is None or up is None:
                continue
            a, b = handle.get_tensor(down).astype(np.float64), handle.get_tensor(up).astype(np.float64)
            alpha_key = next((k for k in layer if k.endswith(".alpha")), None)
            ratio = float(handle.get_tensor(alpha_key)) / a.shape[0] if alpha_key else 1.0
            weights[short] = (weights[short] + scale * ratio * (b @ a)).astype(np.float32)
            touched.append(short)
    return touched


def write_table(source: Path, out: Path, lora: Path | None = None, lora_scale: float = 1.0) -> dict:
    """Compute the table from `source` (and `lora`), save it as .npy; returns a summary for the CLI."""
    weights, config = read_time_weights(source)
    fused = fuse_lora(weights, Path(lora), lora_scale) if lora is not None else []
    table = compute_table(weights, config)
    out = Path(out)
    if out.is_dir():
        out = out / TIME_TABLE_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, table)
    return {"path": str(out), "shape": list(table.shape), "lora_layers_fused": fused}
