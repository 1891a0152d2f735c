"""One function from a `PageView` to component updates: the only place the page's state meets Gradio."""

from __future__ import annotations

import html
import itertools
from dataclasses import dataclass
from typing import Any

import gradio as gr

from app.model_slot import ModelSlot, ModelState, ModelStatus
from app.page_view import KEEP, Notice, PageView
from app.settings import Settings
from app.ui.regions import (
    ChatRegion,
    ComposerRegion,
    HiddenState,
    SettingsRegion,
    SidebarRegion,
)

SEND_LABELS = {ModelState.LOADING: "Send (model loading…)", ModelState.FAILED: "Send (no model)"}
BUSY_LABEL = "Send (reply in progress…)"


@dataclass(frozen=True)
class Page:
    """Every region of the page, and how a `PageView` changes them."""

    sidebar: SidebarRegion
    params: SettingsRegion
    chat: ChatRegion
    composer: ComposerRegion
    state: HiddenState
    model: ModelSlot
    settings: Settings

    @property
    def outputs(self) -> list[gr.components.Component]:
        """Everything a `PageView` may change (an event lists these and updates those it names)."""
        s, c, k, h = self.sidebar, self.chat, self.composer, self.state
        return [h.conversation, h.editing, h.address, c.chatbot, c.context, s.title, *self.params.inputs,
                s.conversations, k.notice, k.input, k.editing_row, k.editing_label, k.send, k.stop, k.regenerate,
                s.share, s.unshare, s.share_link, s.download]

    def render(self, view: PageView) -> dict[gr.components.Component, Any] | Any:
        updates: dict[gr.components.Component, Any] = {}
        s, c, k, h = self.sidebar, self.chat, self.composer, self.state
        if view.conversation_id is not KEEP:
            updates[h.conversation] = view.conversation_id
            updates[h.address] = f"c:{view.conversation_id or ''}"  # "" until the server has answered once
        if view.messages is not KEEP:
            updates[c.chatbot] = view.messages
        if view.context is not KEEP:
            updates[c.context] = view.context
        if view.title is not KEEP:
            updates[s.title] = view.title
        if view.params is not KEEP:
            updates.update(zip(self.params.inputs, (view.params.temperature, view.params.top_p,
                                                    view.params.max_new_tokens), strict=True))
        if view.conversations is not KEEP:
            updates[s.conversations] = gr.update(choices=view.conversations.choices,
                                                 value=view.conversations.selected)
        if view.notice is not KEEP:
            updates[k.notice] = notice_html(view.notice)
        if view.composer is not KEEP:
            updates[k.input] = {"text": "" if view.composer == "clear" else view.composer, "files": []}
        if view.editing is not KEEP:
            updates[h.editing] = view.editing
            updates[k.editing_row] = gr.update(visible=view.editing is not None)
            updates[k.editing_label] = view.editing.label if view.editing is not None else ""
        if view.busy is not KEEP:
            updates.update(self.buttons(busy=view.busy))
        if view.conversation_id is None:  # a new chat has nothing to regenerate
            updates[k.regenerate] = gr.update(interactive=False)
        if view.share is not KEEP:
            updates.update(self._share(view.share.path))
        if view.download is not KEEP:
            updates[s.download] = gr.update(value=view.download, visible=view.download is not None)
        return updates or gr.skip()  # Gradio reads an empty dict as one missing value

    def buttons(self, *, busy: bool) -> dict[gr.components.Component, Any]:
        """Send (only with a model and no reply running, its label says why not), Stop, Regenerate."""
        state = self.model.status().state
        ready = state is ModelState.READY
        label = BUSY_LABEL if busy and ready else ("Send" if ready else SEND_LABELS[state])
        k = self.composer
        return {k.send: gr.update(interactive=ready and not busy, value=label),
                k.stop: gr.update(interactive=busy),
                k.regenerate: gr.update(interactive=ready and not busy)}

    def status(self) -> dict[gr.components.Component, Any]:
        """The model banner (hidden once ready), the line saying what runs the model (shown once
        ready) and Send; the timer that refreshes them runs while loading."""
        status = self.model.status()
        banner = gr.update(value=status_text(status.state, status.message, local=self.settings.is_local_only),
                           visible=status.state is not ModelState.READY,
                           elem_classes=["failed"] if status.state is ModelState.FAILED else [])
        line = runs_on_html(status)
        send = self.buttons(busy=False)[self.composer.send]
        return {self.chat.status: banner, self.composer.runs_on: gr.update(value=line, visible=bool(line)),
                self.composer.send: send}

    @property
    def status_outputs(self) -> list[gr.components.Component]:
        """What `status` updates, for the events that call it."""
        return [self.chat.status, self.composer.runs_on, self.composer.send]

    def _share(self, path: str | None) -> dict[gr.components.Component, Any]:
        s = self.sidebar
        link = "" if path is None else (
            f'<p class="share-link">Read-only link: <a href="{html.escape(path)}" target="_blank" '
            f'rel="noopener noreferrer">{html.escape(path)}</a> '
            '<button type="button" class="copy-share-link">Copy link</button></p>')
        return {s.share_link: link, s.share: gr.update(visible=path is None),
                s.unshare: gr.update(visible=path is not None)}


_notice_numbers = itertools.count(1)


def notice_html(notice: Notice) -> str:
    """The composer's notice: one sentence, escaped (its container is announced to screen readers).

    The page's script hides a notice once the person edits the text; a number in the class makes
    each notice new HTML, so the same sentence given again is drawn (and shown) again.
    """
    if not notice.text:
        return ""
    return f'<p class="notice {notice.kind} n-{next(_notice_numbers)}">{html.escape(notice.text)}</p>'


def runs_on_html(status: ModelStatus) -> str:
    """The line under the composer once the model is ready ("" before): its name and what runs it."""
    if status.runs_on is None:
        return ""
    return f'<p class="runs-on">Model: {html.escape(status.runs_on)}</p>'


def status_text(state: ModelState, message: str, *, local: bool) -> str:
    if state is ModelState.LOADING:
        return f"⏳ **Loading the model** — {message} You can look around; Send is enabled once it is ready."
    if state is ModelState.FAILED:
        cause = message if local else "The person running this server can see why in its log."
        return f"⚠️ **The model could not be loaded, so the chat cannot answer.** {cause}"
    return f"✅ {message}"
