"""The demo model pack: small real ONNX graphs with the exact SD1.5-LCM I/O contract, made in seconds.

Layout (upstream): `tokenizer/` (CLIP byte-level BPE, written by `demo_tokenizer`),
`text_encoder/sd15_text_encoder_sim.onnx`, `unet.onnx`, `vae_decoder.onnx`, `vae_encoder.onnx`,
`time_input_txt2img.npy` and `time_input_table.npy` (the same SiLU(sinusoid) rows for every timestep 0..999;
the four-row file is the table at 999, 759, 499, 259).

The graphs are toys that behave like the real thing where a user would notice:
- text encoder: token + position embeddings, causal mixing, LayerNorm -> [1,77,768];
- UNet: a denoiser whose clean-image guess is a prompt-chosen mix of colourful patterns (per-token
  weighted, so emphasis matters) plus the low frequencies of the noisy sample (so seeds and init images
  matter); it reads sqrt(alpha_bar) off the time row (a linear probe fitted on the table's rows of the LCM
  skeleton t = 20k - 1, where every LCM schedule lies), so with the LCM math the predicted x0 is that guess;
- VAE decoder: a 1x1 channel mix, tanh, smooth x8 upsampling; VAE encoder: its approximate inverse.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from .contract import NUM_TRAIN_TIMESTEPS, TIMESTEPS
from .demo_clip import write_demo_clip
from .demo_graph import Graph, f32
from .demo_tokenizer import write_tokenizer
from .session import ModelLoadError

PACK_VERSION = 1
SEED = 20240615
LATENT_HW = 64
CONTEXT_LEN, CONTEXT_DIM, TIME_DIM = 77, 768, 1280
VAE_SCALE = 0.18215
N_PATTERNS = 32
LCM_SKIP = 20  # LCM-LoRA's skeleton: t = 20k - 1 (1000 // original_inference_steps 50)
UNET_TIME_INPUT = "/down_blocks.0/resnets.0/act_1/Mul_output_0"

def alphas_cumprod() -> np.ndarray:
    """SD1.5 scaled-linear schedule (float32, 1000 values)."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float32) ** 2
    return np.cumprod(1.0 - betas, dtype=np.float32)


def time_table() -> np.ndarray:
    """float32 [1000,1280]: SiLU of the sinusoidal embedding (cos first) of every timestep 0..999."""
    half = TIME_DIM // 2
    freqs = np.exp(-np.log(10000.0) * np.arange(half) / half)
    angles = np.arange(NUM_TRAIN_TIMESTEPS, dtype=np.float64)[:, None] * freqs[None, :]
    emb = np.concatenate([np.cos(angles), np.sin(angles)], axis=1)
    return f32(emb / (1.0 + np.exp(-emb)))


def _causal_mean() -> np.ndarray:
    return f32(np.tril(np.ones((CONTEXT_LEN, CONTEXT_LEN))) / np.arange(1, CONTEXT_LEN + 1)[:, None])


def _encode_in_numpy(ids: np.ndarray, token_table: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """The text encoder's arithmetic in numpy ([77] ids -> [77,768]), for reference vectors."""
    hidden = token_table[ids % len(token_table)] + positions
    hidden = np.tanh(hidden) + _causal_mean() @ hidden
    centred = hidden - hidden.mean(-1, keepdims=True)
    return centred / np.sqrt((centred**2).mean(-1, keepdims=True) + 1e-5)


def _text_encoder(vocab_size: int, token_table: np.ndarray, positions: np.ndarray):
    g = Graph()
    ids = g.op("Mod", "input_ids", g.const(np.array(vocab_size, dtype=np.int64)))
    tokens = g.op("Gather", g.const(token_table), ids, axis=0)
    hidden = g.op("Add", tokens, g.const(positions))
    mixed = g.op("MatMul", g.const(_causal_mean()), hidden)
    hidden = g.op("Add", g.op("Tanh", hidden), mixed)
    g.op(
        "LayerNormalization",
        hidden,
        g.const(np.ones(CONTEXT_DIM, np.float32)),
        g.const(np.zeros(CONTEXT_DIM, np.float32)),
        out="last_hidden_state",
        axis=-1,
    )
    return g.model(
        "demo_text_encoder",
        [("input_ids", g.onnx.TensorProto.INT64, [1, CONTEXT_LEN])],
        [("last_hidden_state", [1, CONTEXT_LEN, CONTEXT_DIM])],
    )


def _patterns(rng: np.random.Generator) -> np.ndarray:
    """[N_PATTERNS, 4*64*64]: stripes, rings and blobs, each with its own latent colour, unit std."""
    yy, xx = np.mgrid[0:LATENT_HW, 0:LATENT_HW] / LATENT_HW
    patterns = []
    for k in range(N_PATTERNS):
        kind = k % 3
        if kind == 0:  # stripes
            angle, cycles = rng.uniform(0, np.pi), rng.uniform(0.5, 4.0)
            field = np.sin(
                2 * np.pi * cycles * (xx * np.cos(angle) + yy * np.sin(angle)) + rng.uniform(0, 6.3)
            )
        elif kind == 1:  # rings
            cy, cx, cycles = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(1.0, 4.0)
            field = np.cos(2 * np.pi * cycles * np.hypot(yy - cy, xx - cx))
        else:  # blob
            cy, cx, width = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.1, 0.3)
            field = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * width**2)) * 2 - 0.5
        colour = rng.normal(0, 1, (4, 1, 1))
        pattern = colour * field[None]
        patterns.append((pattern - pattern.mean()) / pattern.std())
    return f32(np.stack(patterns).reshape(N_PATTERNS, -1))


# Per-band prior variances of the UNet's Wiener-style denoiser (how much of the sample it keeps).
LOW_VARIANCE, HIGH_VARIANCE, PATTERN_SCALE = 30.0, 0.05, 1.3
DECODER_GAIN = 0.5


def _typical_context(vocab_size: int, token_table: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Mean text-encoder output over random short prompts ([77,768]): what all prompts share."""
    rng = np.random.default_rng(SEED + 1)
    outputs = []
    for length in range(1, 41):
        ids = np.full(CONTEXT_LEN, vocab_size - 1)  # <|endoftext|> pads
        ids[0] = vocab_size - 2  # <|startoftext|>
        ids[1 : 1 + length % 12 + 1] = rng.integers(0, vocab_size - 2, length % 12 + 1)
        outputs.append(_encode_in_numpy(ids, token_table, positions))
    return np.mean(outputs, axis=0)


def _unet(rng: np.random.Generator, table: np.ndarray, typical_context: np.ndarray):
    g = Graph()
    sample, time, context = "sample", UNET_TIME_INPUT, "encoder_hidden_states"
    # sqrt(alpha_bar_t) read off the time row by a least-squares linear probe of the skeleton rows.
    skeleton = np.arange(LCM_SKIP - 1, NUM_TRAIN_TIMESTEPS, LCM_SKIP)
    target = np.sqrt(alphas_cumprod()[skeleton]).astype(np.float64)
    probe = np.linalg.lstsq(table[skeleton].astype(np.float64), target, rcond=None)[0]
    s = g.op(
        "Clip", g.op("MatMul", time, g.const(f32(probe[:, None]))), g.const(f32(0.02)), g.const(f32(0.98))
    )
    one = g.const(f32(1.0))
    one_minus_s2 = g.op("Sub", one, g.op("Mul", s, s))
    # Prompt -> pattern mix: position-weighted pooling (early tokens count most), projection, normalise.
    position_weight = np.exp(-np.arange(CONTEXT_LEN) / 12.0)
    position_weight[0] = 0.0  # BOS is the same for every prompt
    pooled = g.op("MatMul", g.const(f32(position_weight[None, :])), context)  # [1,1,768]
    pooled = g.op("Sub", pooled, g.const(f32(position_weight @ typical_context)))  # keep what differs
    coeffs = g.op("MatMul", pooled, g.const(f32(rng.normal(0, 1, (CONTEXT_DIM, N_PATTERNS)))))

    def normalised(vector: str) -> str:
        mean_square = g.op("ReduceMean", g.op("Mul", vector, vector), axes=[-1])
        return g.op("Div", vector, g.op("Sqrt", g.op("Add", mean_square, g.const(f32(1e-6)))))

    coeffs = normalised(coeffs)
    coeffs = normalised(g.op("Mul", coeffs, g.op("Abs", coeffs)))  # sharpen: a few patterns dominate
    scale = PATTERN_SCALE / np.sqrt(N_PATTERNS)
    mix = g.op("MatMul", g.op("Mul", coeffs, g.const(f32(scale))), g.const(_patterns(rng)))
    mu = g.op("Reshape", mix, g.const(np.array([1, 4, LATENT_HW, LATENT_HW], np.int64)))
    # Wiener-style x0 guess: mu + gain_low * lowpass(residual) + gain_high * highpass(residual).
    residual = g.op("Sub", sample, g.op("Mul", s, mu))
    pooled_res = g.op("AveragePool", residual, kernel_shape=[4, 4], strides=[4, 4])
    low = g.op("Resize", pooled_res, "", g.const(f32([1, 1, 4, 4])), mode="linear")
    high = g.op("Sub", residual, low)

    def gain(variance: float) -> str:
        v = g.const(f32(variance))
        return g.op("Div", g.op("Mul", s, v), g.op("Add", g.op("Mul", g.op("Mul", s, s), v), one_minus_s2))

    x0 = g.op(
        "Add", mu, g.op("Add", g.op("Mul", gain(LOW_VARIANCE), low), g.op("Mul", gain(HIGH_VARIANCE), high))
    )
    # eps such that (x - sqrt(1-a) eps) / sqrt(a) == x0 when s == sqrt(a).
    g.op("Div", g.op("Sub", sample, g.op("Mul", s, x0)), g.op("Sqrt", one_minus_s2), out="out_sample")
    latent = [1, 4, LATENT_HW, LATENT_HW]
    f = g.onnx.TensorProto.FLOAT
    return g.model(
        "demo_unet",
        [(sample, f, latent), (time, f, [1, TIME_DIM]), (context, f, [1, CONTEXT_LEN, CONTEXT_DIM])],
        [("out_sample", latent)],
    )


def _channel_mix(g: Graph, tensor: str, weight: np.ndarray, bias: np.ndarray) -> str:
    """A 1x1 convolution on a [1,C,64,64] tensor, written as a MatMul over [C, 64*64].

    As a Conv, onnxruntime's layout optimizer moves the decoder into its blocked channel layout:
    the 512x512 upsample then runs on 8 padded channels (a 16 MB buffer and ≈10 ms per decode),
    host work the real VAE decoder does not do on the NPU."""
    channels_out, channels_in = weight.shape
    flat = g.op("Reshape", tensor, g.const(np.array([channels_in, LATENT_HW * LATENT_HW], np.int64)))
    mixed = g.op("Add", g.op("MatMul", g.const(f32(weight)), flat), g.const(f32(bias[:, None])))
    return g.op("Reshape", mixed, g.const(np.array([1, channels_out, LATENT_HW, LATENT_HW], np.int64)))


def _vae_decoder(weight: np.ndarray, bias: np.ndarray):
    g = Graph()
    mixed = _channel_mix(g, "x", weight, bias)
    up = g.op("Resize", g.op("Tanh", mixed), "", g.const(f32([1, 1, 8, 8])), mode="linear")
    g.op("Identity", up, out="sample")
    size = LATENT_HW * 8
    return g.model(
        "demo_vae_decoder",
        [("x", g.onnx.TensorProto.FLOAT, [1, 4, LATENT_HW, LATENT_HW])],
        [("sample", [1, 3, size, size])],
    )


def _vae_encoder(weight: np.ndarray, bias: np.ndarray):
    """Mean = the decoder input that reproduces the 8x8-averaged image; logvar = -6."""
    g = Graph()
    inverse = np.linalg.pinv(weight.astype(np.float64))  # [4,3]
    pooled = g.op("AveragePool", "image_sample", kernel_shape=[8, 8], strides=[8, 8])
    pre_tanh = g.op("Atanh", g.op("Clip", pooled, g.const(f32(-0.995)), g.const(f32(0.995))))
    mix_weight = np.concatenate([inverse, np.zeros((4, 3))])
    mix_bias = np.concatenate([-inverse @ bias, np.full(4, -6.0)])
    g.op("Identity", _channel_mix(g, pre_tanh, mix_weight, mix_bias), out="latent_sample")
    size = LATENT_HW * 8
    return g.model(
        "demo_vae_encoder",
        [("image_sample", g.onnx.TensorProto.FLOAT, [1, 3, size, size])],
        [("latent_sample", [1, 8, LATENT_HW, LATENT_HW])],
    )


# --- the pack ------------------------------------------------------------------------------------


def make_demo_pack(folder: Path) -> Path:
    """Write the whole demo pack into `folder` (created if needed); deterministic; returns `folder`."""
    import onnx

    folder = Path(folder)
    (folder / "text_encoder").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)
    vocab_size = write_tokenizer(folder / "tokenizer")
    table = time_table()
    np.save(folder / "time_input_table.npy", table)
    np.save(folder / "time_input_txt2img.npy", table[list(TIMESTEPS)])
    orthonormal_rows = np.linalg.qr(rng.normal(0, 1, (4, 3)))[0].T  # [3,4]: every colour reachable
    decoder_weight = orthonormal_rows * DECODER_GAIN * VAE_SCALE  # acts on latent / 0.18215
    decoder_bias = np.array([0.15, 0.0, -0.1])  # a little warm
    token_table = f32(rng.normal(0, 1, (vocab_size, CONTEXT_DIM)))
    positions = f32(rng.normal(0, 0.5, (CONTEXT_LEN, CONTEXT_DIM)))
    typical_context = _typical_context(vocab_size, token_table, positions)
    models = {
        "text_encoder/sd15_text_encoder_sim.onnx": _text_encoder(vocab_size, token_table, positions),
        "unet.onnx": _unet(rng, table, typical_context),
        "vae_decoder.onnx": _vae_decoder(decoder_weight, decoder_bias),
        "vae_encoder.onnx": _vae_encoder(decoder_weight, decoder_bias),
    }
    for relative, model in models.items():
        onnx.save_model(model, str(folder / relative))

    write_demo_clip(folder)
    return folder


GENERATOR_SOURCES = tuple(
    Path(__file__).with_name(name)
    for name in ("demo_pack.py", "demo_graph.py", "demo_tokenizer.py", "demo_clip.py")
)


def _generator_fingerprint() -> str:
    """Changes whenever the code that writes the pack changes (so a cached pack is rebuilt)."""
    digest = hashlib.sha256()
    for source in GENERATOR_SOURCES:
        digest.update(source.read_bytes())
    return f"v{PACK_VERSION}-" + digest.hexdigest()[:16]


STAMP_FILE = "demo_pack.json"


def demo_pack_dir(cache_dir: Path) -> Path:
    """`<cache_dir>/demo_pack_v<N>`, generated on first use (temp dir + rename), regenerated if stale.

    The pack is written by a child process: the server never imports onnx, and the generator's
    memory (onnx, protobuf, float64 tables: ≈20 MiB) is not kept in the server's RSS."""
    cache_dir = Path(cache_dir)
    target = cache_dir / f"demo_pack_v{PACK_VERSION}"
    fingerprint = _generator_fingerprint()
    if _stamp(target) == fingerprint:
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=".demo_pack_", dir=cache_dir))
    building.chmod(0o755)  # mkdtemp makes it private; the pack is not secret
    try:
        _make_demo_pack_in_child(building)
        (building / STAMP_FILE).write_text(json.dumps({"fingerprint": fingerprint}), encoding="utf-8")
        if target.exists():  # stale pack: move it aside, then swap in the new one
            stale = Path(tempfile.mkdtemp(prefix=".stale_", dir=cache_dir))
            with contextlib.suppress(OSError):  # another process may have moved it first
                os.replace(target, stale / "pack")
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(building, target)
        except OSError:
            if _stamp(target) != fingerprint:  # lost a race to a different generator: report it
                raise
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return target


def _make_demo_pack_in_child(folder: Path) -> None:
    """`make_demo_pack(folder)` in a fresh interpreter; ModelLoadError with its stderr when it fails."""
    done = subprocess.run([sys.executable, "-m", __name__, str(folder)], capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-3:]
        raise ModelLoadError(f"writing the demo pack failed (exit {done.returncode}): {' '.join(tail)}",
                             folder)


def _stamp(folder: Path) -> str | None:
    try:
        stamp = json.loads((folder / STAMP_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return stamp.get("fingerprint") if isinstance(stamp, dict) else None


def describe_pack() -> str:
    """One line for logs: the pack version and fingerprint."""
    return f"demo pack {_generator_fingerprint()}"


if __name__ == "__main__":  # the child process of demo_pack_dir
    make_demo_pack(Path(sys.argv[1]))
