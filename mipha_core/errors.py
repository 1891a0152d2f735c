"""Exceptions raised by the core. Each message names the problem and the way out."""


class MiphaError(Exception):
    """Base class for every error the core raises on purpose."""


class ModelLoadError(MiphaError):
    """A model could not be found, downloaded, recognised or loaded."""


class UnsupportedModelError(ModelLoadError):
    """The checkpoint is a Mipha variant (or another model) this app does not run."""


class ContextOverflowError(MiphaError):
    """The newest question does not fit in the context window, even alone with the shortest reply.

    The figures let a caller tell the person how much to cut: ``tokens_over`` tokens (about
    ``characters_over`` characters of this question) must go.
    """

    def __init__(
        self,
        message: str,
        *,
        prompt_tokens: int,
        context_length: int,
        image_tokens: int,
        reply_tokens: int,
        characters_over: int,
    ) -> None:
        super().__init__(message)
        self.prompt_tokens = prompt_tokens
        """Positions the newest turn alone takes: system prompt, photo and question."""
        self.context_length = context_length
        self.image_tokens = image_tokens
        """Positions the photo takes within ``prompt_tokens``; 0 when no photo is sent."""
        self.reply_tokens = reply_tokens
        """The smallest reply budget that had to fit after the prompt."""
        self.characters_over = characters_over

    @property
    def tokens_over(self) -> int:
        """How many tokens the question must lose to fit."""
        return self.prompt_tokens + self.reply_tokens - self.context_length


class ImageError(MiphaError):
    """Base class for a user image that cannot be used."""


class InvalidImageError(ImageError):
    """The data is not an image this app can decode."""


class ImageTooLargeError(ImageError):
    """The image has more pixels (or bytes) than the configured limit."""


class InvalidMessagesError(MiphaError):
    """The chat messages are not in the expected Hugging Face chat format."""

