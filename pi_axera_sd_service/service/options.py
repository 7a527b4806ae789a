"""A1111 options (GET/POST /sdapi/v1/options) with truthful values, persisted to `<state_dir>/options.json`.

Only the options this server has are returned; `forge_preset` never is (SillyTavern reads it as
"this is Forge"). POST accepts the whole dict GET returns: keys that describe the server (model,
hash, output dir, ...) are read-only and ignored unless they name the loaded model; unknown keys are
accepted and ignored (A1111 would answer 500); `sd_model_checkpoint` must resolve to the loaded model.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..pipeline.conditioning import EMPHASIS_MODES
from ..settings import Settings
from .errors import RequestError, StateWriteError

if TYPE_CHECKING:
    from ..runtime.model_dir import LoadedModels

log = logging.getLogger(__name__)

OPTIONS_FILE = "options.json"
SAMPLES_FORMATS = ("png", "jpeg", "jpg", "webp")
DEFAULT_EMPHASIS = EMPHASIS_MODES[0]
SHORTHASH_LEN = 10


@dataclass(frozen=True)
class CheckpointInfo:
    """The one loaded model, in A1111's `CheckpointInfo` terms."""

    name: str          # file name with extension
    model_name: str    # name without extension
    sha256: str
    filename: str      # absolute path

    @property
    def shorthash(self) -> str:
        return self.sha256[:SHORTHASH_LEN]

    @property
    def title(self) -> str:
        return f"{self.name} [{self.shorthash}]" if self.sha256 else self.name

    @property
    def aliases(self) -> set[str]:
        """Every string A1111 accepts for this checkpoint."""
        ids = {self.title, self.name, self.model_name}
        if self.sha256:
            ids |= {self.shorthash, self.sha256, f"{self.model_name} [{self.shorthash}]"}
        return ids

    def sd_models_item(self) -> dict[str, Any]:
        return {"title": self.title, "model_name": self.model_name, "hash": self.shorthash or None,
                "sha256": self.sha256 or None, "filename": self.filename, "config": None}

    @classmethod
    def from_models(cls, models: LoadedModels) -> CheckpointInfo:
        path = Path(models.unet.path)
        return cls(name=path.name, model_name=models.model_name or path.stem,
                   sha256=models.model_sha256 or "", filename=str(path.resolve()))


# Options a client may change (validated); everything else GET returns is read-only.
WRITABLE_DEFAULTS: dict[str, Any] = {
    "samples_format": "png",
    "jpeg_quality": 80,
    "webp_lossless": False,
    "emphasis": DEFAULT_EMPHASIS,
    "live_previews_enable": False,
    "show_progress_every_n_steps": 1,
    "enable_pnginfo": True,
}


def known_option(key: str) -> bool:
    """True for every key GET /sdapi/v1/options returns."""
    return key in WRITABLE_DEFAULTS or key in _READ_ONLY_KEYS


_READ_ONLY_KEYS = (
    "sd_model_checkpoint", "sd_checkpoint_hash", "sd_vae", "CLIP_stop_at_last_layers", "outdir_samples",
    "samples_save", "save_images_add_number", "grid_save", "return_grid", "sd_checkpoints_limit",
    "face_restoration", "face_restoration_model", "tiling", "eta_noise_seed_delta", "img2img_fix_steps",
    "sd_vae_as_default", "api_enable_requests", "api_forbid_local_requests", "show_progress_type",
    "live_preview_content", "add_model_hash_to_info", "add_model_name_to_info", "add_version_to_infotext",
)


class OptionsStore:
    """The A1111 options of this server; thread-safe.

    Defaults come from the settings; what clients change is written to `options.json` atomically
    (only the changed keys, so a later change of the settings still applies to the others)."""

    def __init__(self, settings: Settings, models: LoadedModels | None = None,
                 checkpoint: CheckpointInfo | None = None):
        if checkpoint is None and models is not None:
            checkpoint = CheckpointInfo.from_models(models)
        self.checkpoint = checkpoint
        self.settings = settings
        self.path = Path(settings.state_dir) / OPTIONS_FILE
        self._lock = threading.Lock()
        self._defaults = {**WRITABLE_DEFAULTS, "live_previews_enable": settings.live_previews,
                          "show_progress_every_n_steps": settings.show_progress_every_n_steps}
        self._changed: dict[str, Any] = {}   # what clients set; only this is persisted
        self._load()

    # ------------------------------------------------------------------ reading
    def as_dict(self) -> dict[str, Any]:
        """The whole options dict GET /sdapi/v1/options returns."""
        ckpt = self.checkpoint
        with self._lock:
            writable = {**self._defaults, **self._changed}
        return {
            "sd_model_checkpoint": ckpt.title if ckpt else None,
            "sd_checkpoint_hash": ckpt.sha256 if ckpt else "",
            "sd_vae": "Automatic",
            "sd_vae_as_default": True,
            "CLIP_stop_at_last_layers": 1,
            "sd_checkpoints_limit": 1,
            "eta_noise_seed_delta": 0,
            "img2img_fix_steps": False,
            "face_restoration": False,
            "face_restoration_model": None,
            "tiling": False,
            "outdir_samples": str(self.settings.output_dir),
            "samples_save": True,
            "save_images_add_number": True,
            "grid_save": False,
            "return_grid": False,
            "api_enable_requests": False,
            "api_forbid_local_requests": True,
            "show_progress_type": "Full",
            "live_preview_content": "Prompt",
            "add_model_hash_to_info": True,
            "add_model_name_to_info": True,
            "add_version_to_infotext": True,
            **writable,
        }

    def get(self, key: str, default: Any = None) -> Any:
        return self.as_dict().get(key, default)

    def resolve_checkpoint(self, value: Any) -> CheckpointInfo | None:
        """The loaded model if `value` is its title, name, model_name, short hash or sha256."""
        if self.checkpoint is None or not isinstance(value, str):
            return None
        return self.checkpoint if value.strip() in self.checkpoint.aliases else None

    # ------------------------------------------------------------------ writing
    def update(self, changes: Mapping[str, Any]) -> list[str]:
        """Apply a POSTed dict; returns the keys ignored. RequestError (400) for a bad value."""
        ckpt_value = changes.get("sd_model_checkpoint")
        if ckpt_value is not None and self.resolve_checkpoint(ckpt_value) is None:
            loaded = self.checkpoint.title if self.checkpoint else "none"
            raise RequestError("sd_model_checkpoint",
                               f"model '{ckpt_value}' not found (the loaded model is '{loaded}')")
        validated: dict[str, Any] = {}
        ignored: list[str] = []
        current = self.as_dict()
        for key, value in changes.items():
            if key in WRITABLE_DEFAULTS:
                value = validate_option(key, value)
                if value != current[key]:  # posting the GET dict back pins nothing
                    validated[key] = value
            elif key != "sd_model_checkpoint" and current.get(key, object()) != value:
                ignored.append(key)
        if ignored:
            log.info("POST options: ignored read-only or unknown keys: %s", ", ".join(sorted(ignored)))
        if validated:
            with self._lock:
                changed = {**self._changed, **validated}
                self._save_locked(changed)   # write first: a failed write changes nothing
                self._changed = changed
        return ignored

    def _load(self) -> None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.warning("cannot read %s (%s); using defaults", self.path, exc)
            return
        if not isinstance(data, dict):
            return
        for key, value in data.items():
            if key in WRITABLE_DEFAULTS:
                try:
                    self._changed[key] = validate_option(key, value)
                except RequestError as exc:
                    log.warning("%s: %s; using the default", self.path, exc.message)

    def _save_locked(self, changed: Mapping[str, Any]) -> None:
        """Write `changed` to options.json atomically; StateWriteError naming the path otherwise."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".options-", suffix=".json", dir=self.path.parent)
        except OSError as exc:
            raise self._write_error(exc) from exc
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(changed, fh, indent=2, sort_keys=True)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException as exc:
            Path(tmp).unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise self._write_error(exc) from exc
            raise

    def _write_error(self, exc: OSError) -> StateWriteError:
        log.error("cannot save the options to %s: %s", self.path, exc)
        reason = exc.strerror or type(exc).__name__
        return StateWriteError(f"Cannot save the options to {self.path} ({reason}); nothing was changed. "
                               "Make state_dir (STATE_DIR) a writable directory.")


def validate_option(key: str, value: Any) -> Any:
    """Check one writable option; RequestError (400) naming the key otherwise."""
    default = WRITABLE_DEFAULTS[key]
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise RequestError(key, f"{key} must be true or false, got {value!r}")
        return value
    if isinstance(default, int):
        limits = {"jpeg_quality": (1, 100), "show_progress_every_n_steps": (1, 1000)}[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer() \
                or not limits[0] <= value <= limits[1]:
            raise RequestError(key, f"{key} must be an integer in {limits[0]}–{limits[1]}, got {value!r}")
        return int(value)
    if key == "samples_format":
        fmt = str(value).lower()
        if fmt not in SAMPLES_FORMATS:
            allowed = ", ".join(SAMPLES_FORMATS)
            raise RequestError(key, f"samples_format must be one of {allowed}, got {value!r}")
        return "jpeg" if fmt == "jpg" else fmt
    if key == "emphasis":
        if value not in EMPHASIS_MODES:
            raise RequestError(key, f"emphasis must be one of {', '.join(EMPHASIS_MODES)}, got {value!r}")
        return value
    return value
