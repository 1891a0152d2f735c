"""Child process for the SIGKILL test: starts a reply, persists part of it, then waits to be killed.

Usage: python tests/storage_reply_child.py DATA_DIR [DATABASE_URL]
Writes "READY <owner_id> <conversation_id> <message_id>" on stdout once the partial text is stored.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import storage as st

PARTIAL_TEXT = "The bird in this photo is a European robin, "


def main(data_dir: Path, database_url: str | None) -> None:
    opened = st.open_storage(st.StorageConfig(data_dir=data_dir, database_url=database_url))
    with opened.session() as session:
        user = st.user_for_oauth(session, username="child")
        conversation = st.create_conversation(session, owner_id=user.id)
        st.add_user_message(session, owner_id=user.id, conversation_id=conversation.id, text="What bird?")
    writer = st.ReplyWriter.start(
        opened, owner_id=user.id, conversation_id=conversation.id, min_interval_s=3600, max_pending_tokens=4
    )
    for word in PARTIAL_TEXT.split(" ")[:-1]:
        writer.append(word + " ")  # every 4th token triggers a throttled write
    writer.flush()
    sys.stdout.write(f"READY {user.id} {conversation.id} {writer.message.id}\n")
    sys.stdout.flush()
    writer.append("not-yet-written ")  # below the throttle: lost with the process, by design
    while True:  # "generating" until killed
        time.sleep(1)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else None)
