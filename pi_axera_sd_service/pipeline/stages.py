"""The four model stages over runtime Sessions.

Each stage casts its feeds to the dtype the session reports (pyaxengine asserts dtype and shape;
the text encoder is int32 on axmodels and int64 on ONNX; runtime `prepare_feed` also checks shapes)
and wraps runtime failures in StageError.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import numpy as np

from ..runtime.session import Session, prepare_feed


class StageError(Exception):
    """A model stage failed; `stage` is text_encoder | unet | vae_encoder | vae_decoder."""

    def __init__(self, stage: str, message: str):
        super().__init__(f"{stage}: {message}")
        self.stage = stage
        self.message = message


class UNetInputNames(Protocol):
    """Names of the UNet inputs (runtime.model_dir.UNetInputNames)."""

    sample: str
    time: str
    context: str


class _Stage:
    """Shared feed casting and error wrapping."""

    stage_name = ""

    def __init__(self, session: Session):
        self.session = session

    def _run(self, feed: Mapping[str, np.ndarray]) -> np.ndarray:
        try:
            return np.asarray(self.session.run(prepare_feed(self.session, feed))[0])
        except StageError:
            raise
        except Exception as exc:  # noqa: BLE001 - any runtime failure becomes a StageError
            raise StageError(self.stage_name, f"{type(exc).__name__}: {exc}") from exc

    def _input_name(self, preferred: str) -> str:
        names = [spec.name for spec in self.session.inputs]
        if not names:
            raise StageError(self.stage_name, "session reports no inputs")
        return preferred if preferred in names else names[0]


class TextEncoder(_Stage):
    """Token ids [1, 77] -> last_hidden_state float32 [1, 77, 768]."""

    stage_name = "text_encoder"

    def __init__(self, session: Session):
        super().__init__(session)
        self.input_name = self._input_name("input_ids")

    def encode(self, ids: np.ndarray | list[int]) -> np.ndarray:
        ids_row = np.asarray(ids).reshape(1, -1)
        return self._run({self.input_name: ids_row}).astype(np.float32, copy=False)


class UNet(_Stage):
    """(sample, time-embedding row, text context) -> noise prediction ε."""

    stage_name = "unet"

    def __init__(self, session: Session, names: UNetInputNames):
        super().__init__(session)
        self.names = names

    def predict(self, sample: np.ndarray, time_row: np.ndarray, context: np.ndarray) -> np.ndarray:
        feed = {
            self.names.sample: sample,
            self.names.time: np.asarray(time_row).reshape(1, -1),
            self.names.context: context,
        }
        return self._run(feed).astype(np.float32, copy=False)


class VaeDecoder(_Stage):
    """Scaled latent (latent / 0.18215) [1, 4, h, w] -> image [1, 3, H, W] in ≈[-1, 1]."""

    stage_name = "vae_decoder"

    def __init__(self, session: Session):
        super().__init__(session)
        self.input_name = self._input_name("x")

    def decode(self, latent_scaled: np.ndarray) -> np.ndarray:
        return self._run({self.input_name: latent_scaled}).astype(np.float32, copy=False)


class VaeEncoder(_Stage):
    """Image [1, 3, H, W] in [-1, 1] -> moments [1, 8, h, w] (mean, logvar)."""

    stage_name = "vae_encoder"

    def __init__(self, session: Session):
        super().__init__(session)
        self.input_name = self._input_name("image_sample")

    def encode(self, image_nchw: np.ndarray) -> np.ndarray:
        return self._run({self.input_name: image_nchw}).astype(np.float32, copy=False)
