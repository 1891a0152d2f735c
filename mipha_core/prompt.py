"""Mipha's "phi" conversation template, in one place.

The original code builds ``SYSTEM + " USER: <image>\\n" + q + " ASSISTANT:"`` with
``sep=" "`` after user turns and ``sep2="<|endoftext|>"`` after assistant turns, then splits
the text at ``<image>`` and tokenizes each piece on its own. ``PhiPromptStyle`` reproduces
exactly that and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass

from mipha_core.conversation import Turn

SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
IMAGE_PLACEHOLDER = "<image>"
END_OF_TEXT = "<|endoftext|>"


@dataclass(frozen=True)
class PromptText:
    """The prompt as text pieces: ``before`` + image + ``after`` (``after`` is empty without image)."""

    before: str
    after: str
    has_image: bool

    @property
    def text(self) -> str:
        """The whole prompt with the ``<image>`` placeholder, as the original code writes it."""
        return self.before + (IMAGE_PLACEHOLDER + self.after if self.has_image else "")


class PhiPromptStyle:
    """Renders turns into Mipha's phi prompt; the image opens the user turn that carries it."""

    system = SYSTEM_PROMPT
    user_role = "USER"
    assistant_role = "ASSISTANT"
    stop_text = END_OF_TEXT

    def render(self, turns: list[Turn], *, image_turn: int | None, system: str | None = None) -> PromptText:
        """Render ``turns`` (the last one unanswered); ``image_turn`` indexes the turn whose
        user message starts with the image, or is None for a text-only prompt. ``system``
        replaces Mipha's own system sentence (an API client's system message).

        The text is cut where the image goes rather than split at "<image>", so a user who
        types "<image>" gets those characters tokenized as text.
        """
        before: list[str] = [self.system if system is None else system, " "]
        after: list[str] = []
        pieces = before
        for index, turn in enumerate(turns):
            pieces.append(f"{self.user_role}: ")
            if index == image_turn:
                pieces = after
                pieces.append("\n")
            pieces.append(f"{turn.question} ")
            if turn.answer is None:
                pieces.append(f"{self.assistant_role}:")
            else:
                pieces.append(f"{self.assistant_role}: {turn.answer}{self.stop_text}")
        return PromptText(before="".join(before), after="".join(after), has_image=image_turn is not None)
