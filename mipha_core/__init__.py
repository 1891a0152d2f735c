"""The Mipha model: loading original checkpoints, prompts, preprocessing and streaming replies.

Nothing here imports a UI or a database. Typical use::

    engine = load_engine("zhumj34/Mipha-3B")          # or a folder, or "tiny"
    engine.prepare(messages, max_new_tokens=256)       # cheap check first: raises ContextOverflowError
    reply = engine.stream(messages, max_new_tokens=256)
    for text in reply:
        ...
    reply.stats.finish_reason                          # "stop", "length" or "cancelled"
"""

from mipha_core.caching import CacheKey
from mipha_core.engine import CacheSettings, Engine
from mipha_core.errors import (
    ContextOverflowError,
    ImageError,
    ImageTooLargeError,
    InvalidImageError,
    InvalidMessagesError,
    MiphaError,
    ModelLoadError,
    UnsupportedModelError,
)
from mipha_core.fitting import MIN_REPLY_TOKENS, PreparedPrompt, PromptFitter
from mipha_core.generation import TEMPERATURE_RANGE, TOP_P_RANGE, GenerationParams, InvalidGenerationParamsError
from mipha_core.images import load_image
from mipha_core.loading import DEFAULT_MODEL, TINY_MODEL, load_engine, load_remote_engine
from mipha_core.remote import RemoteEngine, RemoteEngineError, RemoteReply, RemoteServer
from mipha_core.streaming import GenerationOutOfMemoryError, ReplyStats, ReplyStream

__all__ = [
    "DEFAULT_MODEL", "MIN_REPLY_TOKENS", "TINY_MODEL", "CacheKey", "CacheSettings", "ContextOverflowError", "Engine", "GenerationOutOfMemoryError",
    "GenerationParams", "ImageError", "ImageTooLargeError", "InvalidGenerationParamsError", "InvalidImageError",
    "InvalidMessagesError", "MiphaError", "ModelLoadError", "PreparedPrompt", "PromptFitter", "RemoteEngine",
    "RemoteEngineError", "RemoteReply", "RemoteServer", "ReplyStats", "ReplyStream",
    "TEMPERATURE_RANGE", "TOP_P_RANGE", "UnsupportedModelError", "load_engine", "load_image", "load_remote_engine",
]
