"""Event handlers: plain functions over storage, the engine and the reply jobs, testable without a browser.

Each handler takes the owner id (from the request, see `app.events`) and the values the page
sends, and returns a `PageView` naming what changes. Expected refusals raise `Refused`: the
composer shows the sentence and keeps the person's text and photo.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from PIL import Image

import storage as db
from app.access import identity_for, owner_id_for
from app.chat_view import (
    chatbot_messages,
    conversation_choices,
    growing_reply,
    model_messages,
    question_end,
)
from app.context_meter import ContextUse, meter_html
from app.drafts import DraftPhotos
from app.events import UNEXPECTED_FAILURE, Refused
from app.gpu import on_gpu
from app.library import opened, share_state
from app.model_slot import ModelNotReadyError, ModelState
from app.page_view import (
    KEEP,
    NO_NOTICE,
    ConversationList,
    Editing,
    Notice,
    PageView,
    ShareState,
)
from app.replies import ReplyAlreadyRunningError
from app.services import Services
from app.text_input import clean_text
from app.turn import ReplyOutcome, cache_key, reply_work, stored_photo
from app.uploads import save_upload
from mipha_core import ContextOverflowError, Engine, GenerationParams
from mipha_core.caching import NEW_CHAT
from mipha_core.generation import DEFAULT_MAX_NEW_TOKENS

log = logging.getLogger(__name__)

OWNER_CACHE_SIZE = 10_000
MAX_ACTION_CHARS = 200
STREAM_INTERVAL_S = 0.1
"""At most ten page updates a second while a reply streams: each re-renders the reply so far."""
MAX_ADDRESS_CHARS = 64
EDITING_LABEL = "Editing a question: Send makes a new version of it; the earlier one stays reachable with ‹ ›."
_PHOTO_STAND_IN = Image.new("RGB", (1, 1))


@dataclass(frozen=True)
class DraftQuestion:
    """A question not stored yet, shaped like the stored messages `model_messages` reads."""

    text: str
    image_sha256: str | None
    role: db.Role = db.Role.USER


class Handlers:
    """All event handlers of one app, bound to its `Services`."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.storage = services.storage
        self.settings = services.settings
        self.replies = services.replies
        self.draft_photos = DraftPhotos(self.storage)
        # identity → user row id never changes: look it up (a write transaction) once, not per event
        self._owner_ids = functools.lru_cache(maxsize=OWNER_CACHE_SIZE)(
            lambda identity: owner_id_for(self.storage, identity))

    def owner(self, secret: str | None, *, username: str | None, oauth_username: str | None) -> int | None:
        """The owner this request proves (see `app.access`); None when it proves none."""
        identity = identity_for(login_required=bool(self.settings.auth), username=username,
                                oauth_username=oauth_username, browser_secret=secret)
        return None if identity is None else self._owner_ids(identity)

    # --- opening and listing ---------------------------------------------------------------

    def load(self, owner_id: int | None, address: str | None) -> PageView:
        """The page as the address asks: that conversation, or a new chat (with a notice if not found).

        `address` is the `c` of `?c=<id>`; after back/forward the script adds `#<count>`, dropped here.
        """
        address = (address or "").partition("#")[0].strip()[:MAX_ADDRESS_CHARS]
        if owner_id is None or not address:  # the settings keep what the page has (or what was just changed)
            return replace(self.new_chat(owner_id), params=KEEP)
        try:
            return self.open(owner_id, address)
        except db.NotFoundError:
            view = self.new_chat(owner_id)
            return view.merged(PageView(notice=Notice(
                "This conversation was not found: it was deleted, or it belongs to someone else. "
                "Here is a new chat.", "warning")))

    def open(self, owner_id: int | None, conversation_id: str | None) -> PageView:
        """A conversation from the sidebar, the address or back/forward: its messages, settings and title."""
        if not conversation_id or owner_id is None:
            return self.new_chat(owner_id)
        with self.storage.session() as s:
            conversation = db.get_conversation(s, owner_id=owner_id, conversation_id=conversation_id)
            records = db.list_messages(s, owner_id=owner_id, conversation_id=conversation_id)
            share = db.share_of(s, owner_id=owner_id, conversation_id=conversation_id)
        params = GenerationParams.clamped(**_stored_params(conversation.settings), limit=self.settings.max_new_tokens)
        use = self._context_use(records, params)
        return PageView(
            conversation_id=conversation.id, messages=self._show(records, use), title=conversation.title,
            params=params,
            conversations=self._conversations(owner_id, selected=conversation.id), notice=NO_NOTICE,
            editing=None, busy=self.replies.running((owner_id, conversation.id)),
            context=meter_html(use), share=share_state(share),
            download=None)

    def new_chat(self, owner_id: int | None) -> PageView:
        """An empty chat; the conversation is created by its first message."""
        return PageView(
            conversation_id=None, messages=[], title="", params=self._default_params(),
            conversations=self._conversations(owner_id, selected=None), notice=NO_NOTICE, editing=None,
            busy=False, context="", share=ShareState(None), download=None)

    def search(self, owner_id: int | None, query: str, selected: str | None) -> PageView:
        return PageView(conversations=self._conversations(owner_id, selected=selected, query=query))

    def rename(self, owner_id: int | None, conversation_id: str | None, title: str, query: str = "") -> PageView:
        owner_id, conversation_id = opened(owner_id, conversation_id, "rename it")
        with self.storage.session() as s:
            record = db.rename_conversation(s, owner_id=owner_id, conversation_id=conversation_id,
                                            title=clean_text(title))
        return PageView(title=record.title, notice=Notice("Renamed.", "info"),
                        conversations=self._conversations(owner_id, selected=conversation_id, query=query))

    def delete(self, owner_id: int | None, conversation_id: str | None) -> PageView:
        owner_id, conversation_id = opened(owner_id, conversation_id, "delete it")
        self.replies.cancel((owner_id, conversation_id))
        with self.storage.session() as s:
            db.delete_conversation(s, owner_id=owner_id, conversation_id=conversation_id)
        if self.services.model.status().state is ModelState.READY:
            self.services.model.engine().forget(cache_key(owner_id, conversation_id))
        return self.new_chat(owner_id).merged(PageView(notice=Notice("The conversation was deleted.", "info")))

    def remember_settings(self, owner_id: int | None, conversation_id: str | None,
                          temperature: float, top_p: float, max_new_tokens: int) -> PageView:
        if not conversation_id or owner_id is None:
            return PageView()
        params = self._params(temperature, top_p, max_new_tokens)
        with self.storage.session() as s:
            db.update_conversation_settings(s, owner_id=owner_id, conversation_id=conversation_id,
                                            settings=params.as_dict())
        return PageView()

    # --- asking ----------------------------------------------------------------------------

    def send(self, owner_id: int | None, message: dict | None, conversation_id: str | None,
             editing: Editing | None, temperature: float, top_p: float, max_new_tokens: int) -> PageView:
        """Check and store the question (and photo), then start its reply on the server.

        Every refusal happens before anything is stored and raises `Refused`, so the text and
        photo stay in the box: an empty or too-long message, a question that cannot fit in the
        model's window, a file that is not a usable photo, a model that is not ready.
        """
        if owner_id is None:
            raise Refused("The page is still starting; try again in a second.", kind="warning")
        text, files = _message_parts(message)
        if not text.strip() and not files and editing is None:
            raise Refused("Type a question or add a photo first.", kind="warning")
        if len(text) > self.settings.max_message_chars:
            raise Refused(f"Your message has {len(text):,} characters; the limit is "
                          f"{self.settings.max_message_chars:,}. Shorten it or split it into several messages.")
        if len(files) > 1:
            raise Refused("Add one photo per message: the model looks at one image at a time.")
        if conversation_id and self.replies.running((owner_id, conversation_id)):
            raise Refused("A reply is still being written here: wait for it or press Stop.", kind="warning")
        engine = self._engine()
        params = self._params(temperature, top_p, max_new_tokens)
        earlier, edited = self._before_question(owner_id, conversation_id, editing)
        if editing is not None and not text.strip() and not files and not (edited and edited.image_sha256):
            raise Refused("Type the new version of the question first.", kind="warning")
        kept_photo = edited.image_sha256 if edited is not None and not files else None
        draft = DraftQuestion(text=text, image_sha256=kept_photo or ("draft" if files else None))
        self._check_fits(engine, [*earlier, draft], params)
        image = save_upload(self.storage, Path(files[0])) if files else None
        with self.storage.session() as s:
            if conversation_id is None:
                conversation_id = db.create_conversation(
                    s, owner_id=owner_id, model_id=self.services.model.status().model,
                    settings=params.as_dict()).id
            else:
                db.update_conversation_settings(s, owner_id=owner_id, conversation_id=conversation_id,
                                                settings=params.as_dict())
            db.add_user_message(s, owner_id=owner_id, conversation_id=conversation_id, text=text,
                                image_sha256=image.sha256 if image else kept_photo,
                                edit_of=editing.message_id if editing is not None else None)
            records = db.list_messages(s, owner_id=owner_id, conversation_id=conversation_id)
        notice = NO_NOTICE
        if image is not None and any(r.image_sha256 for r in earlier):
            notice = Notice("The model now looks at this photo. Earlier photos stay in the chat, "
                            "but it no longer sees them.", "info")
        busy = True
        try:
            self._start_reply(engine, owner_id, conversation_id, params)
        except Refused as refused:  # stored, but no reply started: show it stored, never leave it in the box too
            busy = False
            notice = Notice(f"{refused} Your question is saved: press Regenerate to have it answered.", "warning")
        return PageView(conversation_id=conversation_id, messages=self._show(records), composer="clear",
                        editing=None, busy=busy, notice=notice,
                        conversations=self._conversations(owner_id, selected=conversation_id))

    def draft(self, owner_id: int | None, message: dict | None, conversation_id: str | None,
              editing: Editing | None, temperature: float, top_p: float, max_new_tokens: int) -> None:
        """The question as typed so far: the engine reads its photo and finished words ahead
        (`Engine.prefetch`), so that Send finds them read. Shows nothing and stores nothing; what
        is wrong with a draft is for Send to say, so a failure here is only logged."""
        try:
            self._read_ahead(owner_id, message, conversation_id, editing, max_new_tokens)
        except Exception:
            log.debug("not reading a draft ahead", exc_info=True)

    def _read_ahead(self, owner_id: int | None, message: dict | None, conversation_id: str | None,
                    editing: Editing | None, max_new_tokens: int) -> None:
        if owner_id is None or editing is not None or self.services.model.status().state is not ModelState.READY:
            return
        text, files = _message_parts(message)
        if (not text.strip() and not files) or len(text) > self.settings.max_message_chars or len(files) > 1:
            return
        if conversation_id and self.replies.running((owner_id, conversation_id)):
            return
        earlier, _ = self._before_question(owner_id, conversation_id, None)  # only the owner's conversation
        photo = self.draft_photos.photo(owner_id, Path(files[0])) if files else None
        if files and photo is None:
            return
        draft = DraftQuestion(text=text, image_sha256=photo.key if photo is not None else None)
        messages = model_messages([*earlier, draft], photo=lambda sha256: photo if photo is not None and
                                  sha256 == photo.key else stored_photo(self.storage, sha256))
        params = self._params(0.0, 1.0, max_new_tokens)
        self.services.model.engine().prefetch(messages, max_new_tokens=params.max_new_tokens,
                                              cache=cache_key(owner_id, conversation_id or NEW_CHAT))

    def regenerate(self, owner_id: int | None, conversation_id: str | None,
                   temperature: float, top_p: float, max_new_tokens: int) -> PageView:
        """A new reply to the last question; the earlier reply stays reachable as another version."""
        if not conversation_id or owner_id is None:
            raise Refused("There is no reply to regenerate yet: ask a question first.", kind="warning")
        if self.replies.running((owner_id, conversation_id)):
            raise Refused("A reply is still being written here: wait for it or press Stop.", kind="warning")
        engine = self._engine()
        params = self._params(temperature, top_p, max_new_tokens)
        with self.storage.session() as s:
            records = db.list_messages(s, owner_id=owner_id, conversation_id=conversation_id)
            question = next((r for r in reversed(records) if r.role is db.Role.USER), None)
            if question is None:
                raise Refused("There is no question to answer again in this conversation.", kind="warning")
            records = db.regenerate_from(s, owner_id=owner_id, conversation_id=conversation_id,
                                         question_id=question.id)
        self._start_reply(engine, owner_id, conversation_id, params)
        return PageView(messages=self._show(records), busy=True, notice=NO_NOTICE, editing=None)

    def attach(self, owner_id: int | None, conversation_id: str | None, *,
               new_reply: bool = False) -> Iterator[PageView]:
        """Follow the conversation's reply job: the text so far, then live, then the stored reply.

        After Send or Regenerate (`new_reply`) the page waits for this reply even if it is already
        over. After a load, a switch or back/forward the page shows what is stored, so only a reply
        still being written is followed: a finished one changes nothing, which also keeps a late
        follower from drawing over the conversation the person has moved on to. A reload, a second
        tab or a reconnect pick a running reply up where it is; closing the page only closes this
        listener, and the job goes on for a grace period.
        """
        if not conversation_id or owner_id is None:
            return
        job = self.replies.get((owner_id, conversation_id))
        if job is None or (job.done and not new_reply):
            return
        records = self._records(owner_id, conversation_id)
        shown = self._show(records[:question_end(records)])  # rendered once; only the reply grows
        for snapshot in job.listen(min_interval_s=STREAM_INTERVAL_S):
            if snapshot.done:
                break
            if snapshot.message_id is not None and all(r.id != snapshot.message_id for r in records):
                records = self._records(owner_id, conversation_id)
            stored = next((r for r in records if r.id == snapshot.message_id), None)
            yield PageView(messages=growing_reply(shown, stored, text=snapshot.text, waiting=snapshot.waiting),
                           busy=True)
        final = job.snapshot()
        view = self.open(owner_id, conversation_id)
        outcome = final.outcome if isinstance(final.outcome, ReplyOutcome) else ReplyOutcome()
        notice = outcome.notice or (Notice(final.notice) if final.notice else None)
        yield PageView(messages=view.messages, context=view.context, conversations=view.conversations,
                       busy=False, notice=notice or NO_NOTICE)

    def stop(self, owner_id: int | None, conversation_id: str | None) -> PageView:
        """Stop this conversation's reply within a token; the partial text is kept and marked."""
        if conversation_id and owner_id is not None:
            self.replies.cancel((owner_id, conversation_id))
        return PageView()

    # --- actions from inside the chat (edit, versions) ------------------------------------

    def page_action(self, owner_id: int | None, conversation_id: str | None, payload: str) -> PageView:
        """A click inside a message, sent by `assets/app.js` as a small JSON object."""
        action = _parse_action(payload)
        kind = action.get("action")
        message_id = action.get("message")
        if not isinstance(message_id, int) or not conversation_id or owner_id is None:
            return PageView()
        if kind == "switch":
            with self.storage.session() as s:
                records = db.switch_branch(s, owner_id=owner_id, conversation_id=conversation_id,
                                           message_id=message_id)
                stored = db.get_conversation(s, owner_id=owner_id, conversation_id=conversation_id).settings
            params = GenerationParams.clamped(**_stored_params(stored), limit=self.settings.max_new_tokens)
            use = self._context_use(records, params)
            return PageView(messages=self._show(records, use), notice=NO_NOTICE, context=meter_html(use))
        if kind == "edit":
            question = next((r for r in self._records(owner_id, conversation_id)
                             if r.id == message_id and r.role is db.Role.USER), None)
            if question is None:
                raise Refused("That question is no longer on this branch.", kind="warning")
            return PageView(editing=Editing(question.id, EDITING_LABEL), composer=question.text, notice=NO_NOTICE)
        return PageView()

    def cancel_edit(self, owner_id: int | None) -> PageView:
        return PageView(editing=None, composer="clear", notice=NO_NOTICE)

    # --- helpers ---------------------------------------------------------------------------

    def _start_reply(self, engine: Engine, owner_id: int, conversation_id: str, params: GenerationParams) -> None:
        work = on_gpu(reply_work(self.storage, engine, owner_id=owner_id, conversation_id=conversation_id,
                                 params=params), zero_gpu=self.settings.zero_gpu)
        try:
            self.replies.start((owner_id, conversation_id), work, notice_for=_job_failure)
        except ReplyAlreadyRunningError as e:
            raise Refused(str(e), kind="warning") from e

    def _conversations(self, owner_id: int | None, *, selected: str | None, query: str = "") -> ConversationList:
        if owner_id is None:
            return ConversationList([], None)
        with self.storage.session() as s:
            conversations = db.list_conversations(s, owner_id=owner_id, query=clean_text(query).strip() or None)
        return ConversationList(conversation_choices(conversations), selected)

    def _records(self, owner_id: int, conversation_id: str) -> list[db.MessageRecord]:
        with self.storage.session() as s:
            return db.list_messages(s, owner_id=owner_id, conversation_id=conversation_id)

    def _before_question(self, owner_id: int, conversation_id: str | None, editing: Editing | None
                         ) -> tuple[list[db.MessageRecord], db.MessageRecord | None]:
        """The messages the new question follows and, when editing, the question it replaces."""
        if not conversation_id:
            if editing is not None:
                raise Refused("Open the conversation of that question first.", kind="warning")
            return [], None
        records = self._records(owner_id, conversation_id)
        if editing is None:
            return records, None
        index = next((i for i, r in enumerate(records) if r.id == editing.message_id), None)
        if index is None:
            raise Refused("That question is no longer on this branch; cancel the edit and try again.",
                          kind="warning")
        return records[:index], records[index]

    def _check_fits(self, engine: Engine, records: list[Any], params: GenerationParams) -> None:
        """Refuse, before anything is stored, a question the model's window cannot hold.

        Only the prompt's length matters here, so every photo is stood in for by a blank one:
        no photo is decoded and the vision tower does not run.
        """
        try:
            engine.prepare(model_messages(records, photo=lambda _sha256: _PHOTO_STAND_IN),
                           max_new_tokens=params.max_new_tokens)
        except ContextOverflowError as e:
            raise Refused(f"{_sentence(str(e))} Your text is still in the box.") from e

    def _context_use(self, records: list[db.MessageRecord], params: GenerationParams) -> ContextUse | None:
        """How much of the window the conversation takes; None without a model or messages."""
        if not records or self.services.model.status().state is not ModelState.READY:
            return None
        engine = self.services.model.engine()
        asked = [*records, DraftQuestion(text="", image_sha256=None)] if records[-1].role is not db.Role.USER \
            else records
        try:
            prepared = engine.prepare(model_messages(asked, photo=lambda _sha256: _PHOTO_STAND_IN),
                                      max_new_tokens=params.max_new_tokens)
        except ContextOverflowError:
            return None
        return ContextUse.of(prepared, context_length=engine.context_length, image_tokens=engine.image_tokens)

    def _engine(self) -> Engine:
        try:
            return self.services.model.engine()
        except ModelNotReadyError as e:
            raise Refused(str(e), kind="warning") from e

    def _params(self, temperature: Any, top_p: Any, max_new_tokens: Any) -> GenerationParams:
        return GenerationParams.clamped(temperature, top_p, max_new_tokens, limit=self.settings.max_new_tokens)

    def _default_params(self) -> GenerationParams:
        return GenerationParams(max_new_tokens=min(DEFAULT_MAX_NEW_TOKENS, self.settings.max_new_tokens))

    def _show(self, records: list[db.MessageRecord], use: ContextUse | None = None) -> list[dict]:
        return chatbot_messages(records, image_file=self._image_file,
                                unseen_turns=use.dropped_turns if use is not None else 0)

    def _image_file(self, sha256: str) -> Path | None:
        try:
            return db.image_path(self.storage, sha256)
        except db.ImageNotFoundError:
            return None


def _stored_params(stored: dict[str, Any]) -> dict[str, Any]:
    return {"temperature": stored.get("temperature"), "top_p": stored.get("top_p"),
            "max_new_tokens": stored.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)}


def _job_failure(error: BaseException) -> str:
    if isinstance(error, db.StorageError):
        return str(error)
    return UNEXPECTED_FAILURE


def _parse_action(payload: str) -> dict[str, Any]:
    if not isinstance(payload, str) or len(payload) > MAX_ACTION_CHARS:
        return {}
    try:
        action = json.loads(payload)
    except ValueError:
        return {}
    return action if isinstance(action, dict) else {}


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
