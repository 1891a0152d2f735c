"""Fitting a conversation into the context window: which turns are sent, as which token ids.

Every engine, local or remote, answers the same prompt: the turns kept here, rendered in the
"phi" template, with the image at the turn that carries the newest photo. Only tokenizing is
done, so a question can be checked before it is stored.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from transformers import PreTrainedTokenizerBase

from mipha_core.caching import CacheKey
from mipha_core.conversation import Turn, split_system, turns_from_messages
from mipha_core.errors import ContextOverflowError
from mipha_core.generation import InvalidGenerationParamsError
from mipha_core.photos import Photo
from mipha_core.prompt import PhiPromptStyle

MIN_REPLY_TOKENS = 32
"""The shortest reply budget a question is answered with when a long question leaves less than asked."""


@dataclass(frozen=True)
class PreparedPrompt:
    """A conversation fitted into the context window, as token ids and the image to send
    (a ``StoredPhoto`` is not decoded: ``photos.open_photo`` gives its pixels)."""

    token_ids: list[int]
    image: Photo | None
    dropped_turns: int
    max_new_tokens: int
    """The reply budget granted: what was asked, or less when a long question leaves less room."""
    turns: tuple[Turn, ...] = ()
    """The turns kept, oldest first; only the one at ``image_turn`` carries an image."""
    image_turn: int | None = None
    system: str | None = None
    """The client's system text, when it replaced Mipha's own."""

    @property
    def prompt_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def image_sent(self) -> bool:
        return self.image is not None


class PromptFitter:
    """The conversation rules: the model sees at most ``context_length`` positions (the image
    takes ``image_tokens``); when a conversation does not fit with room for the reply, whole
    turns are dropped oldest first, the turn that carries the image last. If the newest turn
    alone leaves less room than asked, the reply budget shrinks, to ``MIN_REPLY_TOKENS`` at
    least; a question that leaves less is refused (``ContextOverflowError``). Mipha was trained
    with one image per conversation, so only the most recent image is sent, at the turn it came
    with; earlier images stay in the history but the model no longer sees them.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, *, context_length: int, image_tokens: int,
                 image_token_id: int) -> None:
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.image_tokens = image_tokens
        self.image_token_id = image_token_id
        self.prompt_style = PhiPromptStyle()

    def prepare(self, messages: Sequence[dict[str, Any]], *, max_new_tokens: int,
                min_new_tokens: int = MIN_REPLY_TOKENS) -> PreparedPrompt:
        """Fit ``messages`` into the window with ``max_new_tokens`` of room for the reply (see the class)."""
        if max_new_tokens < 0 or min_new_tokens < 1:
            raise InvalidGenerationParamsError(
                f"max_new_tokens must be >= 0 and min_new_tokens >= 1, got {max_new_tokens} and {min_new_tokens}"
            )
        system, messages = split_system(messages)
        return self._prepare(turns_from_messages(messages), system=system, max_new_tokens=max_new_tokens,
                             min_new_tokens=min_new_tokens)

    def prepare_draft(self, messages: Sequence[dict[str, Any]], *, max_new_tokens: int) -> PreparedPrompt:
        """What every reply to a question still being typed reads first: ``messages`` end with the draft.

        The draft's last word may still grow, so the question is cut after its last whitespace, and
        the assistant's turn is not opened. Tokenizing splits text before a space, so these ids
        begin the prompt of the question as sent; where they do not (an edit mid-sentence), the
        caches compare ids and keep only what is the same. Raises as ``prepare`` does.
        """
        system, messages = split_system(messages)
        turns = turns_from_messages(messages)
        turns[-1] = Turn(_finished_words(turns[-1].question), None, turns[-1].image)
        prepared = self._prepare(turns, system=system, max_new_tokens=max_new_tokens,
                                 min_new_tokens=MIN_REPLY_TOKENS)
        opening = self.tokenizer(f" {self.prompt_style.assistant_role}:", add_special_tokens=False).input_ids
        ids = prepared.token_ids
        if ids[len(ids) - len(opening):] == opening:
            ids = ids[:len(ids) - len(opening)]
        return replace(prepared, token_ids=ids)

    def _prepare(self, turns: list[Turn], *, system: str | None, max_new_tokens: int,
                 min_new_tokens: int) -> PreparedPrompt:
        image_turn = _latest_image_turn(turns)
        kept, ids = self._fit(turns, image_turn=image_turn, room=max_new_tokens, system=system)
        image_sent = image_turn in kept
        shortest = min(min_new_tokens, max_new_tokens)
        if len(ids) + shortest > self.context_length:
            raise self._overflow(turns[-1].question, prompt_tokens=len(ids), image_sent=image_sent,
                                 reply_tokens=shortest)
        sent_turn = kept.index(image_turn) if image_sent else None
        return PreparedPrompt(
            token_ids=ids,
            image=turns[image_turn].image if image_sent else None,
            dropped_turns=len(turns) - len(kept),
            max_new_tokens=min(max_new_tokens, self.context_length - len(ids)),
            turns=tuple(Turn(turns[i].question, turns[i].answer, turns[i].image if n == sent_turn else None)
                        for n, i in enumerate(kept)),
            image_turn=sent_turn,
            system=system,
        )

    def _fit(self, turns: list[Turn], *, image_turn: int | None, room: int,
             system: str | None) -> tuple[list[int], list[int]]:
        """Drop turns until ``room`` positions follow the prompt or only the newest is left;
        returns the indices of the kept turns and the prompt's token ids."""
        kept = list(range(len(turns)))
        while True:
            sent_image_turn = kept.index(image_turn) if image_turn in kept else None
            ids = self.token_ids([turns[i] for i in kept], image_turn=sent_image_turn, system=system)
            if len(ids) + room <= self.context_length or len(kept) == 1:
                return kept, ids
            kept.remove(_turn_to_drop(kept, image_turn))

    def token_ids(self, turns: list[Turn], *, image_turn: int | None, system: str | None = None) -> list[int]:
        """Tokenize each side of the image on its own, as the original code does."""
        prompt = self.prompt_style.render(turns, image_turn=image_turn, system=system)
        ids = self.tokenizer(prompt.before, add_special_tokens=False).input_ids
        if prompt.has_image:
            ids += [self.image_token_id] * self.image_tokens
            ids += self.tokenizer(prompt.after, add_special_tokens=False).input_ids
        return ids

    def _overflow(self, question: str, *, prompt_tokens: int, image_sent: bool,
                  reply_tokens: int) -> ContextOverflowError:
        """The error for a question too long even alone; characters are estimated from its own tokens."""
        tokens_over = prompt_tokens + reply_tokens - self.context_length
        question_tokens = len(self.tokenizer(question, add_special_tokens=False).input_ids)
        characters_over = math.ceil(tokens_over * len(question) / max(question_tokens, 1))
        photo = f" with the photo (it takes {self.image_tokens} positions)" if image_sent else ""
        return ContextOverflowError(
            f"your question is about {tokens_over:,} tokens (roughly {characters_over:,} characters) too long "
            f"for the model's {self.context_length}-position window{photo}; shorten it",
            prompt_tokens=prompt_tokens,
            context_length=self.context_length,
            image_tokens=self.image_tokens if image_sent else 0,
            reply_tokens=reply_tokens,
            characters_over=characters_over,
        )


class FittedEngine:
    """What every engine shares: its ``fitter`` decides which turns fit, before any generation."""

    fitter: PromptFitter

    @property
    def context_length(self) -> int:
        return self.fitter.context_length

    @property
    def image_tokens(self) -> int:
        return self.fitter.image_tokens

    def prepare(self, messages: Sequence[dict[str, Any]], *, max_new_tokens: int,
                min_new_tokens: int = MIN_REPLY_TOKENS) -> PreparedPrompt:
        """Fit ``messages`` into the context window; tokenizing only, the image is not touched.

        Cheap enough to check a question before storing it. Older turns are dropped (see
        ``PromptFitter``) until the reply has ``max_new_tokens`` of room. If the newest turn alone
        leaves less, the reply gets what is left, down to ``min_new_tokens`` (or ``max_new_tokens``
        if smaller); below that ``ContextOverflowError`` says how much the question is too long.
        """
        return self.fitter.prepare(messages, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens)

    def prefetch(self, messages: Sequence[dict[str, Any]], *, max_new_tokens: int, cache: CacheKey) -> None:
        """Start reading, in the background, what the reply to a question still being typed will
        read first (``PromptFitter.prepare_draft``), so that Send finds it read. Returns at once.

        Only an engine whose prompt reading takes seconds does anything (llama.cpp on a CPU);
        this one reads a whole prompt well within the time a person takes to press Send.
        """


def _finished_words(text: str) -> str:
    """``text`` up to its last whitespace, without it: the words a person has finished typing."""
    finished = _UP_TO_LAST_SPACE.match(text)
    return finished.group(1).rstrip() if finished else ""


_UP_TO_LAST_SPACE = re.compile(r"(.*)\s", re.DOTALL)


def _turn_to_drop(kept: list[int], image_turn: int | None) -> int:
    """The oldest kept turn before the newest, the one carrying the image only when no other is left."""
    older = kept[:-1]
    without_image = [index for index in older if index != image_turn]
    return (without_image or older)[0]


def _latest_image_turn(turns: list[Turn]) -> int | None:
    """Index of the turn that carries the most recent image."""
    for index in range(len(turns) - 1, -1, -1):
        if turns[index].image is not None:
            return index
    return None
