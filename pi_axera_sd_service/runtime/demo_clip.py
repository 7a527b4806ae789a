"""Demo CLIP models for interrogation: tiny ONNX graphs with the real contract, where colour means something.

- vision `pixel_values` float32 [1,3,224,224] -> (`last_hidden_state` [1,50,768], `pooler_output` [1,768]):
  the mean colour (CLIP normalisation undone), compared with reference colours by a Gaussian kernel,
  mixed into 768-d by fixed weights;
- text `input_ids` int32 [1,77] -> (`last_hidden_state` [1,77,512], `pooler_output` [1,512]): a sum of
  per-token vectors; each tag word's token has its own direction, a colour word the same direction as
  that colour's image; other tokens get small random vectors;
- the projections bring both onto the same 512-d directions, so a mostly red image ranks `red` first.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .clip_models import (
    CLIP_MEAN,
    CLIP_STD,
    CONTEXT_LEN,
    EMBED_DIM,
    IMAGE_SIZE,
    TAGS_FILE,
    TEXT_FILE,
    TEXT_PROJECTION_FILE,
    TEXT_WIDTH,
    VISION_FILE,
    VISION_WIDTH,
    VISUAL_PROJECTION_FILE,
)
from .demo_graph import Graph, f32

SEED = 20240616
VISION_TOKENS = 50  # 7x7 patches + class token, as ViT-B/32 at 224
KERNEL_WIDTH = 0.2  # in RGB units [0,1]
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.1, 0.1),
    "orange": (0.95, 0.55, 0.1),
    "yellow": (0.95, 0.9, 0.15),
    "green": (0.1, 0.7, 0.15),
    "blue": (0.1, 0.2, 0.85),
    "purple": (0.5, 0.15, 0.65),
    "pink": (0.95, 0.6, 0.75),
    "brown": (0.45, 0.28, 0.12),
    "black": (0.05, 0.05, 0.05),
    "white": (0.95, 0.95, 0.95),
    "gray": (0.5, 0.5, 0.5),
}
OTHER_TAGS = ("cat", "dog", "tree", "sky", "ocean", "forest", "flower", "car", "house", "mountain", "night")
DEMO_TAGS = (*COLOURS, *OTHER_TAGS)
OTHER_TOKEN_NORM = 0.3  # words that are not tags (the template's among them) add a little noise


def _word_ids(vocab: dict[str, int], words: tuple[str, ...]) -> list[int]:
    """The single token id of each word (every demo tag is one token of the demo vocabulary)."""
    missing = [w for w in words if f"{w}</w>" not in vocab]
    if missing:
        raise ValueError(f"demo tags not single tokens of the demo vocabulary: {missing}")
    return [vocab[f"{w}</w>"] for w in words]


def _signed_selection(rng: np.random.Generator, rows: int) -> np.ndarray:
    """[rows,512] with orthonormal columns: a random signed permutation (a dense QR is slow on busy BLAS)."""
    matrix = np.zeros((rows, EMBED_DIM))
    matrix[rng.permutation(rows)[:EMBED_DIM], np.arange(EMBED_DIM)] = rng.choice([-1.0, 1.0], EMBED_DIM)
    return matrix


def _vision(refs: np.ndarray, mixing: np.ndarray):
    g = Graph()
    mean = g.op("ReduceMean", "pixel_values", axes=[2, 3], keepdims=0)  # [1,3], normalised units
    rgb = g.op("Add", g.op("Mul", mean, g.const(f32(CLIP_STD))), g.const(f32(CLIP_MEAN)))
    diff = g.op("Sub", g.op("Unsqueeze", rgb, g.const(np.array([1], np.int64))), g.const(f32(refs)))
    distance2 = g.op("ReduceSum", g.op("Mul", diff, diff), g.const(np.array([2], np.int64)), keepdims=0)
    similarity = g.op("Exp", g.op("Mul", distance2, g.const(f32(-0.5 / KERNEL_WIDTH**2))))  # [1,K]
    pooled = g.op("MatMul", similarity, g.const(f32(mixing)), out="pooler_output")
    shape = np.array([1, VISION_TOKENS, VISION_WIDTH], np.int64)
    g.op("Expand", g.op("Unsqueeze", pooled, g.const(np.array([1], np.int64))), g.const(shape),
         out="last_hidden_state")
    return g.model(
        "demo_clip_vision",
        [("pixel_values", g.onnx.TensorProto.FLOAT, [1, 3, IMAGE_SIZE, IMAGE_SIZE])],
        [("last_hidden_state", [1, VISION_TOKENS, VISION_WIDTH]), ("pooler_output", [1, VISION_WIDTH])],
    )


def _text(table: np.ndarray):
    g = Graph()
    ids = g.op("Cast", "input_ids", to=g.onnx.TensorProto.INT64)
    hidden = g.op("Gather", g.const(table), ids, axis=0, out="last_hidden_state")  # [1,77,512]
    g.op("ReduceSum", hidden, g.const(np.array([1], np.int64)), keepdims=0, out="pooler_output")
    return g.model(
        "demo_clip_text",
        [("input_ids", g.onnx.TensorProto.INT32, [1, CONTEXT_LEN])],
        [("last_hidden_state", [1, CONTEXT_LEN, TEXT_WIDTH]), ("pooler_output", [1, TEXT_WIDTH])],
    )


def write_demo_clip(folder: Path) -> None:
    """Write the CLIP models, projections and tag list into `folder` (next to `tokenizer/`)."""
    import onnx

    folder = Path(folder)
    rng = np.random.default_rng(SEED)
    vocab: dict[str, int] = json.loads((folder / "tokenizer" / "vocab.json").read_text(encoding="utf-8"))
    specials = {vocab["<|startoftext|>"], vocab["<|endoftext|>"]}
    # One unit direction of the joint space per tag (orthonormal), colours first.
    directions = np.linalg.qr(rng.normal(0, 1, (EMBED_DIM, len(DEMO_TAGS))))[0].T  # [tags,512]
    text_projection = _signed_selection(rng, TEXT_WIDTH)  # orthogonal
    visual_projection = _signed_selection(rng, VISION_WIDTH)  # orthonormal columns
    # Token vectors live before the projection: row @ text_projection is the wanted joint-space vector.
    noise = rng.normal(0, 1, (len(vocab), EMBED_DIM))
    joint = noise / np.linalg.norm(noise, axis=1, keepdims=True) * OTHER_TOKEN_NORM
    joint[_word_ids(vocab, DEMO_TAGS)] = directions
    joint[sorted(specials)] = 0.0
    table = joint @ text_projection.T
    mixing = directions[: len(COLOURS)] @ visual_projection.T  # [colours,768]: pooled @ P_v = colour dirs
    refs = np.array(list(COLOURS.values()))
    onnx.save_model(_vision(refs, mixing), str(folder / f"{VISION_FILE}.onnx"))
    onnx.save_model(_text(f32(table)), str(folder / f"{TEXT_FILE}.onnx"))
    np.save(folder / VISUAL_PROJECTION_FILE, f32(visual_projection))
    np.save(folder / TEXT_PROJECTION_FILE, f32(text_projection))
    (folder / TAGS_FILE).write_text("\n".join(DEMO_TAGS) + "\n", encoding="utf-8")
