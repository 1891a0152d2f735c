"""A replica in a child process, for the tests of several servers on one PostgreSQL database.

Usage:
    python tests/storage_replica_child.py open DATA_DIR DATABASE_URL
    python tests/storage_replica_child.py answer DATA_DIR DATABASE_URL OWNER_ID CONVERSATION_ID TAG ROUNDS

Each prints "READY" once imported, waits for a line on stdin (so that all children start at
the same moment), does its work and prints one JSON line with what happened:
- open: open_storage (migrating an empty database), then {"revision": ...};
- answer: ROUNDS times, ask a question in the conversation and stream a reply to the
  conversation's last question, then {"questions": n, "replies": n, "no_question_waiting": n}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from alembic.migration import MigrationContext

import storage as st


def open_once(data_dir: Path, database_url: str) -> dict:
    with st.open_storage(st.StorageConfig(data_dir=data_dir, database_url=database_url)) as opened:
        with opened.engine.connect() as connection:
            return {"revision": MigrationContext.configure(connection).get_current_revision()}


def answer(data_dir: Path, database_url: str, owner_id: int, conversation_id: str, tag: str, rounds: int) -> dict:
    """Questions and streamed replies, as the app writes them: one unit of work per step."""
    done = {"questions": 0, "replies": 0, "no_question_waiting": 0}
    with st.open_storage(st.StorageConfig(data_dir=data_dir, database_url=database_url)) as opened:
        for n in range(rounds):
            with opened.session() as session:
                st.add_user_message(session, owner_id=owner_id, conversation_id=conversation_id, text=f"{tag} q{n}")
            done["questions"] += 1
            try:
                writer = st.ReplyWriter.start(opened, owner_id=owner_id, conversation_id=conversation_id,
                                              min_interval_s=0.0)
            except st.InvalidInputError:  # the other replica already answered the last question
                done["no_question_waiting"] += 1
                continue
            with writer:
                for word in (tag, "says", str(n)):
                    writer.append(word + " ")  # every append is written (min_interval_s=0)
            done["replies"] += 1
    return done


def main(argv: list[str]) -> None:
    command, data_dir, database_url, *rest = argv
    sys.stdout.write("READY\n")
    sys.stdout.flush()
    sys.stdin.readline()  # "go"
    if command == "open":
        result = open_once(Path(data_dir), database_url)
    else:
        owner_id, conversation_id, tag, rounds = rest
        result = answer(Path(data_dir), database_url, int(owner_id), conversation_id, tag, int(rounds))
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
