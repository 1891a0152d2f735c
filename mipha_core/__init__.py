"""The Mipha model: loading original checkpoints, prompts, preprocessing and streaming replies.

Nothing here imports a UI or a database. Typical use::

    engine = load_engine("zhumj34/Mipha-3B")          # or a folder, or "tiny"
    engine.prepare(messages, max_new_tokens=256)       # cheap check first: raises ContextOverflowError
    reply = engine.stream(messages, max_new_tokens=256)
    for text in reply:
        ...
    reply.stats.finish_reason                          # "stop", "length" or "cancelled"
"""

import importlib

_HOMES = {
    "caching": ["CacheKey"],
    "engine": ["CacheSettings", "Engine"],
    "errors": ["ContextOverflowError", "ImageError", "ImageTooLargeError", "InvalidImageError", "InvalidMessagesError",
               "MiphaError", "ModelLoadError", "UnsupportedModelError"],
    "fitting": ["MIN_REPLY_TOKENS", "PreparedPrompt", "PromptFitter"],
    "generation": ["TEMPERATURE_RANGE", "TOP_P_RANGE", "GenerationParams", "InvalidGenerationParamsError"],
    "images": ["load_image"],
    "loading": ["DEFAULT_MODEL", "TINY_MODEL", "load_engine", "load_remote_engine"],
    "photos": ["StoredPhoto"],
    "remote": ["RemoteEngine", "RemoteEngineError", "RemoteReply", "RemoteServer"],
    "streaming": ["GenerationOutOfMemoryError", "ReplyStats", "ReplyStream"],
}
_MODULE_OF = {name: module for module, names in _HOMES.items() for name in names}


def __getattr__(name: str) -> object:
    """Names are imported on first use, so that ``mipha_core.images`` (the photo pipeline, used by
    storage too) can be imported without torch."""
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'mipha_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"mipha_core.{module}"), name)
    globals()[name] = value
    return value


__all__ = sorted(_MODULE_OF)
