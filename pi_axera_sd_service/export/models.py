"""`export-models`: a diffusers SD1.5 pipeline (+ a fused LCM-LoRA) -> ONNX files in the upstream layout.

Writes, into OUT_DIR: `text_encoder/sd15_text_encoder_sim.onnx` (input_ids -> last_hidden_state only),
`unet.onnx` cut after the time embedding (inputs `sample`, `/down_blocks.0/resnets.0/act_1/Mul_output_0`,
`encoder_hidden_states`), `vae_decoder.onnx` (input `x` = latent / scaling factor), `vae_encoder.onnx`
(`image_sample` -> moments [1,8,h,w]), `tokenizer/`, `time_input_txt2img.npy` (999, 759, 499, 259),
`time_input_table.npy` (every t), `pulsar2/*.json` build configs and `manifest.json`. Static batch 1.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np

from ..pipeline.scheduler import VAE_SCALING_FACTOR
from ..runtime.contract import TIMESTEPS
from ..runtime.model_dir import TEXT_ENCODER_FILE, TIME_TABLE_FILE, file_sha256
from .pulsar2 import write_build_configs

OPSET = 17  # Pulsar2 reads opset 11..18 graphs; upstream exported 17 ([orig]) and 18 ([fork])
UNET_TIME_INPUT = "/down_blocks.0/resnets.0/act_1/Mul_output_0"
FOUR_ROWS_FILE = "time_input_txt2img.npy"
MANIFEST_FILE = "manifest.json"


class ExportError(ValueError):
    """The source cannot be exported to the contract."""


def load_pipeline(source: str, lora: str | None = None, lora_scale: float = 1.0):
    """StableDiffusionPipeline in float32 on the CPU, with the LoRA fused at `lora_scale`."""
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        source, torch_dtype=torch.float32, safety_checker=None, requires_safety_checker=False
    )
    if lora is not None:
        lora_path = Path(lora)
        if lora_path.is_file():
            pipe.load_lora_weights(str(lora_path.parent), weight_name=lora_path.name, adapter_name="lcm")
        else:
            pipe.load_lora_weights(lora, adapter_name="lcm")
        pipe.fuse_lora(lora_scale=lora_scale)
        pipe.unload_lora_weights()
    for model in (pipe.text_encoder, pipe.unet, pipe.vae):
        model.eval().requires_grad_(False)
    return pipe


def time_table(unet) -> np.ndarray:
    """float32 [1000,1280]: SiLU(time_embedding(time_proj(t))) with the UNet's own modules."""
    import torch

    with torch.no_grad():
        t = torch.arange(1000, dtype=torch.float32)
        emb = unet.time_embedding(unet.time_proj(t).to(torch.float32))
        return torch.nn.functional.silu(emb).numpy().astype(np.float32)


def _check_unet(unet) -> None:
    """The cut feeds SiLU(emb) to every resnet: only valid for SD1.5-style UNets."""
    import torch
    from diffusers.models.resnet import ResnetBlock2D

    config = unet.config
    if any(config.get(key) for key in ("class_embed_type", "addition_embed_type", "time_cond_proj_dim")):
        raise ExportError("the UNet has class/addition/condition embeddings: not an SD1.5 UNet")
    if unet.time_embed_act is not None or unet.time_embedding.post_act is not None:
        raise ExportError("the UNet's time embedding has a post-activation: not an SD1.5 UNet")
    for module in unet.modules():
        if isinstance(module, ResnetBlock2D) and module.time_emb_proj is not None and (
            module.skip_time_act or not isinstance(module.nonlinearity, torch.nn.SiLU)
        ):
            raise ExportError("a resnet block does not apply SiLU to the time embedding")


def _cut_unet(unet):
    """A module (sample, SiLU(emb), context) -> eps running the UNet body without its time embedding."""
    import torch
    from diffusers.models.resnet import ResnetBlock2D

    _check_unet(unet)

    class CutUNet(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.unet = unet

        def forward(self, sample, time_input, context):
            u = self.unet
            h = u.conv_in(sample)
            skips = (h,)
            for block in u.down_blocks:
                if getattr(block, "has_cross_attention", False):
                    h, res = block(hidden_states=h, temb=time_input, encoder_hidden_states=context)
                else:
                    h, res = block(hidden_states=h, temb=time_input)
                skips += res
            if getattr(u.mid_block, "has_cross_attention", False):
                h = u.mid_block(h, time_input, encoder_hidden_states=context)
            else:
                h = u.mid_block(h, time_input)
            for block in u.up_blocks:
                res, skips = skips[-len(block.resnets):], skips[: -len(block.resnets)]
                if getattr(block, "has_cross_attention", False):
                    h = block(hidden_states=h, temb=time_input, res_hidden_states_tuple=res,
                              encoder_hidden_states=context)
                else:
                    h = block(hidden_states=h, temb=time_input, res_hidden_states_tuple=res)
            if u.conv_norm_out is not None:
                h = u.conv_act(u.conv_norm_out(h))
            return u.conv_out(h)

    # The time input is already SiLU(emb): every resnet must skip its own SiLU of it.
    for module in unet.modules():
        if isinstance(module, ResnetBlock2D):
            module.skip_time_act = True
    return CutUNet().eval()


def write_tokenizer(tokenizer, folder: Path) -> None:
    """save_pretrained, plus vocab.json and merges.txt (what the service reads) when transformers wrote
    only tokenizer.json."""
    tokenizer.save_pretrained(str(folder))
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return
    model = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (folder / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("\n".join(["#version: 0.2", *merges]) + "\n", encoding="utf-8")


def _export(module, args: tuple, path: Path, inputs: list[str], outputs: list[str]) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), input_names=inputs, output_names=outputs,
                          opset_version=OPSET, do_constant_folding=True, dynamo=False)


def export_models(
    source: str,
    out_dir: Path,
    lora: str | None = None,
    lora_scale: float = 1.0,
    latent_size: int | None = None,
) -> dict:
    """Export everything into `out_dir`; returns the manifest (also written as manifest.json)."""
    import torch

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline(source, lora, lora_scale)
    unet, vae, text_encoder = pipe.unet, pipe.vae, pipe.text_encoder
    side = int(latent_size or unet.config.sample_size)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if factor != 8:
        raise ExportError(f"the VAE scales by {factor}, the contract needs 8")
    scaling = float(vae.config.scaling_factor)
    if abs(scaling - VAE_SCALING_FACTOR) > 1e-6:
        raise ExportError(f"the VAE's scaling factor is {scaling}, the service uses {VAE_SCALING_FACTOR}")

    table = time_table(unet)  # before the cut changes the resnets
    np.save(out_dir / TIME_TABLE_FILE, table)
    np.save(out_dir / FOUR_ROWS_FILE, table[list(TIMESTEPS)])
    write_tokenizer(pipe.tokenizer, out_dir / "tokenizer")

    ids = torch.zeros((1, pipe.tokenizer.model_max_length), dtype=torch.int64)
    hidden = int(text_encoder.config.hidden_size)

    class LastHiddenState(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.text_encoder = text_encoder

        def forward(self, input_ids):
            return self.text_encoder(input_ids)[0]

    if hasattr(text_encoder, "set_attn_implementation"):
        text_encoder.set_attn_implementation("eager")
    _export(LastHiddenState(), (ids,), out_dir / f"{TEXT_ENCODER_FILE}.onnx", ["input_ids"],
            ["last_hidden_state"])

    class Decoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.vae = vae

        def forward(self, x):
            return self.vae.decode(x).sample

    class Encoder(Decoder):
        def forward(self, image_sample):
            h = self.vae.encoder(image_sample)
            return self.vae.quant_conv(h) if self.vae.quant_conv is not None else h

    latent = torch.zeros((1, 4, side, side))
    _export(Decoder(), (latent,), out_dir / "vae_decoder.onnx", ["x"], ["sample"])
    _export(Encoder(), (torch.zeros((1, 3, 8 * side, 8 * side)),), out_dir / "vae_encoder.onnx",
            ["image_sample"], ["latent_sample"])
    context = torch.zeros((1, ids.shape[1], hidden))
    _export(_cut_unet(unet), (latent, torch.from_numpy(table[999:1000]), context), out_dir / "unet.onnx",
            ["sample", UNET_TIME_INPUT, "encoder_hidden_states"], ["out_sample"])

    configs = write_build_configs(out_dir / "pulsar2")
    files = [f"{TEXT_ENCODER_FILE}.onnx", "unet.onnx", "vae_decoder.onnx", "vae_encoder.onnx",
             FOUR_ROWS_FILE, TIME_TABLE_FILE]
    manifest = {
        "source": str(source),
        "lora": str(lora) if lora is not None else None,
        "lora_scale": lora_scale if lora is not None else None,
        "latent_size": [side, side],
        "image_size": [8 * side, 8 * side],
        "vae_scaling_factor": scaling,
        "opset": OPSET,
        "versions": _versions(),
        "files": {name: file_sha256(out_dir / name) for name in files},
        "pulsar2_configs": [str(p.relative_to(out_dir)) for p in configs],
    }
    (out_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def _versions() -> dict[str, str]:
    import diffusers
    import onnx
    import torch
    import transformers

    return {m.__name__: m.__version__ for m in (torch, diffusers, transformers, onnx)}
