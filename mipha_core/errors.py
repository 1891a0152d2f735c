"""Exceptions raised by the core. Each message names the problem and the way out."""


class MiphaError(Exception):
    """Base class for every error the core raises on purpose."""


class ModelLoadError(MiphaError):
    """A model could not be found, downloaded, recognised or loaded."""


class UnsupportedModelError(ModelLoadError):
    """The checkpoint is a Mipha variant (or another model) this app does not run."""


class ContextOverflowError(MiphaError):
    """Even the newest question does not fit in the model's context window."""


class ImageError(MiphaError):
    """Base class for a user image that cannot be used."""


class InvalidImageError(ImageError):
    """The data is not an image this app can decode."""


class ImageTooLargeError(ImageError):
    """The image has more pixels (or bytes) than the configured limit."""


class InvalidMessagesError(MiphaError):
    """The chat messages are not in the expected Hugging Face chat format."""
