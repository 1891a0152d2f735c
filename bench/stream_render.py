"""What the server spends rendering a streaming reply for the page, per reply.

    python -m bench.stream_render

A conversation of `--turns` earlier question/answer pairs (each answer `--reply-words` words of
Markdown), then a reply of `--reply-words` words streamed one word per token. Compares:
- every token: the whole conversation rendered again for each token (what the page did before);
- throttled: the conversation rendered once, then only the growing reply, at most ten times a
  second (the page now; `app.handlers.STREAM_INTERVAL_S`), counting updates at `--tokens-per-s`.
Prints the CPU seconds each way; no model is needed.
"""

from __future__ import annotations

import argparse
import platform
import time
from datetime import UTC, datetime

from app.chat_view import chatbot_messages, growing_reply, question_end
from app.handlers import STREAM_INTERVAL_S
from storage import MessageRecord, MessageStatus, Role

SENTENCE = "The **cat** sits on a `mat`, near a [window](https://example.org) and a lamp"


def _record(identifier: int, role: Role, text: str) -> MessageRecord:
    now = datetime.now(UTC)
    return MessageRecord(id=identifier, conversation_id="c" * 32, position=identifier, role=role, text=text,
                         image_sha256=None, status=MessageStatus.COMPLETE, finish_reason="stop", prompt_tokens=100,
                         completion_tokens=100, reused_tokens=None, first_token_seconds=0.1, duration_seconds=1.0,
                         created_at=now, updated_at=now)


def _words(count: int) -> list[str]:
    words = SENTENCE.split()
    return [words[i % len(words)] + ("." if i % 40 == 39 else "") for i in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--reply-words", type=int, default=400)
    parser.add_argument("--tokens-per-s", type=float, default=20.0)
    args = parser.parse_args()

    answer = " ".join(_words(args.reply_words))
    records = []
    for turn in range(args.turns):
        records += [_record(2 * turn, Role.USER, f"Question {turn}?"), _record(2 * turn + 1, Role.ASSISTANT, answer)]
    records.append(_record(2 * args.turns, Role.USER, "And now?"))
    tokens = _words(args.reply_words)

    def image_file(_sha256: str) -> None:
        return None

    started = time.process_time()
    text = ""
    for token in tokens:
        text += token + " "
        chatbot_messages([*records, _record(999, Role.ASSISTANT, text)], image_file=image_file)
    every_token = time.process_time() - started

    started = time.process_time()
    shown = chatbot_messages(records[:question_end(records)], image_file=image_file)
    per_update = max(1, round(args.tokens_per_s * STREAM_INTERVAL_S))
    text = ""
    for index, token in enumerate(tokens, start=1):
        text += token + " "
        if index % per_update == 0 or index == len(tokens):
            growing_reply(shown, None, text=text, waiting=False)
    throttled = time.process_time() - started

    print(f"{platform.processor() or platform.machine()}, Python {platform.python_version()}")
    print(f"{args.turns} earlier turns, a {args.reply_words}-word reply at {args.tokens_per_s:g} tokens/s")
    print(f"every token, whole conversation: {every_token:7.2f} s CPU")
    print(f"throttled, reply only:           {throttled:7.2f} s CPU  ({every_token / throttled:.0f}x less)")


if __name__ == "__main__":
    main()
