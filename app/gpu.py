"""ZeroGPU support: on a ZeroGPU Space, generation must run inside a `spaces.GPU` function.

Everywhere else the function is returned unchanged and `spaces` is never imported, so a
missing or broken `spaces` package cannot affect local runs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable)


def on_gpu(fn: F, *, zero_gpu: bool, duration: int = 120) -> F:
    """`spaces.GPU(duration=...)(fn)` on ZeroGPU, `fn` itself otherwise."""
    if not zero_gpu:
        return fn
    try:
        import spaces
    except ImportError:
        log.warning("SPACES_ZERO_GPU is set but the 'spaces' package is missing; generating without it")
        return fn
    return spaces.GPU(duration=duration)(fn)
