"""The page: layout and event wiring. Handlers live in `app.handlers`; this file only connects."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from app.events import owned, owned_stream
from app.gpu import on_gpu
from app.handlers import Handlers
from app.model_slot import ModelState
from app.services import Services

ASSETS = Path(__file__).resolve().parent.parent / "assets"
EXAMPLES = [
    ("chelsea.jpg", "What animal is this, and what is it doing?"),
    ("coffee.jpg", "Describe this photo in two sentences."),
    ("astronaut.jpg", "Who might this person be? What clues are in the picture?"),
    ("rocket.jpg", "What is happening in this picture?"),
]
SEND_WAITING = {ModelState.LOADING: "Send (model loading…)", ModelState.FAILED: "Send (no model)"}

CSS = """
.reply-footer { font-size: 0.75em; opacity: 0.65; }
#model-status { padding: 0.5em 1em; border-radius: 8px; background: var(--color-accent-soft); }
#model-status.failed { background: var(--error-background-fill); }
#conversation-list label { width: 100%; }
#chatbot .message-content :is(ul, ol) { padding-inline-start: 1.5em; margin: 0 0 var(--spacing-md); }
#chatbot .message-content blockquote { border-inline-start: 3px solid var(--border-color-primary);
  padding-inline-start: var(--size-2); margin: 0 0 var(--spacing-md); }
"""


def build_app(services: Services) -> gr.Blocks:
    """The whole UI bound to `services`. Building it loads nothing and starts nothing."""
    h = Handlers(services)
    settings = services.settings
    reply = on_gpu(h.reply, zero_gpu=settings.zero_gpu)

    with gr.Blocks(title="Mipha Chat", fill_height=True) as demo:
        conversation = gr.State(None)

        with gr.Sidebar(label="Conversations", width=300):
            new_chat_btn = gr.Button("+ New chat", elem_id="new-chat-button", variant="primary")
            search = gr.Textbox(placeholder="Search conversations", show_label=False, elem_id="search-box",
                                submit_btn=False)
            conversations = gr.Radio(choices=[], label="Your conversations", elem_id="conversation-list")
            with gr.Accordion("Rename or delete", open=False, elem_id="manage-conversation"):
                title = gr.Textbox(label="Title", elem_id="rename-box", max_lines=1)
                rename_btn = gr.Button("Rename", size="sm", elem_id="rename-button")
                delete_btn = gr.Button("Delete conversation", size="sm", variant="stop", elem_id="delete-button")
                with gr.Row(visible=False) as confirm_row:
                    confirm_btn = gr.Button("Yes, delete it", size="sm", variant="stop", elem_id="confirm-delete")
                    cancel_btn = gr.Button("Keep it", size="sm", elem_id="cancel-delete")
            if settings.oauth_enabled:
                gr.LoginButton()

        status = gr.Markdown(_status_text(services), elem_id="model-status",
                             visible=services.model.status().state is not ModelState.READY)
        chatbot = gr.Chatbot(elem_id="chatbot", label="Mipha", show_label=False, scale=1, height=None,
                             min_height=360, render_markdown=False, sanitize_html=True, allow_tags=False,
                             latex_delimiters=[], buttons=["copy"], feedback_options=None,
                             placeholder="**Drop a photo and ask about it.**")
        chat_input = gr.MultimodalTextbox(
            elem_id="chat-input", file_types=["image"], file_count="single", sources=["upload"],
            placeholder="Ask about your photo… (drop, paste or attach an image)", show_label=False,
            submit_btn=False, max_plain_text_length=settings.max_message_chars, autofocus=True,
            interactive=False)  # enabled by the page load, once the browser's identity is known
        with gr.Row():
            send_btn = gr.Button("Send", variant="primary", elem_id="send-button", scale=2,
                                 interactive=False)  # enabled by the page load once the model is ready
            stop_btn = gr.Button("Stop", variant="stop", elem_id="stop-button", interactive=False)
            regenerate_btn = gr.Button("Regenerate", elem_id="regenerate-button")
        with gr.Accordion("Generation settings", open=False, elem_id="generation-settings"):
            temperature = gr.Slider(0.0, 2.0, value=0.2, step=0.05, label="Temperature",
                                    info="0 always picks the likeliest word; higher is more varied")
            top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p")
            max_new_tokens = gr.Slider(min(16, settings.max_new_tokens), settings.max_new_tokens,
                                       value=min(512, settings.max_new_tokens), step=16,
                                       label="Max new tokens")
        gr.Examples(examples=[{"text": q, "files": [str(ASSETS / f)]} for f, q in EXAMPLES if (ASSETS / f).exists()],
                    inputs=chat_input, label="Try an example", cache_examples=False)
        timer = gr.Timer(1.0, active=services.model.status().state is ModelState.LOADING)

        params = [temperature, top_p, max_new_tokens]
        opened = [conversation, chatbot, temperature, top_p, max_new_tokens, title]
        locked = [chat_input, send_btn, stop_btn, regenerate_btn]

        def resolve(secret_value: str | None, username: str | None, oauth_username: str | None) -> int | None:
            return h.owner(secret_value, username=username, oauth_username=oauth_username)

        def on(handler):  # an event whose first input is the browser identity; see app.events
            return owned(resolve, handler)

        # page load: the sidebar of whoever the request proves to be
        def on_load(owner_id):
            return (h.conversation_list(owner_id), *h.new_chat(), *_status_updates(services),
                    gr.update(interactive=owner_id is not None))

        demo.load(on(on_load), None, [conversations, *opened, status, timer, send_btn, chat_input], api_name=False)
        timer.tick(lambda: _status_updates(services), None, [status, timer, send_btn], api_name=False,
                   show_progress="hidden", queue=False)

        # sidebar
        new_chat_btn.click(h.new_chat, None, opened, api_name=False, queue=False).then(
            on(h.conversation_list), None, [conversations], api_name=False)
        conversations.input(on(h.open_conversation), [conversations], opened, api_name=False)
        search.change(on(h.conversation_list), [search, conversation], [conversations], api_name=False,
                      show_progress="hidden", trigger_mode="always_last")
        rename_btn.click(on(h.rename), [conversation, title], None, api_name=False).success(
            on(h.conversation_list), [search, conversation], [conversations], api_name=False)
        delete_btn.click(lambda c: gr.update(visible=bool(c)), [conversation], [confirm_row], api_name=False,
                         queue=False)
        cancel_btn.click(lambda: gr.update(visible=False), None, [confirm_row], api_name=False, queue=False)
        confirm_btn.click(on(h.delete), [conversation], None, api_name=False).success(
            h.new_chat, None, opened, api_name=False).then(
            on(lambda o, q: (h.conversation_list(o, q), gr.update(visible=False))), [search],
            [conversations, confirm_row], api_name=False)
        for slider in params:
            slider.release(on(h.remember_settings), [conversation, *params], None, api_name=False,
                           show_progress="hidden")

        # chat: store the question, lock the input, stream the reply, unlock
        def ask(owner_id, message, conversation_id, *values):
            conversation_id, shown = h.submit(owner_id, message, conversation_id, *values)
            return conversation_id, shown, *_lock(services, busy=True)

        def finish(owner_id, query, conversation_id):
            return h.conversation_list(owner_id, query, conversation_id), *_lock(services, busy=False)

        for trigger in (chat_input.submit, send_btn.click):
            trigger(on(ask), [chat_input, conversation, *params], [conversation, chatbot, *locked],
                    api_name=False, concurrency_limit=None, show_progress="hidden").success(
                owned_stream(resolve, reply), [conversation, *params], [chatbot], api_name=False,
                concurrency_id="generate", show_progress="minimal").then(
                on(finish), [search, conversation], [conversations, *locked], api_name=False)
        regenerate_btn.click(on(lambda o, c: (h.prepare_regenerate(o, c), *_lock(services, busy=True))),
                             [conversation], [chatbot, *locked], api_name=False,
                             concurrency_limit=None).success(
            owned_stream(resolve, reply), [conversation, *params], [chatbot], api_name=False,
            concurrency_id="generate", show_progress="minimal").then(
            on(finish), [search, conversation], [conversations, *locked], api_name=False)
        chatbot.clear(h.new_chat, None, opened, api_name=False, queue=False)  # the chatbot's trash icon
        stop_btn.click(on(h.stop), [conversation], None, api_name=False, queue=False)

    demo.queue(default_concurrency_limit=settings.concurrency)
    return demo


def _lock(services: Services, *, busy: bool) -> tuple[dict, ...]:
    """Input, Send, Stop, Regenerate while a reply streams (busy) and after.

    Send comes back only when the model is ready; the banner says why it is not.
    """
    ready = services.model.status().state is ModelState.READY
    return (
        gr.update(value=None, interactive=not busy) if busy else gr.update(interactive=True),
        gr.update(interactive=not busy and ready),
        gr.update(interactive=busy),
        gr.update(interactive=not busy and ready),
    )


def _status_text(services: Services) -> str:
    status = services.model.status()
    if status.state is ModelState.LOADING:
        return f"⏳ **Loading the model** — {status.message} You can look around; Send is enabled once it is ready."
    if status.state is ModelState.FAILED:
        cause = status.message if services.settings.is_local_only else (
            "The person running this server can see why in its log.")
        return f"⚠️ **The model could not be loaded, so the chat cannot answer.** {cause}"
    return f"✅ {status.message}"


def _status_updates(services: Services) -> tuple[dict, dict, dict]:
    """The banner, the timer that refreshes it while loading, and Send (only with a model)."""
    state = services.model.status().state
    banner = gr.update(value=_status_text(services), visible=state is not ModelState.READY,
                       elem_classes=["failed"] if state is ModelState.FAILED else [])
    send = gr.update(interactive=state is ModelState.READY,
                     value="Send" if state is ModelState.READY else SEND_WAITING[state])
    return banner, gr.Timer(active=state is ModelState.LOADING), send
