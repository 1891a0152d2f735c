"""The page: layout and event wiring. Handlers live in `app.handlers`; this file only connects."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

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
BROWSER_STORAGE_KEY = "mipha-chat-identity"

CSS = """
.reply-footer { font-size: 0.75em; opacity: 0.65; }
#model-status { padding: 0.5em 1em; border-radius: 8px; background: var(--color-accent-soft); }
#model-status.failed { background: var(--error-background-fill); }
#conversation-list label { width: 100%; }
"""


def build_app(services: Services) -> gr.Blocks:
    """The whole UI bound to `services`. Building it loads nothing and starts nothing."""
    h = Handlers(services)
    settings = services.settings
    reply = on_gpu(h.reply, zero_gpu=settings.zero_gpu)

    with gr.Blocks(title="Mipha Chat", fill_height=True) as demo:
        secret = gr.BrowserState(None, storage_key=BROWSER_STORAGE_KEY, secret=services.browser_state_key)
        owner = gr.State(None)
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
                             min_height=360, sanitize_html=True, render_markdown=True, allow_tags=False,
                             buttons=["copy"], feedback_options=None,
                             placeholder="**Drop a photo and ask about it.**")
        chat_input = gr.MultimodalTextbox(
            elem_id="chat-input", file_types=["image"], file_count="single", sources=["upload"],
            placeholder="Ask about your photo… (drop, paste or attach an image)", show_label=False,
            submit_btn=False, max_plain_text_length=settings.max_message_chars, autofocus=True,
            interactive=False)  # enabled by the page load, once the browser's identity is known
        with gr.Row():
            send_btn = gr.Button("Send", variant="primary", elem_id="send-button", scale=2)
            stop_btn = gr.Button("Stop", variant="stop", elem_id="stop-button", interactive=False)
            regenerate_btn = gr.Button("Regenerate", elem_id="regenerate-button")
        with gr.Accordion("Generation settings", open=False, elem_id="generation-settings"):
            temperature = gr.Slider(0.0, 2.0, value=0.2, step=0.05, label="Temperature",
                                    info="0 always picks the likeliest word; higher is more varied")
            top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p")
            max_new_tokens = gr.Slider(16, settings.max_new_tokens, value=min(512, settings.max_new_tokens), step=16,
                                       label="Max new tokens")
        gr.Examples(examples=[{"text": q, "files": [str(ASSETS / f)]} for f, q in EXAMPLES if (ASSETS / f).exists()],
                    inputs=chat_input, label="Try an example", cache_examples=False)
        timer = gr.Timer(1.0, active=services.model.status().state is ModelState.LOADING)

        params = [temperature, top_p, max_new_tokens]
        opened = [conversation, chatbot, temperature, top_p, max_new_tokens, title]
        locked = [chat_input, send_btn, stop_btn, regenerate_btn]

        # page load: identity, then the sidebar
        def on_load(stored_secret, request: gr.Request, profile: gr.OAuthProfile | None):
            oauth_name = profile.username if profile is not None else None
            kept, owner_id = h.identify(stored_secret, username=request.username, oauth_username=oauth_name)
            return (kept, owner_id, h.conversation_list(owner_id), *h.new_chat(), *_status_updates(services),
                    gr.update(interactive=True))

        demo.load(on_load, [secret], [secret, owner, conversations, *opened, status, timer, chat_input], api_name=False)
        timer.tick(lambda: _status_updates(services), None, [status, timer], api_name=False, show_progress="hidden",
                   queue=False)

        # sidebar
        new_chat_btn.click(h.new_chat, None, opened, api_name=False, queue=False).then(
            lambda o: h.conversation_list(o), [owner], [conversations], api_name=False)
        conversations.input(h.open_conversation, [conversations, owner], opened, api_name=False)
        search.change(lambda o, q, c: h.conversation_list(o, q, selected=c), [owner, search, conversation],
                      [conversations], api_name=False, show_progress="hidden", trigger_mode="always_last")
        rename_btn.click(h.rename, [conversation, owner, title], None, api_name=False).success(
            lambda o, q, c: h.conversation_list(o, q, selected=c), [owner, search, conversation], [conversations],
            api_name=False)
        delete_btn.click(lambda c: gr.update(visible=bool(c)), [conversation], [confirm_row], api_name=False,
                         queue=False)
        cancel_btn.click(lambda: gr.update(visible=False), None, [confirm_row], api_name=False, queue=False)
        confirm_btn.click(h.delete, [conversation, owner], None, api_name=False).success(
            h.new_chat, None, opened, api_name=False).then(
            lambda o, q: (h.conversation_list(o, q), gr.update(visible=False)), [owner, search],
            [conversations, confirm_row], api_name=False)
        for slider in params:
            slider.release(h.remember_settings, [conversation, owner, *params], None, api_name=False,
                           show_progress="hidden")

        # chat: store the question, lock the input, stream the reply, unlock
        def ask(message, conversation_id, owner_id, *values):
            conversation_id, shown = h.submit(message, conversation_id, owner_id, *values)
            return conversation_id, shown, *_lock(True)

        def finish(owner_id, query, conversation_id):
            return h.conversation_list(owner_id, query, selected=conversation_id), *_lock(False)

        for trigger in (chat_input.submit, send_btn.click):
            trigger(ask, [chat_input, conversation, owner, *params], [conversation, chatbot, *locked],
                    api_name=False, concurrency_limit=None, show_progress="hidden").success(
                reply, [conversation, owner, *params], [chatbot], api_name=False, concurrency_id="generate",
                show_progress="minimal").then(
                finish, [owner, search, conversation], [conversations, *locked], api_name=False)
        regenerate_btn.click(lambda c, o: (h.prepare_regenerate(c, o), *_lock(True)), [conversation, owner],
                             [chatbot, *locked], api_name=False, concurrency_limit=None).success(
            reply, [conversation, owner, *params], [chatbot], api_name=False, concurrency_id="generate",
            show_progress="minimal").then(
            finish, [owner, search, conversation], [conversations, *locked], api_name=False)
        chatbot.clear(h.new_chat, None, opened, api_name=False, queue=False)  # the chatbot's trash icon
        stop_btn.click(h.stop, [conversation, owner], None, api_name=False, queue=False)

    demo.queue(default_concurrency_limit=settings.concurrency)
    return demo


def _lock(busy: bool) -> tuple[dict, ...]:
    """Input, Send, Stop, Regenerate while a reply streams (busy) and after."""
    return (
        gr.update(value=None, interactive=not busy) if busy else gr.update(interactive=True),
        gr.update(interactive=not busy),
        gr.update(interactive=busy),
        gr.update(interactive=not busy),
    )


def _status_text(services: Services) -> str:
    status = services.model.status()
    if status.state is ModelState.LOADING:
        return f"⏳ **Loading the model** — {status.message} You can look around; sending waits for it."
    if status.state is ModelState.FAILED:
        return f"⚠️ **The model could not be loaded.** {status.message}"
    return f"✅ {status.message}"


def _status_updates(services: Services) -> tuple[dict, dict]:
    state = services.model.status().state
    banner = gr.update(value=_status_text(services), visible=state is not ModelState.READY,
                       elem_classes=["failed"] if state is ModelState.FAILED else [])
    return banner, gr.Timer(active=state is ModelState.LOADING)
