"""The model, loaded in a background thread so the page comes up before the weights do."""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mipha_core import TINY_MODEL, Engine, ModelLoadError, RemoteEngine
from mipha_core.precision import Precision

if TYPE_CHECKING:
    from mipha_core.llama_cpp_engine import LlamaCppEngine

log = logging.getLogger(__name__)


class ModelState(enum.StrEnum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


@dataclass(frozen=True)
class ModelStatus:
    state: ModelState
    model: str
    message: str
    """What to tell the user: progress, what runs, or the cause of a failure and the way out."""
    runs_on: str | None = None
    """Once ready, the model's name and what runs it, for the page: "Mipha-3B · int8 · CPU (llama.cpp)".
    Never a filesystem path (see `display_name`)."""


class ModelNotReadyError(Exception):
    """Generation was asked for while the model is loading or after it failed to load."""


class ModelSlot:
    """Holds the engine or the reason there is none. Safe to read from any thread."""

    def __init__(self, model: str) -> None:
        self._model = model
        self._name = display_name(model)
        self._engine: Engine | None = None
        self._error: str | None = None
        self._started = time.monotonic()
        self._done = threading.Event()

    @classmethod
    def ready(cls, engine: Engine) -> ModelSlot:
        """A slot holding an engine that is already loaded (tests, notebooks)."""
        slot = cls(engine.model_id)
        slot._engine = engine
        slot._done.set()
        return slot

    def load_in_background(self, loader: Callable[[], Engine]) -> threading.Thread:
        """Run `loader` on a daemon thread; its `ModelLoadError` becomes the slot's failure message."""
        thread = threading.Thread(target=self._load, args=(loader,), name="model-loader", daemon=True)
        thread.start()
        return thread

    def _load(self, loader: Callable[[], Engine]) -> None:
        """Whatever happens, the slot ends READY or FAILED: a page never waits on a dead loader."""
        log.info("Loading model %s …", self._model)
        try:
            self._engine = loader()
        except ModelLoadError as e:
            self._error = str(e)
            log.error("Could not load %s: %s", self._model, e)
        except (MemoryError, RuntimeError, OSError) as e:  # e.g. CUDA OOM surfaces as RuntimeError
            self._error = (
                f"Loading {self._model} failed: {e}. If memory ran out, restart with --load-8bit or "
                "--load-4bit, or on the CPU with --device cpu."
            )
            log.exception("Could not load %s", self._model)
        except Exception:  # a bug or an unforeseen library error: it must still end the loading state
            self._error = (
                f"Loading {self._model} failed unexpectedly; the server log has the details. "
                "Try --device cpu, or --model tiny to check the set-up."
            )
            log.exception("Could not load %s", self._model)
        else:
            log.info("Model ready: %s (%.1f s)", self._engine.label, self.elapsed)
        finally:
            self._done.set()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self._started

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def status(self) -> ModelStatus:
        if self._engine is not None:
            runs_on = f"{self._name} · {precision_text(self._engine)}"
            return ModelStatus(ModelState.READY, self._model, runs_on, runs_on=runs_on)
        if self._error is not None:
            return ModelStatus(ModelState.FAILED, self._model, self._error)
        return ModelStatus(ModelState.LOADING, self._model, f"Loading {self._model}… ({self.elapsed:.0f} s)")

    def engine(self) -> Engine:
        """The engine, or `ModelNotReadyError` with a message for the user."""
        if self._engine is not None:
            return self._engine
        if self._error is not None:
            raise ModelNotReadyError(f"The model could not be loaded: {self._error}")
        raise ModelNotReadyError(
            f"The model {self._model} is still loading ({self.elapsed:.0f} s so far). "
            "Your message is still in the box: send it again in a moment."
        )


def display_name(model: str) -> str:
    """The model as the page names it: "tiny demo model", a local folder's name (never its path), or the Hub id."""
    if model == TINY_MODEL:
        return "tiny demo model"
    folder = Path(model).expanduser()
    if folder.is_dir() or folder.is_absolute() or model.startswith((".", "~")):
        return folder.resolve().name or "local model"
    return model


def precision_text(engine: Engine | LlamaCppEngine | RemoteEngine) -> str:
    """What runs the model: the engine's precision label ("int8 · CPU (llama.cpp)"), the dtype and
    device of an engine built without one, or, for a model server, that the replies come from it."""
    if isinstance(engine, RemoteEngine):
        return "replies come from the model server"
    if engine.precision_label:
        return engine.precision_label
    dtype = str(engine.dtype).removeprefix("torch.")  # an `Engine` built by hand: its weights' format
    return Precision("torch", engine.device, engine.dtype, weights=dtype).label
