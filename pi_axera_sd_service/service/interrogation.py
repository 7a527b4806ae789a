"""Interrogation in the service: the job payload, its run on the NPU worker, the tag cache's idle slices.

The request's thread decodes the image and checks the categories (`InterrogationService.request`);
the worker runs `run` (vision encode + scoring) like any job, and `build_slice` between jobs until the
tag-list embeddings are complete. A lock keeps one thread at a time in the Interrogator (several
workers may take interrogation jobs; only one is given the idle slices).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from PIL import Image

from ..pipeline.interrogator import CategoriesError, Interrogator, open_interrogator, validate_categories
from ..pipeline.stages import StageError
from ..runtime.clip_models import InterrogationOff, resolve_clip_files
from ..runtime.session import ModelLoadError
from .errors import FeatureUnavailableError, RequestError
from .plan import new_task_id
from .progress import INTERROGATE_JOB, ProgressState
from .request import decode_init_image

if TYPE_CHECKING:
    from ..runtime.model_dir import LoadedModels, Wrap
    from ..settings import Settings

CLIP_MODEL = "clip"   # the one A1111 interrogation model served (A1111's other one: deepdanbooru)


@dataclass(frozen=True)
class InterrogationJob:
    """What the worker needs: the decoded image and, for /interrogate/structured, checked categories."""

    image: Image.Image
    categories: dict[str, list[str]] | None = None
    task_id: str = ""


class InterrogationService:
    """The loaded Interrogator (or why interrogation is off), behind one lock."""

    def __init__(self, interrogator: Interrogator | InterrogationOff, settings: Settings):
        self.interrogator = interrogator
        self.settings = settings
        self._lock = threading.Lock()

    @classmethod
    def load(cls, models: LoadedModels, settings: Settings, wrap: Wrap | None = None) -> InterrogationService:
        """The CLIP files next to the generation models' text model (or the settings' paths), loaded."""
        from ..pipeline.tokenizer import ClipTokenizer

        try:
            files = resolve_clip_files(models.backend, text_model_dir=models.tokenizer_dir.parent,
                                       **settings.clip_paths())
        except ModelLoadError as exc:  # e.g. a .onnx CLIP path on axengine: off, generation goes on
            return cls(InterrogationOff(str(exc)), settings)
        tokenizer = ClipTokenizer.from_dir(models.tokenizer_dir)
        return cls(open_interrogator(files, models.backend, tokenizer, settings, wrap=wrap), settings)

    @property
    def available(self) -> bool:
        return isinstance(self.interrogator, Interrogator)

    def status(self) -> dict[str, Any]:
        """The `interrogate` entry of /capabilities."""
        if not isinstance(self.interrogator, Interrogator):
            return {"available": False, "reason": self.interrogator.reason, "tags": 0, "tags_prepared": 0}
        index = self.interrogator.index
        return {"available": True, "reason": None, "tags": index.total, "tags_prepared": index.ready}

    def request(self, image: Any, categories: Any = None, structured: bool = False) -> InterrogationJob:
        """Decode and check a request in the caller's thread: 404 without an image, 501 when off, 400 for
        a bad image or categories over a limit."""
        if image is None or image == "":
            raise RequestError("image", "Image not found", status_code=404)
        if not isinstance(self.interrogator, Interrogator):
            raise FeatureUnavailableError(f"Image interrogation is not available: {self.interrogator.reason}")
        checked = None
        if structured:
            try:
                checked = validate_categories(categories, self.interrogator.limits)
            except CategoriesError as exc:
                raise RequestError("categories", str(exc)) from exc
        decoded = decode_init_image(image, "image", self.settings)  # full size: CLIP crops at 224 itself
        return InterrogationJob(decoded, checked, new_task_id(INTERROGATE_JOB))

    def run(self, job: InterrogationJob, progress: ProgressState) -> dict[str, Any]:
        """On the worker: vision encode + scoring; the route's answer body."""
        assert isinstance(self.interrogator, Interrogator)
        progress.begin(job.task_id, INTERROGATE_JOB, 1)
        try:
            with self._lock:
                if job.categories is None:
                    return self.interrogator.interrogate(job.image).response()
                return self.interrogator.structured(job.image, job.categories).response()
        except Exception as exc:  # noqa: BLE001 - a CLIP session fault: a stage failure (500, device check)
            raise StageError(INTERROGATE_JOB, str(exc) or type(exc).__name__) from exc
        finally:
            progress.end(job.task_id)

    def build_slice(self) -> bool:
        """One slice of the tag cache (`interrogate_build_slice` labels); True while more remains."""
        if not isinstance(self.interrogator, Interrogator):
            return False
        with self._lock:
            return not self.interrogator.build_step(self.settings.interrogate_build_slice)
