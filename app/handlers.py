"""Event handlers: thin functions over storage and the engine, testable without a browser.

Each handler takes plain values (what the components hold) and returns plain values or
`gr.update(...)`s; `app.ui` wires them to components. User-facing failures are raised as
`gr.Error` with the cause and the way out; notices that do not stop anything are
`gr.Warning` / `gr.Info`.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image

import storage as db
from app.access import identity_for, owner_id_for
from app.model_slot import ModelNotReadyError, ModelState
from app.services import Services
from app.text_input import clean_text
from app.uploads import discard_upload
from app.views import chatbot_messages, conversation_choices, model_messages
from mipha_core import CacheKey, ContextOverflowError, MiphaError
from mipha_core.images import load_image

log = logging.getLogger(__name__)

DEFAULT_TEMPERATURE = 0.2
DEFAULT_TOP_P = 1.0
DEFAULT_MAX_NEW_TOKENS = 512
OWNER_CACHE_SIZE = 10_000
_PHOTO_STAND_IN = Image.new("RGB", (1, 1))


@dataclass(frozen=True)
class GenerationSettings:
    """What the accordion holds; stored with each conversation."""

    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = DEFAULT_TOP_P
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS

    @classmethod
    def from_stored(cls, stored: dict[str, Any], *, max_new_tokens: int) -> GenerationSettings:
        """Settings kept with a conversation, brought within today's bounds."""
        return cls.bounded(stored.get("temperature", DEFAULT_TEMPERATURE), stored.get("top_p", DEFAULT_TOP_P),
                           stored.get("max_new_tokens", max_new_tokens), limit=max_new_tokens)

    @classmethod
    def bounded(cls, temperature: Any, top_p: Any, max_new_tokens: Any, *, limit: int) -> GenerationSettings:
        """Values from the page or the database, clamped to the sliders' ranges; defaults for junk."""
        try:
            values = (float(temperature), float(top_p), int(max_new_tokens))
        except (TypeError, ValueError, OverflowError):
            return cls(max_new_tokens=limit)
        if not all(math.isfinite(v) for v in values):
            return cls(max_new_tokens=limit)
        return cls(temperature=min(max(values[0], 0.0), 2.0), top_p=min(max(values[1], 0.05), 1.0),
                   max_new_tokens=min(max(values[2], 1), limit))

    def as_dict(self) -> dict[str, float | int]:
        return {"temperature": self.temperature, "top_p": self.top_p, "max_new_tokens": self.max_new_tokens}


@dataclass(frozen=True)
class DraftQuestion:
    """A question not stored yet, shaped like the stored messages `model_messages` reads."""

    text: str
    has_photo: bool
    role: db.Role = db.Role.USER

    @property
    def image_sha256(self) -> str | None:
        return "draft-photo" if self.has_photo else None


class Handlers:
    """All event handlers of one app, bound to its `Services`."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.storage = services.storage
        self.settings = services.settings
        # identity → user row id never changes: look it up (a write transaction) once, not per event
        self._owner_ids = functools.lru_cache(maxsize=OWNER_CACHE_SIZE)(
            lambda identity: owner_id_for(self.storage, identity))

    # --- identity --------------------------------------------------------------------------

    def owner(self, secret: str | None, *, username: str | None, oauth_username: str | None) -> int | None:
        """The owner this request proves (see `app.access`); None when it proves none."""
        identity = identity_for(login_required=bool(self.settings.auth), username=username,
                                oauth_username=oauth_username, browser_secret=secret)
        if identity is None:
            return None
        with _user_errors():
            return self._owner_ids(identity)

    # --- sidebar ---------------------------------------------------------------------------

    def conversation_list(self, owner_id: int | None, query: str = "", selected: str | None = None) -> dict[str, Any]:
        if owner_id is None:
            return gr.update(choices=[], value=None)
        with _user_errors(), self.storage.session() as s:
            conversations = db.list_conversations(s, owner_id=owner_id, query=clean_text(query).strip() or None)
        return gr.update(choices=conversation_choices(conversations), value=selected)

    def open_conversation(self, owner_id: int | None, conversation_id: str | None) -> tuple[str | None, list[dict], float, float, int, str]:
        """Selected in the sidebar: its id, messages, generation settings and title."""
        if not conversation_id or owner_id is None:
            return self.new_chat()
        with _user_errors(), self.storage.session() as s:
            conversation = db.get_conversation(s, owner_id=owner_id, conversation_id=conversation_id)
            records = db.list_messages(s, owner_id=owner_id, conversation_id=conversation_id)
        params = GenerationSettings.from_stored(conversation.settings, max_new_tokens=self.settings.max_new_tokens)
        return (conversation.id, self.show(records), params.temperature, params.top_p, params.max_new_tokens,
                conversation.title)

    def new_chat(self) -> tuple[None, list[dict], float, float, int, str]:
        """Back to an empty chat; the conversation is created by its first message."""
        params = GenerationSettings(max_new_tokens=min(DEFAULT_MAX_NEW_TOKENS, self.settings.max_new_tokens))
        return None, [], params.temperature, params.top_p, params.max_new_tokens, ""

    def rename(self, owner_id: int | None, conversation_id: str | None, title: str) -> None:
        if not conversation_id or owner_id is None:
            raise gr.Error("Open a conversation first, then rename it.")
        with _user_errors(), self.storage.session() as s:
            db.rename_conversation(s, owner_id=owner_id, conversation_id=conversation_id, title=clean_text(title))

    def delete(self, owner_id: int | None, conversation_id: str | None) -> None:
        if not conversation_id or owner_id is None:
            raise gr.Error("Open a conversation first, then delete it.")
        self.services.cancels.cancel(owner_id, conversation_id)
        with _user_errors(), self.storage.session() as s:
            db.delete_conversation(s, owner_id=owner_id, conversation_id=conversation_id)
        if self.services.model.status().state is ModelState.READY:
            self.services.model.engine().forget(_cache_key(owner_id, conversation_id))

    def remember_settings(self, owner_id: int | None, conversation_id: str | None,
                          temperature: float, top_p: float, max_new_tokens: int) -> None:
        if not conversation_id or owner_id is None:
            return
        params = GenerationSettings.bounded(temperature, top_p, max_new_tokens, limit=self.settings.max_new_tokens)
        with _user_errors(), self.storage.session() as s:
            db.update_conversation_settings(s, owner_id=owner_id, conversation_id=conversation_id,
                                            settings=params.as_dict())

    # --- chat ------------------------------------------------------------------------------

    def submit(self, owner_id: int | None, message: dict | None, conversation_id: str | None,
               temperature: float, top_p: float, max_new_tokens: int) -> tuple[str, list[dict]]:
        """Check and store the question (and photo); the reply streams in `reply`.

        Every refusal happens before anything is stored and raises `gr.Error`, so the text and
        photo stay in the box: an empty or too-long message, a question that cannot fit in the
        model's window, a file that is not a usable image, a model that is not ready.
        """
        if owner_id is None:
            raise gr.Error("The page is still starting; try again in a second.")
        text, files = _message_parts(message)
        if not text.strip() and not files:
            raise gr.Error("Type a question or add a photo first.")
        if len(text) > self.settings.max_message_chars:
            raise gr.Error(f"Your message has {len(text)} characters; the limit is "
                           f"{self.settings.max_message_chars}. Shorten it or split it into several messages.")
        if len(files) > 1:
            raise gr.Error("Add one photo per message: the model looks at one image at a time.")
        engine = self._model_or_error()
        params = GenerationSettings.bounded(temperature, top_p, max_new_tokens, limit=self.settings.max_new_tokens)
        earlier = self._messages(owner_id, conversation_id) if conversation_id else []
        self._check_fits(engine, [*earlier, DraftQuestion(text=text, has_photo=bool(files))], params)
        image = self._save_upload(Path(files[0])) if files else None
        with _user_errors(), self.storage.session() as s:
            if conversation_id is None:
                conversation = db.create_conversation(
                    s, owner_id=owner_id, model_id=self.services.model.status().model, settings=params.as_dict())
                conversation_id = conversation.id
            else:
                db.update_conversation_settings(s, owner_id=owner_id, conversation_id=conversation_id,
                                                settings=params.as_dict())
            db.add_user_message(s, owner_id=owner_id, conversation_id=conversation_id, text=text,
                                image_sha256=image.sha256 if image else None)
            records = db.list_messages(s, owner_id=owner_id, conversation_id=conversation_id)
        if image is not None and any(r.image_sha256 for r in earlier):
            gr.Info("The model now looks at this photo. Earlier photos stay in the chat, but it no longer sees them.")
        self.services.cancels.new(owner_id, conversation_id)
        return conversation_id, self.show(records)

    def _messages(self, owner_id: int, conversation_id: str) -> list[db.MessageRecord]:
        with _user_errors(), self.storage.session() as s:
            return db.list_messages(s, owner_id=owner_id, conversation_id=conversation_id)

    def _check_fits(self, engine, records, params: GenerationSettings) -> None:
        """Refuse, before anything is stored, a question the model's window cannot hold.

        Only the prompt's length matters here, so every photo is stood in for by a blank one:
        no photo is decoded and the vision tower does not run.
        """
        messages = model_messages(records, load_image=lambda _sha256: _PHOTO_STAND_IN)
        try:
            engine.prepare(messages, max_new_tokens=params.max_new_tokens)
        except ContextOverflowError as e:
            raise gr.Error(f"{_sentence(str(e))} Your text is still in the box.") from e

    def prepare_regenerate(self, owner_id: int | None, conversation_id: str | None) -> list[dict]:
        """Remove the last reply so that `reply` writes a new one."""
        if not conversation_id or owner_id is None:
            raise gr.Error("There is no reply to regenerate yet: ask a question first.")
        self._model_or_error()
        with _user_errors(), self.storage.session() as s:
            records = db.list_messages(s, owner_id=owner_id, conversation_id=conversation_id)
            last_question = max((r.position for r in records if r.role is db.Role.USER), default=None)
            if last_question is None:
                raise gr.Error("There is no question to answer again in this conversation.")
            db.delete_messages_from(s, owner_id=owner_id, conversation_id=conversation_id,
                                    position=last_question + 1)
            records = db.list_messages(s, owner_id=owner_id, conversation_id=conversation_id)
        self.services.cancels.new(owner_id, conversation_id)
        return self.show(records)

    def reply(self, owner_id: int | None, conversation_id: str | None,
              temperature: float, top_p: float, max_new_tokens: int) -> Iterator[list[dict]]:
        """Stream the answer to the conversation's last question, persisting it as it grows.

        Stop sets this conversation's cancel event; closing the tab closes this generator,
        whose `finally` sets it too, so the model is freed for the next user either way.
        """
        if not conversation_id or owner_id is None:
            return
        engine = self._model_or_error()
        cancel = self.services.cancels.get(owner_id, conversation_id)
        try:
            with self.storage.session() as s:
                records = db.list_messages(s, owner_id=owner_id, conversation_id=conversation_id)
            if not records or records[-1].role is not db.Role.USER:
                return
            messages = model_messages(records, load_image=self._load_image)
            params = GenerationSettings.bounded(temperature, top_p, max_new_tokens, limit=self.settings.max_new_tokens)
            shown = self.show(records)
            yield from self._stream_into_storage(engine, messages, params, cancel, records, shown,
                                                 conversation_id=conversation_id, owner_id=owner_id)
        finally:
            cancel.set()
            self.services.cancels.release(owner_id, conversation_id, cancel)

    def _stream_into_storage(self, engine, messages, params: GenerationSettings, cancel: threading.Event,
                             records, shown: list[dict], *, conversation_id: str, owner_id: int
                             ) -> Iterator[list[dict]]:
        try:
            stream = engine.stream(messages, max_new_tokens=params.max_new_tokens, temperature=params.temperature,
                                   top_p=params.top_p, cancel=cancel, cache=_cache_key(owner_id, conversation_id))
        except ContextOverflowError as e:
            with self.storage.session() as s:  # the unanswerable question goes; its text is in the error
                db.delete_messages_from(s, owner_id=owner_id, conversation_id=conversation_id,
                                        position=records[-1].position)
            raise gr.Error(f"{e} Your message was: {records[-1].text[:200]!r}") from e
        if stream.dropped_turns:
            gr.Warning(f"This conversation is longer than the model's memory: the {stream.dropped_turns} oldest "
                       "turns are no longer seen by the model. Start a new chat for a fresh context.")
        # closing() makes an early exit (Stop, a closed tab) wait for the generation thread to end
        with db.ReplyWriter.start(self.storage, owner_id=owner_id, conversation_id=conversation_id) as writer, \
                closing(iter(stream)) as chunks:
            try:
                for chunk in chunks:
                    writer.append(chunk)
                    yield shown + chatbot_messages([_growing(writer.message, writer.text)], image_file=self._image_file)
            except MiphaError as e:  # e.g. out of memory on the device: keep what came, say why
                writer.finish(status=db.MessageStatus.ERROR, finish_reason="error")
                gr.Warning(f"{e}")
            except db.LimitExceededError as e:
                cancel.set()
                writer.finish(status=db.MessageStatus.COMPLETE, finish_reason="length")
                gr.Warning(str(e))
            except db.StorageUnavailableError as e:  # the disk filled up or the database is locked
                cancel.set()  # the writer records the reply as failed on its way out, if it can
                raise gr.Error(str(e)) from e
            else:
                stats = stream.stats
                status = db.MessageStatus.CANCELLED if stats.finish_reason == "cancelled" else db.MessageStatus.COMPLETE
                writer.finish(status=status, finish_reason=stats.finish_reason, prompt_tokens=stats.prompt_tokens,
                              completion_tokens=stats.completion_tokens, reused_tokens=stats.reused_tokens)
        yield shown + chatbot_messages([writer.message], image_file=self._image_file)

    def stop(self, owner_id: int | None, conversation_id: str | None) -> None:
        """Stop this conversation's reply within a token; the partial text is kept and marked."""
        if conversation_id and owner_id is not None:
            self.services.cancels.cancel(owner_id, conversation_id)

    # --- helpers ---------------------------------------------------------------------------

    def show(self, records) -> list[dict]:
        return chatbot_messages(records, image_file=self._image_file)

    def _image_file(self, sha256: str) -> Path | None:
        try:
            return db.image_path(self.storage, sha256)
        except db.ImageNotFoundError:
            return None

    def _load_image(self, sha256: str):
        return load_image(db.image_path(self.storage, sha256))

    def _model_or_error(self):
        try:
            return self.services.model.engine()
        except ModelNotReadyError as e:
            raise gr.Error(str(e)) from e

    def _save_upload(self, path: Path) -> db.ImageRecord:
        """Store the cleaned photo; the original upload (with its EXIF and GPS) is deleted."""
        limit = self.storage.limits.max_image_bytes
        try:
            size = path.stat().st_size
        except OSError as e:
            raise gr.Error("The upload did not arrive completely; add the photo again.") from e
        if size > limit:
            discard_upload(path)
            raise gr.Error(f"The photo is {size / 1e6:.1f} MB; the limit is {limit / 1e6:.0f} MB. "
                           "Use a smaller or more compressed photo.")
        try:
            record = db.save_image(self.storage, path.read_bytes())
        except db.InvalidImageError as e:
            discard_upload(path)
            raise gr.Error("That file is not a photo this app can read: send a JPEG, PNG, WebP, GIF, BMP, HEIC "
                           "or AVIF photo.") from e
        except db.LimitExceededError as e:
            discard_upload(path)
            raise gr.Error(str(e)) from e
        except db.StorageError as e:  # e.g. a full disk: keep the upload so that sending again works
            raise gr.Error(str(e)) from e
        except OSError as e:
            raise gr.Error("The upload did not arrive completely; add the photo again.") from e
        discard_upload(path)
        return record


def _cache_key(owner_id: int, conversation_id: str) -> CacheKey:
    """Caches are kept per conversation and shared only among one person's conversations."""
    return CacheKey(owner=str(owner_id), conversation=conversation_id)


def _growing(message: db.MessageRecord, text: str) -> db.MessageRecord:
    """The reply being written, with the text received so far (the stored copy lags by design)."""
    return replace(message, text=text, status=db.MessageStatus.PARTIAL)


def _message_parts(message: dict | str | None) -> tuple[str, list[str]]:
    """The text (cleaned, see `clean_text`) and file paths of the composer's value."""
    if message is None:
        return "", []
    if isinstance(message, str):
        return clean_text(message), []
    files = [f if isinstance(f, str) else f.get("path", "") for f in message.get("files") or []]
    return clean_text(message.get("text") or ""), [f for f in files if isinstance(f, str) and f]


def _sentence(text: str) -> str:
    """`text` as a sentence for a person: capitalised, ending with a full stop."""
    text = text.strip()
    if not text:
        return text
    text = text[0].upper() + text[1:]
    return text if text.endswith((".", "!", "?")) else text + "."


class _user_errors:
    """Turn storage's user-facing errors into `gr.Error` (their messages are written for users)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is not None and isinstance(exc, db.StorageError):
            raise gr.Error(str(exc)) from exc
        return False
