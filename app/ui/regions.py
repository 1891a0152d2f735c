"""The page's regions, each built by one small function inside the `gr.Blocks` context.

Stable `elem_id`s (tests and `assets/app.js` find things by them): chat-input, send-button,
stop-button, regenerate-button, new-chat-button, conversation-list, chatbot, search-box, model-runs-on.
"""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from app.settings import Settings
from app.ui.assets import example_messages
from mipha_core import TEMPERATURE_RANGE, TOP_P_RANGE


@dataclass(frozen=True)
class SidebarRegion:
    new_chat: gr.Button
    search: gr.Textbox
    conversations: gr.Radio
    title: gr.Textbox
    rename: gr.Button
    delete: gr.Button
    confirm_row: gr.Row
    confirm_delete: gr.Button
    keep: gr.Button
    share: gr.Button
    unshare: gr.Button
    share_link: gr.Markdown
    export_markdown: gr.Button
    export_json: gr.Button
    export_all: gr.Button
    download: gr.File
    import_files: gr.UploadButton


@dataclass(frozen=True)
class SettingsRegion:
    temperature: gr.Slider
    top_p: gr.Slider
    max_new_tokens: gr.Slider

    @property
    def inputs(self) -> list[gr.Slider]:
        return [self.temperature, self.top_p, self.max_new_tokens]


@dataclass(frozen=True)
class ChatRegion:
    status: gr.Markdown
    chatbot: gr.Chatbot
    context: gr.Markdown


@dataclass(frozen=True)
class ComposerRegion:
    notice: gr.Markdown
    editing_row: gr.Row
    editing_label: gr.Markdown
    cancel_edit: gr.Button
    input: gr.MultimodalTextbox
    send: gr.Button
    stop: gr.Button
    regenerate: gr.Button
    runs_on: gr.Markdown
    """The muted line under the buttons, once the model is ready: its name and what runs it."""


@dataclass(frozen=True)
class HiddenState:
    """What the page remembers between events, and the fields `assets/app.js` talks through."""

    conversation: gr.State
    editing: gr.State
    address: gr.Textbox
    """"c:" and the open conversation's id; the script mirrors it into the address bar (`?c=`)."""
    action: gr.Textbox
    """Clicks inside messages (edit, versions), written here by the script as JSON."""
    navigation: gr.Textbox
    """Back/forward: the conversation id from the address, written here by the script."""


def sidebar(settings: Settings) -> SidebarRegion:
    with gr.Sidebar(label="Conversations", width=300, elem_id="sidebar"):
        new_chat = gr.Button("+ New chat", elem_id="new-chat-button", variant="primary")
        search = gr.Textbox(placeholder="Search conversations", show_label=False, elem_id="search-box",
                            submit_btn=False, max_lines=1)
        conversations = gr.Radio(choices=[], label="Your conversations", elem_id="conversation-list")
        with gr.Accordion("This conversation", open=False, elem_id="manage-conversation"):
            title = gr.Textbox(label="Title", elem_id="rename-box", max_lines=1)
            rename = gr.Button("Rename", size="sm", elem_id="rename-button")
            share = gr.Button("Share a read-only link", size="sm", elem_id="share-button")
            share_link = gr.Markdown("", elem_id="share-link")
            unshare = gr.Button("Turn the link off", size="sm", elem_id="unshare-button", visible=False)
            with gr.Row():
                export_markdown = gr.Button("Export Markdown", size="sm", elem_id="export-markdown")
                export_json = gr.Button("Export JSON", size="sm", elem_id="export-json")
            delete = gr.Button("Delete conversation", size="sm", variant="stop", elem_id="delete-button")
            with gr.Row(visible=False) as confirm_row:
                confirm_delete = gr.Button("Yes, delete it", size="sm", variant="stop", elem_id="confirm-delete")
                keep = gr.Button("Keep it", size="sm", elem_id="cancel-delete")
        with gr.Accordion("All conversations", open=False, elem_id="all-conversations"):
            export_all = gr.Button("Export all (zip)", size="sm", elem_id="export-all")
            import_files = gr.UploadButton("Import…", size="sm", elem_id="import-button", file_count="multiple",
                                           file_types=[".json", ".zip"])
        download = gr.File(label="Your export", visible=False, interactive=False, elem_id="export-file")
        if settings.oauth_enabled:
            gr.LoginButton()
    return SidebarRegion(new_chat, search, conversations, title, rename, delete, confirm_row, confirm_delete, keep,
                         share, unshare, share_link, export_markdown, export_json, export_all, download,
                         import_files)


def generation_settings(settings: Settings) -> SettingsRegion:
    with gr.Accordion("Generation settings", open=False, elem_id="generation-settings"):
        temperature = gr.Slider(*TEMPERATURE_RANGE, value=0.2, step=0.05, label="Temperature",
                                info="0 always picks the likeliest word; higher is more varied")
        top_p = gr.Slider(*TOP_P_RANGE, value=1.0, step=0.05, label="Top-p")
        limit = settings.max_new_tokens
        max_new_tokens = gr.Slider(1 if limit <= 16 else 16, max(limit, 2), value=min(512, limit),
                                   step=1 if limit <= 16 else 16, label="Max new tokens")
    return SettingsRegion(temperature, top_p, max_new_tokens)


def chat(status_text: str, *, status_visible: bool) -> ChatRegion:
    with gr.Row(elem_id="page-header"):
        gr.Markdown('<h1 class="app-title">Mipha Chat</h1>'
                '<button type="button" id="theme-toggle" class="theme-toggle" aria-pressed="false">'
                'Dark mode</button>', elem_id="header-bar")
    status = gr.Markdown(status_text, elem_id="model-status", visible=status_visible)
    chatbot = gr.Chatbot(elem_id="chatbot", label="Mipha", show_label=False, scale=1, height=None, min_height=200,
                         render_markdown=False, sanitize_html=True, allow_tags=False, latex_delimiters=[],
                         buttons=["copy"], feedback_options=None, allow_file_downloads=False, autoscroll=True,
                         placeholder="**Drop a photo and ask about it.**", examples=example_messages())
    context = gr.Markdown("", elem_id="context-meter")
    return ChatRegion(status, chatbot, context)


def composer(settings: Settings, *, runs_on: str) -> ComposerRegion:
    """The composer; `runs_on` is the first value of the line saying what runs the model ("" hides it)."""
    with gr.Column(elem_id="composer"):
        notice = gr.Markdown("", elem_id="composer-notice")
        with gr.Row(visible=False, elem_id="editing-bar") as editing_row:
            editing_label = gr.Markdown("")
            cancel_edit = gr.Button("Cancel edit", size="sm", elem_id="cancel-edit", scale=0)
        text = gr.MultimodalTextbox(
            # any file: one that is not a photo gets a notice by the composer, not the browser's toast
            elem_id="chat-input", file_types=None, file_count="single", sources=["upload"],
            placeholder="Ask about your photo… (drop, paste or attach an image)", show_label=False,
            submit_btn=False, autofocus=True, lines=1, max_lines=8,
            # longer pastes would turn into a text attachment; the length limit is shown by the counter instead
            max_plain_text_length=settings.max_message_chars * 50)
        gr.Markdown(f'<p id="char-counter" class="char-counter max-{settings.max_message_chars}"></p>',
                    elem_id="char-counter-box")
        with gr.Row(elem_id="composer-buttons"):
            send = gr.Button("Send", variant="primary", elem_id="send-button", scale=2, interactive=False)
            stop = gr.Button("Stop", variant="stop", elem_id="stop-button", interactive=False)
            regenerate = gr.Button("Regenerate", elem_id="regenerate-button", interactive=False)
        runs_on_line = gr.Markdown(runs_on, elem_id="model-runs-on", visible=bool(runs_on))
    return ComposerRegion(notice, editing_row, editing_label, cancel_edit, text, send, stop, regenerate, runs_on_line)


def hidden_state() -> HiddenState:
    return HiddenState(
        conversation=gr.State(None), editing=gr.State(None),
        address=gr.Textbox("", visible="hidden", elem_id="conversation-address", label="Conversation address"),
        action=gr.Textbox("", visible="hidden", elem_id="page-action", label="Page action"),
        navigation=gr.Textbox("", visible="hidden", elem_id="page-navigation", label="Page navigation"))
