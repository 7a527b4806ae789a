"""The export toolchain against diffusers itself, on tiny randomly initialised SD1.5-shaped models.

export-models -> the project's loader -> the project's pipeline must give diffusers'
StableDiffusion(Img2Img)Pipeline + LCMScheduler's final latents with the same noise. This checks the UNet
cut, the time table and our LCM math against the reference, not against ourselves.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs the export extra (torch): EXTRAS=onnx,dev,export")
diffusers = pytest.importorskip("diffusers", reason="needs the export extra (diffusers)")
pytest.importorskip("transformers", reason="needs the export extra (transformers)")

from PIL import Image  # noqa: E402

from pi_axera_sd_service.export.models import export_models  # noqa: E402
from pi_axera_sd_service.export.pulsar2 import build_commands  # noqa: E402
from pi_axera_sd_service.export.time_table import write_table  # noqa: E402
from pi_axera_sd_service.pipeline.generate import ImageJob, Pipeline  # noqa: E402
from pi_axera_sd_service.pipeline.scheduler import img2img_timesteps, txt2img_timesteps  # noqa: E402
from pi_axera_sd_service.pipeline.tokenizer import ClipTokenizer  # noqa: E402
from pi_axera_sd_service.runtime.contract import TIMESTEPS  # noqa: E402
from pi_axera_sd_service.runtime.demo_tokenizer import write_tokenizer  # noqa: E402
from pi_axera_sd_service.runtime.model_dir import LoadedModels, load_models, resolve_model_files  # noqa: E402

PROMPT = "a red castle"


def tiny_pipeline(folder: Path):
    """A StableDiffusionPipeline with SD1.5's interfaces (768-d context, 1280-d time embedding, 8x VAE)."""
    from diffusers import AutoencoderKL, LCMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    vocab_size = write_tokenizer(folder / "tok")
    tokenizer = CLIPTokenizer.from_pretrained(str(folder / "tok"))
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=768, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=77, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    ))
    unet = UNet2DConditionModel(
        sample_size=64, block_out_channels=(8, 8, 16), layers_per_block=1, norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),  # attention at 16x16 only
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        cross_attention_dim=768, attention_head_dim=4, time_embedding_dim=1280,
    )
    vae = AutoencoderKL(
        block_out_channels=(4, 4, 4, 4), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, latent_channels=4, norm_num_groups=2,
        sample_size=512, mid_block_add_attention=False,
    )
    with torch.no_grad():  # random init leaves some weights zero; give every layer a visible effect
        for module in (unet, vae):
            for p in module.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    scheduler = LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                             original_inference_steps=50, timestep_scaling=10.0, prediction_type="epsilon")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(str(folder / "sd"))
    return pipe


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("export")
    reference = tiny_pipeline(root)
    manifest = export_models(str(root / "sd"), root / "out")
    return reference, root, manifest


@pytest.fixture(scope="module")
def models(exported) -> LoadedModels:
    _, root, _ = exported
    files, backend = resolve_model_files(model_dir=root / "out", backend="onnxruntime")
    return load_models(files, backend)


class _LastLatent:
    def __init__(self) -> None:
        self.x0: np.ndarray | None = None

    def on_step(self, step: int, steps: int, x0: np.ndarray | None) -> None:
        self.x0 = x0

    def should_stop(self) -> bool:
        return False


def ours(models: LoadedModels, timesteps: list[int], cfg: float, init: Image.Image | None, seed: int):
    pipeline = Pipeline(models, ClipTokenizer.from_dir(models.tokenizer_dir))
    control = _LastLatent()
    pipeline.generate(ImageJob(prompt=PROMPT, negative_prompt="", seed=seed, subseed=0, subseed_strength=0.0,
                               timesteps=timesteps, cfg_scale=cfg, init_image=init), control)
    return control.x0


def diffusers_latents(monkeypatch, reference, steps: int, cfg: float, init, strength: float, seed: int):
    """diffusers' final latents, its every random draw taken from the stream our pipeline uses."""
    from diffusers import StableDiffusionImg2ImgPipeline
    from diffusers.models.autoencoders import vae as vae_module
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion as sd
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as sd_i2i
    from diffusers.schedulers import scheduling_lcm

    rng = np.random.Generator(np.random.PCG64(seed))

    def same_noise(shape, generator=None, device=None, dtype=None, layout=None):
        return torch.from_numpy(rng.standard_normal(tuple(shape), dtype=np.float32))

    for module in (vae_module, sd, sd_i2i, scheduling_lcm):
        monkeypatch.setattr(module, "randn_tensor", same_noise)
    kwargs = dict(num_inference_steps=steps, guidance_scale=cfg, output_type="latent")
    with torch.no_grad():
        if init is None:
            out = reference(PROMPT, **kwargs)
        else:
            img2img = StableDiffusionImg2ImgPipeline(**reference.components)
            out = img2img(PROMPT, image=init, strength=strength, **kwargs)
    return out.images.numpy()


@pytest.mark.parametrize("cfg", [1.0, 1.5])
@pytest.mark.parametrize("steps", [1, 2, 4, 7, 8])
def test_txt2img_matches_diffusers(exported, models, monkeypatch, steps: int, cfg: float) -> None:
    reference, _, _ = exported
    expected = diffusers_latents(monkeypatch, reference, steps, cfg, None, 1.0, seed=steps)
    got = ours(models, txt2img_timesteps(steps, models.time.full), cfg, None, seed=steps)
    assert got.shape == expected.shape == (1, 4, 64, 64)
    assert np.abs(expected).max() > 0.1
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("cfg", [1.0, 1.5])
@pytest.mark.parametrize(("steps", "strength"), [(1, 1.0), (2, 0.5), (4, 0.75), (7, 0.6), (8, 0.3)])
def test_img2img_matches_diffusers(exported, models, monkeypatch, steps: int, strength: float,
                                   cfg: float) -> None:
    reference, _, _ = exported
    yy, xx = np.mgrid[0:512, 0:512] / 512
    init = Image.fromarray((np.stack([xx, yy, 1 - xx * yy], -1) * 255).astype(np.uint8))
    expected = diffusers_latents(monkeypatch, reference, steps, cfg, init, strength, seed=10 + steps)
    timesteps = img2img_timesteps(strength, steps, models.time.full)
    assert len(timesteps) == int(steps * strength)  # diffusers' count, where round() agrees with int()
    got = ours(models, timesteps, cfg, init, seed=10 + steps)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_exported_unet_time_input_is_the_table_row(exported, models) -> None:
    reference, root, _ = exported
    table = np.load(root / "out/time_input_table.npy")
    assert table.shape == (1000, 1280) and table.dtype == np.float32 and models.time.full
    np.testing.assert_array_equal(np.load(root / "out/time_input_txt2img.npy"), table[list(TIMESTEPS)])
    np.testing.assert_array_equal(models.time_inputs, table[list(TIMESTEPS)])
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((1, 4, 64, 64), dtype=np.float32)
    context = rng.standard_normal((1, 77, 768), dtype=np.float32)
    names = models.unet_inputs
    for t in (999, 679, 339, 19, 0):  # 0 is no LCM timestep: the service keeps no row for it
        if t != 0:
            np.testing.assert_array_equal(models.time_input(t), table[t : t + 1])
        feed = {names.sample: sample, names.time: table[t : t + 1], names.context: context}
        got = models.unet.run(feed)[0]
        with torch.no_grad():
            want = reference.unet(torch.from_numpy(sample), t, torch.from_numpy(context)).sample.numpy()
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_time_table_command_reads_only_the_time_weights(exported, tmp_path: Path) -> None:
    _, root, _ = exported
    summary = write_table(root / "sd", tmp_path)  # the pipeline folder; its unet/ is found
    table = np.load(summary["path"])
    np.testing.assert_allclose(table, np.load(root / "out/time_input_table.npy"), atol=2e-5, rtol=0)
    assert summary["lora_layers_fused"] == []


def test_layout_manifest_and_pulsar2_configs(exported) -> None:
    _, root, manifest = exported
    out = root / "out"
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert manifest["latent_size"] == [64, 64] and manifest["lora"] is None
    for name, sha in manifest["files"].items():
        assert (out / name).is_file() and len(sha) == 64
    assert (out / "tokenizer/vocab.json").is_file() and (out / "tokenizer/merges.txt").is_file()
    unet = json.loads((out / "pulsar2/unet_u16.json").read_text())
    assert unet["npu_mode"] == "NPU3" and unet["quant"]["layer_configs"][0]["data_type"] == "U16"
    assert unet["quant"]["input_configs"][0]["calibration_format"] == "NumpyObject"
    text = json.loads((out / "pulsar2/sd15_text_encoder_sim_u16.json").read_text())
    assert text["input_processors"][0]["src_dtype"] == "U32"
    for command in build_commands(str(out)):  # the documented commands name files that exist
        paths = command.split()[3::2]
        assert (Path(paths[0])).is_file() and Path(paths[-1]).is_file(), command


def member(tar: tarfile.TarFile, index: int) -> np.ndarray:
    return np.load(io.BytesIO(tar.extractfile(tar.getmembers()[index]).read()), allow_pickle=True)


def test_calibration_sets(exported, tmp_path: Path) -> None:
    from pi_axera_sd_service.export.pulsar2 import write_calibration

    _, root, _ = exported
    counts = write_calibration(root / "out", ["a red castle", "a cat"], tmp_path, steps=2)
    assert counts == {"text_encoder": 2, "unet": 4, "vae_decoder": 2, "vae_encoder": 2}
    with tarfile.open(tmp_path / "unet.tar") as tar:
        sample = member(tar, 0).item()
    assert {k: v.shape for k, v in sample.items()} == {
        "sample": (1, 4, 64, 64), "/down_blocks.0/resnets.0/act_1/Mul_output_0": (1, 1280),
        "encoder_hidden_states": (1, 77, 768)}
    with tarfile.open(tmp_path / "vae_decoder.tar") as tar:
        assert list(member(tar, 0).item()) == ["x"]
    with tarfile.open(tmp_path / "text_encoder.tar") as tar:
        ids = member(tar, 0)
    assert ids.shape == (1, 77) and ids[0, 0] == ids.max() - 1  # BOS, then the prompt, EOS padding
    with tarfile.open(tmp_path / "vae_encoder.tar") as tar:
        assert Image.open(tar.extractfile(tar.getmembers()[0])).size == (512, 512)


def test_serve_imports_no_torch() -> None:
    code = ("import sys, pi_axera_sd_service.cli, pi_axera_sd_service.api.app; "
            "print([m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_lora_is_fused_into_the_export_and_the_time_table(exported, monkeypatch, tmp_path: Path) -> None:
    """A LoRA touching attention, resnets and time_embedding.linear_1, fused at 0.7 by both paths."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    _, root, _ = exported
    torch.manual_seed(1)
    unet = UNet2DConditionModel.from_pretrained(str(root / "sd/unet"))
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights=False,
                                target_modules=["to_q", "to_v", "time_emb_proj", "linear_1"]))
    StableDiffusionPipeline.save_lora_weights(str(tmp_path / "lora"),
                                              unet_lora_layers=get_peft_model_state_dict(unet))
    lora_file = tmp_path / "lora/pytorch_lora_weights.safetensors"

    manifest = export_models(str(root / "sd"), tmp_path / "out", lora=str(lora_file), lora_scale=0.7)
    assert manifest["lora"] == str(lora_file) and manifest["lora_scale"] == 0.7
    files, backend = resolve_model_files(model_dir=tmp_path / "out", backend="onnxruntime")
    with_lora = load_models(files, backend)

    reference = StableDiffusionPipeline.from_pretrained(str(root / "sd"), safety_checker=None,
                                                        requires_safety_checker=False)
    reference.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name)
    reference.fuse_lora(lora_scale=0.7)
    expected = diffusers_latents(monkeypatch, reference, 2, 1.0, None, 1.0, seed=5)
    got = ours(with_lora, txt2img_timesteps(2, True), 1.0, None, seed=5)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)

    table = np.load(tmp_path / "out/time_input_table.npy")
    plain = np.load(root / "out/time_input_table.npy")
    assert np.abs(table - plain).max() > 1e-3  # the LoRA changed the time embedding
    summary = write_table(root / "sd", tmp_path / "table.npy", lora=lora_file, lora_scale=0.7)
    assert summary["lora_layers_fused"] == ["w1"]
    np.testing.assert_allclose(np.load(tmp_path / "table.npy"), table, atol=2e-5, rtol=0)
