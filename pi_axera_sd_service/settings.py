"""Service settings: one pydantic-settings class, read from the environment and CLI flags.

Environment names are those of the upstream service (`TEXT_MODEL_DIR`, `UNET_MODEL`, ... `HOST`,
`PORT`); every field is also a CLI flag `--field-name` (see `cli_flag`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, NamedTuple

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

MODEL_PATH_FIELDS = (
    "model_dir", "text_model_dir", "text_encoder_model", "unet_model", "vae_decoder_model",
    "vae_encoder_model", "time_input_txt2img",
)
DEFAULT_CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pi_axera_sd_service"


class Settings(BaseSettings):
    """Everything the service can be told at start-up."""

    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    # --- models (upstream names keep working) ---
    model_dir: Path | None = Field(
        None, description="One folder in the upstream layout (tokenizer/, unet.*, ...)"
    )
    text_model_dir: Path | None = Field(
        None, description="Folder holding tokenizer/ and text_encoder/ (upstream)"
    )
    text_encoder_model: Path | None = Field(None, description="Text encoder model file")
    unet_model: Path | None = Field(None, description="UNet model file")
    vae_decoder_model: Path | None = Field(None, description="VAE decoder model file")
    vae_encoder_model: Path | None = Field(None, description="VAE encoder model file (img2img)")
    time_input_txt2img: Path | None = Field(None, description="time_input_txt2img.npy (4 x 1280 rows)")
    backend: Literal["auto", "axengine", "onnxruntime"] = Field(
        "auto", description="auto: axengine when importable and .axmodel files exist, else onnxruntime"
    )
    device_id: int = Field(0, ge=0, description="NPU device index (AXCL card)")
    demo: bool = Field(False, description="Serve the generated demo model pack on the CPU")
    cache_dir: Path = Field(DEFAULT_CACHE_DIR, description="Demo pack and model-hash cache")

    # --- network ---
    host: str = Field("127.0.0.1", description="Bind address")
    port: int = Field(5000, ge=1, le=65535, description="Bind port")
    api_auth: str | None = Field(
        None, description="user:pass[,user2:pass2] enables HTTP Basic on every route"
    )
    api_keys: str | None = Field(
        None, description="key1[,key2] enables `Authorization: Bearer <key>` on every route (OpenAI clients)"
    )
    auth_health: bool = Field(False, description="Also require auth on /health and /internal/ping")
    cors_allow_origins: str | None = Field(None, description="Comma-separated allowed CORS origins")
    cors_allow_origins_regex: str | None = Field(None, description="Regex of allowed CORS origins")

    # --- output and state ---
    output_dir: Path = Field(Path("./txt2img_server_output"), description="Where saved images go")
    save_outputs: bool = Field(False, description="Save every /generate image to OUTPUT_DIR (upstream did)")
    state_dir: Path = Field(Path("./state"), description="Persistent options (options.json)")
    png_compress_level: int = Field(1, ge=0, le=9, description="zlib level for PNG responses (1: fast)")

    # --- capability policy ---
    strict: bool = Field(False, description="Turn every clamp into a 422")
    guidance: Literal["on", "off"] = Field("on", description="off forces one UNet pass per step")
    max_cfg_scale: float = Field(2.0, description="Highest cfg_scale run with guidance (LCM-LoRA range)")
    max_images_per_request: int = Field(8, ge=1, description="batch_size x n_iter cap")
    max_and_prompts: int = Field(3, ge=1, description="Sub-prompts joined with AND that are run")

    # --- queue and limits ---
    max_queue: int = Field(16, ge=1, description="Jobs waiting for the NPU before 503")
    queue_timeout: float = Field(300.0, gt=0, description="Seconds a job may wait before 503")
    max_body_bytes: int = Field(32 * 1024 * 1024, description="Largest request body (413 beyond)")
    max_init_image_pixels: int = Field(40_000_000, description="Largest decoded init image, in pixels")
    max_prompt_chars: int = Field(8000, description="Longest prompt or negative prompt, in characters")
    shutdown_timeout: float = Field(30.0, description="Seconds the running job may take on SIGTERM")

    # --- progress and logs ---
    live_previews: bool = Field(False, description="Decode x0 previews for /progress (costs a VAE decode)")
    show_progress_every_n_steps: int = Field(1, ge=1, description="Preview period in steps")
    log_json: bool = Field(False, description="One JSON object per log line")
    log_level: str = Field("INFO", description="Python logging level")

    def model_paths(self) -> dict[str, Path | None]:
        """The model path settings, as keyword arguments for `resolve_model_files`."""
        return {name: getattr(self, name) for name in MODEL_PATH_FIELDS}

    @property
    def model_paths_configured(self) -> bool:
        """True when any model path was set (no demo-pack fallback then)."""
        return any(value is not None for value in self.model_paths().values())


def cli_flag(field_name: str) -> str:
    """`max_queue` -> `--max-queue`."""
    return "--" + field_name.replace("_", "-")


def env_name(field_name: str) -> str:
    """`max_queue` -> `MAX_QUEUE`."""
    return field_name.upper()


def settings_from_cli(overrides: dict[str, Any]) -> Settings:
    """Environment first, then CLI values (only the ones given) on top."""
    given = {k: v for k, v in overrides.items() if v is not None}
    return Settings(**given)


class SettingFlag(NamedTuple):
    """One Settings field as the CLI and the docs show it."""

    field: str
    flag: str
    env: str
    default: Any
    description: str


def settings_flags() -> list[SettingFlag]:
    """Every Settings field with its `--flag`, environment name, default and description."""
    return [
        SettingFlag(name, cli_flag(name), env_name(name), info.default, info.description or "")
        for name, info in Settings.model_fields.items()
    ]
