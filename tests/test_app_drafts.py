"""The composer's question is read ahead while it is typed (`Handlers.draft`), on the tiny model
with its language model on llama.cpp and a real SQLite file: Send then reuses that reading, for
the person who typed it only, and a draft never shows or stores anything."""

from __future__ import annotations

import secrets
import time
from pathlib import Path

import pytest

import storage as db
from app.handlers import Handlers
from app.model_slot import ModelSlot
from app.services import Services
from app.settings import Settings
from mipha_core import load_engine
from mipha_core.llama_cpp_engine import LlamaCppEngine
from storage import StorageConfig, open_storage

ASSETS = Path(__file__).resolve().parent.parent / "assets"
PARAMS = (0.0, 1.0, 24)
PHOTO = {"path": str(ASSETS / "chelsea.jpg")}


@pytest.fixture(scope="module")
def llama_tiny(tmp_path_factory: pytest.TempPathFactory) -> LlamaCppEngine:
    engine = load_engine("tiny", device="cpu", quantization="8bit", runtime="llama.cpp",
                         data_dir=tmp_path_factory.mktemp("llama-models"))
    assert isinstance(engine, LlamaCppEngine)
    return engine


@pytest.fixture
def h(tmp_path: Path, llama_tiny: LlamaCppEngine):
    settings = Settings(model="tiny", data_dir=tmp_path, max_new_tokens=64, max_message_chars=500)
    storage = open_storage(StorageConfig(data_dir=tmp_path))
    services = Services(settings=settings, storage=storage, model=ModelSlot.ready(llama_tiny))
    yield Handlers(services)
    services.replies.close()
    storage.close()


def visitor(h: Handlers) -> int:
    return h.owner(secrets.token_urlsafe(32), username=None, oauth_username=None)


def type_(h: Handlers, owner: int, text: str, *, files=(), conversation: str | None = None) -> None:
    assert h.draft(owner, {"text": text, "files": list(files)}, conversation, None, *PARAMS) is None


def read_ahead(engine: LlamaCppEngine, positions: int) -> None:
    deadline = time.monotonic() + 30
    while engine.context.length < positions:
        assert time.monotonic() < deadline, "the draft was not read ahead"
        time.sleep(0.01)
    time.sleep(0.05)


def ask(h: Handlers, owner: int, text: str, *, files=(), conversation: str | None = None) -> db.MessageRecord:
    sent = h.send(owner, {"text": text, "files": list(files)}, conversation, None, *PARAMS)
    list(h.attach(owner, sent.conversation_id, new_reply=True))
    with h.storage.session() as s:
        return db.list_messages(s, owner_id=owner, conversation_id=sent.conversation_id)[-1]


def test_a_photo_and_words_typed_in_a_new_chat_are_read_before_send(h, llama_tiny):
    owner = visitor(h)
    type_(h, owner, "What is in", files=[PHOTO])
    read_ahead(llama_tiny, llama_tiny.image_tokens)
    reply = ask(h, owner, "What is in this photo?", files=[PHOTO])
    assert reply.status is db.MessageStatus.COMPLETE
    assert reply.reused_tokens > llama_tiny.image_tokens
    assert reply.prompt_tokens - reply.reused_tokens <= 6  # " this photo?" and " ASSISTANT:"
    assert ASSETS.joinpath("chelsea.jpg").is_file()  # a draft leaves the upload for Send


def test_a_follow_up_is_read_as_it_is_typed(h, llama_tiny):
    owner = visitor(h)
    first = ask(h, owner, "What is in this photo?", files=[PHOTO])
    type_(h, owner, "And what colour is the", conversation=first.conversation_id)
    time.sleep(0.5)
    follow_up = ask(h, owner, "And what colour is the cat?", conversation=first.conversation_id)
    assert follow_up.prompt_tokens - follow_up.reused_tokens <= 6


def test_someone_elses_draft_is_never_used_and_their_conversation_never_read(h, llama_tiny):
    ann, bob = visitor(h), visitor(h)
    type_(h, ann, "What is in", files=[PHOTO])
    read_ahead(llama_tiny, llama_tiny.image_tokens)
    bobs = ask(h, bob, "What is in this photo?", files=[PHOTO])
    assert bobs.reused_tokens == len(llama_tiny.shared_opening_ids)  # Mipha's system sentence, nothing of ann's
    held = llama_tiny.context.length
    type_(h, ann, "Tell me what you said", conversation=bobs.conversation_id)
    time.sleep(0.3)
    assert llama_tiny.context.length == held  # bob's conversation is not ann's to read


@pytest.mark.parametrize("message", [
    {"text": "x" * 501, "files": []},
    {"text": "two photos", "files": [PHOTO, PHOTO]},
    {"text": "not a photo", "files": [{"path": str(ASSETS / "app.js")}]},
    {"text": "gone", "files": [{"path": "/nonexistent/upload.jpg"}]},
    {"text": "endless", "files": [{"path": "/dev/zero"}]},
    None,
])
def test_a_draft_send_would_refuse_is_not_read_and_shows_nothing(h, llama_tiny, message):
    owner = visitor(h)
    before = llama_tiny.context.length
    assert h.draft(owner, message, None, None, *PARAMS) is None
    time.sleep(0.2)
    assert llama_tiny.context.length == before
