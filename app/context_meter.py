"""How much of the model's window a conversation uses: the small meter under the chat. No gradio."""

from __future__ import annotations

from dataclasses import dataclass

from mipha_core import PreparedPrompt


@dataclass(frozen=True)
class ContextUse:
    """Positions of the model's window a conversation takes, as a person would ask about them."""

    context_length: int
    prompt_tokens: int
    """The conversation as the model reads it, photo included."""
    photo_tokens: int
    """The photo's share of `prompt_tokens`; 0 when no photo is sent."""
    reply_tokens: int
    """Room kept for the next reply."""
    dropped_turns: int
    """The oldest turns that no longer fit and that the model does not see."""

    @classmethod
    def of(cls, prepared: PreparedPrompt, *, context_length: int, image_tokens: int) -> ContextUse:
        return cls(context_length=context_length, prompt_tokens=prepared.prompt_tokens,
                   photo_tokens=image_tokens if prepared.image_sent else 0,
                   reply_tokens=prepared.max_new_tokens, dropped_turns=prepared.dropped_turns)

    @property
    def used_fraction(self) -> float:
        return min(1.0, self.prompt_tokens / self.context_length) if self.context_length else 0.0


def meter_html(use: ContextUse | None) -> str:
    """The meter and one line of text; empty for a new chat. Built from numbers and fixed words only."""
    if use is None:
        return ""
    parts = [f"{use.prompt_tokens:,} of {use.context_length:,} positions"]
    if use.photo_tokens:
        parts.append(f"photo {use.photo_tokens:,}")
    parts.append(f"{use.reply_tokens:,} kept for the reply")
    if use.dropped_turns == 1:
        parts.append("the oldest turn is no longer seen by the model")
    elif use.dropped_turns:
        parts.append(f"the {use.dropped_turns} oldest turns are no longer seen by the model")
    level = "full" if use.dropped_turns else ("high" if use.used_fraction > 0.75 else "ok")
    return (f'<div class="context-meter {level}">'
            f'<meter min="0" max="{use.context_length}" value="{use.prompt_tokens}" '
            f'aria-label="Context window used">{use.prompt_tokens}</meter>'
            f'<span>Context: {" · ".join(parts)}</span></div>')
