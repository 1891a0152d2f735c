"""`build_app`: the regions laid out, then every event connected to its handler.

Every event that reads or writes someone's data goes through `app.events.owned` (the owner comes
from the request) and returns a `PageView`, rendered by `Page.render` into the outputs it names.
A reply is a server-side job: Send and Regenerate start it, `attach` follows it, and so does
every page load and conversation switch, so a reload picks a running reply up again.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import gradio as gr

from app.events import owned, owned_stream
from app.handlers import Handlers
from app.library import Library
from app.model_slot import ModelState
from app.services import Services
from app.ui import regions
from app.ui.assets import EXAMPLES, example_messages
from app.ui.page import Page, runs_on_html, status_text

ATTACH_LIMIT = 24
"""Pages following replies at once. Each holds one of the 40 threads Gradio runs events on while
it waits on its job, so the rest stay free for sending, opening and searching; a page beyond the
limit waits in the queue and then gets the reply as far as it has come."""


DRAFT_LIMIT = 2
"""Composers handled at once while people type: each event only cleans a new photo (under a second)
and hands the draft to the engine, which reads one draft at a time and always after replies."""


def build_app(services: Services) -> gr.Blocks:
    """The whole UI bound to `services`. Building it loads nothing and starts nothing."""
    h = Handlers(services)
    library = Library(services, open=h.open)
    settings = services.settings
    model_status = services.model.status()

    with gr.Blocks(title="Mipha Chat", fill_height=True) as demo:
        state = regions.hidden_state()
        sidebar = regions.sidebar(settings)
        chat = regions.chat(status_text(model_status.state, model_status.message, local=settings.is_local_only),
                            status_visible=model_status.state is not ModelState.READY)
        composer = regions.composer(settings, runs_on=runs_on_html(model_status))
        params = regions.generation_settings(settings)
        timer = gr.Timer(1.0, active=model_status.state is ModelState.LOADING)
        page = Page(sidebar, params, chat, composer, state, services.model, settings)
        _connect(demo, page, h, library, timer)

    demo.queue(default_concurrency_limit=settings.concurrency)
    return demo


def _connect(demo: gr.Blocks, page: Page, h: Handlers, library: Library, timer: gr.Timer) -> None:
    s, c, k, st = page.sidebar, page.chat, page.composer, page.state
    outputs = page.outputs
    params = page.params.inputs

    def resolve(secret: str | None, username: str | None, oauth_username: str | None) -> int | None:
        return h.owner(secret, username=username, oauth_username=oauth_username)

    def on(handler: Callable[..., Any]) -> Callable[..., Any]:
        return owned(resolve, handler, render=page.render)

    followers: list[Any] = []

    def then_attach(event: Any, *, new_reply: bool = False) -> Any:
        """Follow the open conversation's reply: the one just asked for, or one still running
        (after a reload, a switch or back/forward)."""
        attach = owned_stream(resolve, functools.partial(h.attach, new_reply=new_reply), render=page.render)
        follower = event.then(attach, [st.conversation], outputs, api_name=False, show_progress="hidden",
                              concurrency_id="attach", concurrency_limit=ATTACH_LIMIT)
        followers.append(follower)
        return follower

    def address_of(request: gr.Request) -> str:
        return request.query_params.get("c", "") if request is not None else ""

    # page load: the address's conversation (or a new chat), the model banner and line, and the composer
    loaded = demo.load(address_of, None, [st.address], api_name=False, show_progress="hidden").then(
        on(h.load), [st.address], outputs, api_name=False, show_progress="hidden")
    then_attach(loaded)
    demo.load(page.status, None, page.status_outputs, api_name=False, queue=False, show_progress="hidden")
    timer.tick(lambda: {**page.status(), timer: gr.Timer(active=_loading(page))}, None,
               [*page.status_outputs, timer], api_name=False, show_progress="hidden", queue=False)

    # sidebar: open, new, search, rename, delete, share, export, import
    opened = s.conversations.input(on(h.open), [s.conversations], outputs, api_name=False)
    then_attach(opened)
    s.new_chat.click(on(lambda owner_id: h.new_chat(owner_id)), None, outputs, api_name=False)
    s.search.change(on(h.search), [s.search, st.conversation], outputs, api_name=False, show_progress="hidden",
                    trigger_mode="always_last")
    s.rename.click(on(h.rename), [st.conversation, s.title, s.search], outputs, api_name=False)
    s.delete.click(lambda conversation: gr.update(visible=bool(conversation)), [st.conversation], [s.confirm_row],
                   api_name=False, queue=False)
    s.keep.click(lambda: gr.update(visible=False), None, [s.confirm_row], api_name=False, queue=False)
    s.confirm_delete.click(on(h.delete), [st.conversation], outputs, api_name=False).then(
        lambda: gr.update(visible=False), None, [s.confirm_row], api_name=False, queue=False)
    s.share.click(on(library.share), [st.conversation], outputs, api_name=False)
    s.unshare.click(on(library.unshare), [st.conversation], outputs, api_name=False)
    s.export_markdown.click(on(lambda o, conv: library.export(o, conv, "markdown")), [st.conversation], outputs,
                            api_name=False)
    s.export_json.click(on(lambda o, conv: library.export(o, conv, "json")), [st.conversation], outputs, api_name=False)
    s.export_all.click(on(library.export_everything), None, outputs, api_name=False)
    s.import_files.upload(on(library.import_), [s.import_files], outputs, api_name=False)
    for slider in params:
        slider.release(on(h.remember_settings), [st.conversation, *params], outputs, api_name=False,
                       show_progress="hidden")

    # chat: read the question ahead while it is typed (`change`: Gradio 6's MultimodalTextbox never
    # sends `input`); store it and start its reply on the server, then follow the reply
    k.input.change(owned(resolve, h.draft, render=lambda _view: None),
                  [k.input, st.conversation, st.editing, *params], None, api_name=False, show_progress="hidden",
                  trigger_mode="always_last", concurrency_id="draft", concurrency_limit=DRAFT_LIMIT)
    for trigger in (k.input.submit, k.send.click):
        sent = trigger(on(h.send), [k.input, st.conversation, st.editing, *params], outputs, api_name=False,
                       show_progress="hidden", concurrency_limit=None)
        then_attach(sent, new_reply=True)
    then_attach(k.regenerate.click(on(h.regenerate), [st.conversation, *params], outputs, api_name=False,
                                   concurrency_limit=None), new_reply=True)
    k.stop.click(on(h.stop), [st.conversation], outputs, api_name=False, queue=False)
    k.cancel_edit.click(on(h.cancel_edit), None, outputs, api_name=False, queue=False)
    c.chatbot.example_select(_example, None, [k.input], api_name=False, queue=False)

    # clicks inside messages (edit, versions) and back/forward, sent by assets/app.js
    st.action.change(on(h.page_action), [st.conversation, st.action], outputs, api_name=False)
    then_attach(st.navigation.change(on(h.load), [st.navigation], outputs, api_name=False))

    # leaving a conversation stops following its reply (the reply itself goes on, on the server)
    for leave in (s.conversations.input, s.new_chat.click, st.navigation.change,
                  s.confirm_delete.click,
                  s.import_files.upload):
        leave(None, None, None, cancels=followers, api_name=False, queue=False)


def _example(selected: gr.SelectData) -> dict:
    """The chosen example into the composer: found by its index, never by a path the browser sends."""
    examples = example_messages()
    index = selected.index if isinstance(selected.index, int) else -1
    if not 0 <= index < len(examples) or len(examples) != len(EXAMPLES):
        return gr.update()
    return examples[index]


def _loading(page: Page) -> bool:
    return page.model.status().state is ModelState.LOADING
