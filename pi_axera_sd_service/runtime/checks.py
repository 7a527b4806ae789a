"""`check-models`: every model file of the folder against its contract, generation and interrogation."""

from __future__ import annotations

from .clip_models import ClipFiles, clip_check_lines, resolve_clip_files
from .model_dir import CheckLine, ModelFiles, check_generation_models


def check_models(
    files: ModelFiles, backend: str, device_id: int = 0, clip_files: ClipFiles | None = None
) -> list[CheckLine]:
    """The generation models' lines (the device first on axengine), then the CLIP interrogation files
    (`clip_files`; default: their names next to `tokenizer/`)."""
    lines = check_generation_models(files, backend, device_id)
    if clip_files is None:
        clip_files = resolve_clip_files(backend, text_model_dir=files.tokenizer_dir.parent)
    return lines + clip_check_lines(clip_files, backend, device_id)
