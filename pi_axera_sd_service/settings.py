"""Service settings: one pydantic-settings class, read from the environment and CLI flags.

Environment names are those of the upstream service (`TEXT_MODEL_DIR`, `UNET_MODEL`, ... `HOST`,
`PORT`); every field is also a CLI flag `--field-name` (see `cli_flag`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, NamedTuple

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MODEL_PATH_FIELDS = (
    "model_dir", "text_model_dir", "text_encoder_model", "unet_model", "vae_decoder_model",
    "vae_encoder_model", "time_input_txt2img", "time_input_table",
)
CLIP_PATH_FIELDS = (
    "clip_vision_model", "clip_text_model", "clip_visual_projection", "clip_text_projection",
    "interrogate_tags_file",
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
    time_input_table: Path | None = Field(
        None, description="time_input_table.npy (1000 x 1280 rows: any LCM schedule); default: in MODEL_DIR"
    )
    backend: Literal["auto", "axengine", "onnxruntime"] = Field(
        "auto", description="auto: axengine when importable and .axmodel files exist, else onnxruntime"
    )
    device_id: int = Field(0, ge=0, description="NPU device index (AXCL card); a list (0,1) sets device_ids")
    device_ids: str | None = Field(
        None, description="Several NPUs, e.g. 0,1: one worker per device, one queue (overrides device_id)"
    )
    require_all_devices: bool = Field(
        False, description="Refuse to start when a device fails to load (default: start degraded)"
    )
    demo: bool = Field(False, description="Use the generated demo model pack on the CPU (no models needed)")
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
    lean_memory: bool = Field(
        True, description="Flat RSS: one glibc arena that keeps small buffers warm and returns "
        "image-sized ones at once; onnxruntime without its arena (service/host_memory.py)"
    )
    png_compress_level: int = Field(1, ge=0, le=9, description="zlib level for PNG responses (1: fast)")

    # --- schedules ---
    max_steps: int = Field(
        8, ge=1, description="Most LCM steps run when the models have a time table (at most 50; else 4)"
    )

    # --- capability policy ---
    strict: bool = Field(False, description="Turn every clamp into a 422")
    guidance: Literal["on", "off"] = Field("on", description="off forces one UNet pass per step")
    max_cfg_scale: float = Field(2.0, description="Highest cfg_scale run with guidance (LCM-LoRA range)")
    max_images_per_request: int = Field(8, ge=1, description="batch_size x n_iter cap")
    max_and_prompts: int = Field(3, ge=1, description="Sub-prompts joined with AND that are run")

    # --- interrogation ---
    clip_vision_model: Path | None = Field(
        None, description="CLIP vision model (default TEXT_MODEL_DIR/clip_base_vision.axmodel or .onnx)"
    )
    clip_text_model: Path | None = Field(
        None, description="CLIP text model (default TEXT_MODEL_DIR/clip_base_text.axmodel or .onnx)"
    )
    clip_visual_projection: Path | None = Field(
        None, description="Projection .npy [768,512] (default TEXT_MODEL_DIR/clip_visual_projection.npy)"
    )
    clip_text_projection: Path | None = Field(
        None, description="Text projection .npy [512,512] (default TEXT_MODEL_DIR/clip_text_projection.npy)"
    )
    interrogate_tags_file: Path | None = Field(
        None, description="Tag list, one per line (default TEXT_MODEL_DIR/interrogate_tags.txt)"
    )
    interrogate_threshold: float = Field(0.22, description="Lowest cosine a tag needs in /interrogate")
    interrogate_top_k: int = Field(10, ge=1, description="Most tags /interrogate returns")
    interrogate_general_threshold: float = Field(
        0.2, description="Cosine a general tag of /interrogate/structured must exceed"
    )
    interrogate_general_top_k: int = Field(
        10, ge=0, description="Most general tags /interrogate/structured returns"
    )
    interrogate_max_categories: int = Field(16, ge=1, description="Most categories in one structured request")
    interrogate_max_labels_per_category: int = Field(
        50, ge=1, description="Most labels in one category of a structured request"
    )
    interrogate_max_label_chars: int = Field(200, ge=1, description="Longest label of a structured request")
    interrogate_label_cache_size: int = Field(
        4096, ge=0, description="Category label embeddings kept in memory (LRU)"
    )
    interrogate_build_slice: int = Field(
        16, ge=1, description="Tag-list labels encoded per step between jobs while the tag cache builds"
    )

    # --- queue and limits ---
    max_queue: int = Field(16, ge=1, description="Jobs waiting for the NPU before 503")
    queue_timeout: float = Field(300.0, gt=0, description="Seconds a job may wait before 503")
    max_body_bytes: int = Field(32 * 1024 * 1024, description="Largest request body (413 beyond)")
    max_init_image_pixels: int = Field(40_000_000, description="Largest decoded init image, in pixels")
    max_prompt_chars: int = Field(8000, description="Longest prompt or negative prompt, in characters")
    shutdown_timeout: float = Field(30.0, description="Seconds the running job may take on SIGTERM")
    max_request_pixels: int = Field(
        50_000_000, ge=1, description="Decoded init-image pixels per request, all images together"
    )
    header_timeout: float = Field(10.0, gt=0, description="Seconds a client may take to send the headers")
    body_timeout: float = Field(60.0, gt=0, description="Seconds a client may take to send the body (408)")
    keep_alive_timeout: float = Field(5.0, gt=0, description="Seconds an idle keep-alive connection is kept")
    max_connections: int = Field(
        512, ge=1, description="Open connections and running requests at once (503 beyond)"
    )

    # --- web page ---
    ui: bool = Field(True, description="Serve the web page at / (--no-ui for headless deployments)")

    # --- progress and logs ---
    live_previews: bool = Field(False, description="Decode x0 previews for /progress (costs a VAE decode)")
    show_progress_every_n_steps: int = Field(1, ge=1, description="Preview period in steps")
    log_json: bool = Field(False, description="One JSON object per log line")
    log_level: str = Field("INFO", description="Python logging level")

    @model_validator(mode="before")
    @classmethod
    def _device_list_in_device_id(cls, data: Any) -> Any:
        """DEVICE_ID=0,1 means DEVICE_IDS=0,1 (device_id then names the first)."""
        if isinstance(data, dict):
            value = data.get("device_id")
            if isinstance(value, str) and "," in value and not data.get("device_ids"):
                data = {**data, "device_ids": value, "device_id": value.split(",")[0].strip()}
        return data

    @field_validator("device_ids")
    @classmethod
    def _parse_device_ids(cls, value: str | None) -> str | None:
        """Comma-separated indexes >= 0, no repeats; normalised to `0,1`."""
        if value is None or not str(value).strip():
            return None
        try:
            indexes = [int(part) for part in str(value).split(",") if part.strip()]
        except ValueError:
            raise ValueError(f"device_ids must be indexes such as 0,1, got {value!r}") from None
        if not indexes or any(i < 0 for i in indexes) or len(set(indexes)) != len(indexes):
            raise ValueError(f"device_ids must be distinct indexes >= 0 such as 0,1, got {value!r}")
        return ",".join(map(str, indexes))

    @property
    def devices(self) -> tuple[int, ...]:
        """The device indexes to serve on: device_ids, else (device_id,)."""
        if self.device_ids:
            return tuple(int(part) for part in self.device_ids.split(","))
        return (self.device_id,)

    def model_paths(self) -> dict[str, Path | None]:
        """The model path settings, as keyword arguments for `resolve_model_files`."""
        return {name: getattr(self, name) for name in MODEL_PATH_FIELDS}

    def clip_paths(self) -> dict[str, Path | None]:
        """The interrogation path settings, as keyword arguments for `resolve_clip_files`."""
        return {name: getattr(self, name) for name in CLIP_PATH_FIELDS}

    @property
    def model_paths_configured(self) -> bool:
        """True when any model path was set (no demo-pack fallback then)."""
        return any(value is not None for value in self.model_paths().values())


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def is_exposed(host: str) -> bool:
    """True when a server bound to `host` is reachable from other machines (not loopback)."""
    return host not in LOOPBACK_HOSTS and not host.startswith("127.")


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
