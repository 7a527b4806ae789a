"""Runtime layer: model sessions (onnxruntime on the CPU, axengine on the NPU), model files, demo pack."""

from .checks import check_models
from .contract import UNetInputNames
from .model_dir import (
    CheckLine,
    LoadedModels,
    ModelFiles,
    count_devices,
    format_check_lines,
    load_models,
    resolve_model_files,
)
from .session import FeedError, ModelLoadError, Session, TensorSpec, prepare_feed

__all__ = [
    "CheckLine",
    "FeedError",
    "LoadedModels",
    "ModelFiles",
    "ModelLoadError",
    "Session",
    "TensorSpec",
    "UNetInputNames",
    "check_models",
    "count_devices",
    "format_check_lines",
    "load_models",
    "prepare_feed",
    "resolve_model_files",
]
