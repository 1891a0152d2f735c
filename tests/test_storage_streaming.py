"""Replies persisted while they stream, crash recovery, concurrent writers."""

from __future__ import annotations

import threading

import pytest

import storage as st
from tests.storage_helpers import Configure, ask, make_conversation, make_user, reply_child

pytest_plugins = ("tests.storage_fixtures",)  # the backend, data_dir, storage_config and storage fixtures


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def stored_reply(storage: st.Storage, user: st.UserRecord, message_id: int, conversation_id: str) -> st.MessageRecord:
    with storage.session() as session:
        messages = st.list_messages(session, owner_id=user.id, conversation_id=conversation_id)
    return next(m for m in messages if m.id == message_id)


def test_reply_is_written_at_most_every_interval_or_token_batch(storage: st.Storage) -> None:
    user = make_user(storage, "ana")
    conversation = make_conversation(storage, user)
    ask(storage, user, conversation)
    clock = FakeClock()
    writer = st.ReplyWriter.start(
        storage, owner_id=user.id, conversation_id=conversation.id, min_interval_s=1.0, max_pending_tokens=5, clock=clock
    )
    assert writer.message.status is st.MessageStatus.PARTIAL and writer.message.text == ""

    def stored() -> str:
        return stored_reply(storage, user, writer.message.id, conversation.id).text

    for token in "a b c d".split():
        writer.append(token)
    assert stored() == ""  # 4 tokens within the second: nothing written yet
    clock.now += 1.0
    writer.append("e")
    assert stored() == "abcde"  # a second passed
    for token in "fghij":
        writer.append(token)
    assert stored() == "abcdefghij"  # 5 pending tokens
    clock.now += 0.5
    final = writer.finish(finish_reason="stop", prompt_tokens=7)
    assert final.status is st.MessageStatus.COMPLETE and final.text == "abcdefghij"
    assert (final.finish_reason, final.prompt_tokens, final.completion_tokens) == ("stop", 7, 10)
    assert final.duration_seconds == pytest.approx(1.5) and final.first_token_seconds == pytest.approx(0.0)
    assert stored_reply(storage, user, final.id, conversation.id) == final
    with pytest.raises(st.InvalidInputError):
        writer.append("late")


@pytest.mark.parametrize(
    ("error", "status"),
    [(GeneratorExit, st.MessageStatus.CANCELLED), (RuntimeError, st.MessageStatus.ERROR)],
)
def test_a_reply_left_by_an_exception_is_marked(storage: st.Storage, error: type[BaseException], status) -> None:
    user = make_user(storage, "ana")
    conversation = make_conversation(storage, user)
    ask(storage, user, conversation)
    with pytest.raises(error), st.ReplyWriter.start(storage, owner_id=user.id, conversation_id=conversation.id) as writer:
        writer.append("half a thou")
        raise error()
    reply = stored_reply(storage, user, writer.message.id, conversation.id)
    assert (reply.status, reply.text) == (status, "half a thou")


def test_a_reply_that_grows_past_the_limit_is_stopped(storage_config: Configure) -> None:
    opened = st.open_storage(storage_config(limits=st.StorageLimits(max_message_chars=10)))
    user = make_user(opened, "ana")
    conversation = make_conversation(opened, user)
    ask(opened, user, conversation, "Why?")
    with pytest.raises(st.LimitExceededError), st.ReplyWriter.start(
        opened, owner_id=user.id, conversation_id=conversation.id
    ) as writer:
        writer.append("0123456789")
        writer.append("!")
    reply = stored_reply(opened, user, writer.message.id, conversation.id)
    assert (reply.status, reply.text) == (st.MessageStatus.ERROR, "0123456789")
    opened.close()


@pytest.mark.timeout(60)
def test_reply_killed_with_sigkill_is_shown_as_interrupted_after_restart(storage_config: Configure) -> None:
    config = storage_config()
    with reply_child(config.data_dir, database_url=config.database_url) as child:
        child.kill()

    reopened = st.open_storage(config)  # on a shared database: the same server restarted (same data dir)
    with reopened.session() as session:
        messages = st.list_messages(session, owner_id=child.owner_id, conversation_id=child.conversation_id)
    reopened.close()
    question, reply = messages
    assert question.text == "What bird?"
    assert reply.id == child.message_id
    assert reply.status is st.MessageStatus.INTERRUPTED
    assert reply.text == "The bird in this photo is a European robin, "


@pytest.mark.timeout(120)
def test_concurrent_writers_from_worker_threads(storage: st.Storage) -> None:
    threads, per_thread = 8, 15
    shared_user = make_user(storage, "shared")
    shared = make_conversation(storage, shared_user)
    errors: list[BaseException] = []
    start = threading.Barrier(threads)

    def worker(index: int) -> None:
        try:
            start.wait()
            with storage.session() as session:  # every thread races to create the same user
                same = st.user_for_oauth(session, username="everyone")
            own = make_conversation(storage, make_user(storage, f"user{index}"))
            for n in range(per_thread):
                with storage.session() as session:
                    st.add_user_message(
                        session, owner_id=shared_user.id, conversation_id=shared.id, text=f"t{index}-{n}"
                    )
                    user = st.get_user(session, user_id=own.owner_id)
                    st.add_user_message(session, owner_id=user.id, conversation_id=own.id, text=f"{n}")
            assert same.name == "everyone"
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            errors.append(e)

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(timeout=100)
    assert not errors, errors
    with storage.session() as session:
        messages = st.list_messages(session, owner_id=shared_user.id, conversation_id=shared.id)
        everyone = {st.user_for_oauth(session, username="everyone").id}
    assert [m.position for m in messages] == list(range(threads * per_thread))
    assert len({m.text for m in messages}) == threads * per_thread
    assert len(everyone) == 1
