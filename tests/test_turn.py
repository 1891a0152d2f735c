"""Stop sequences in a streamed reply: the text ends before the first one, wherever chunks split it."""

from __future__ import annotations

import pytest

from app.turn import StopSequences


def streamed(chunks, stops) -> tuple[str, bool, str]:
    cut = StopSequences(stops)
    shown = "".join(cut.feed(chunk) for chunk in chunks)
    if not cut.hit:
        shown += cut.flush()
    return shown, cut.hit, cut.text


@pytest.mark.parametrize("chunks", [
    ["Hello wor", "ld. END of it"],
    ["Hello world. E", "N", "D of it"],
    ["Hello world. ", "END", " of it"],
    ["Hello world. END of it"],
])
def test_the_reply_ends_before_a_stop_split_across_chunks(chunks):
    assert streamed(chunks, ["END"]) == ("Hello world. ", True, "Hello world. ")


def test_the_earliest_of_several_stops_wins_and_nothing_after_is_shown():
    shown, hit, _ = streamed(["a b ## c", " || d"], ["||", "##"])
    assert (shown, hit) == ("a b ", True)
    cut = StopSequences(["##"])
    cut.feed("x##")
    assert cut.feed("more") == ""


def test_text_that_only_looked_like_a_stop_is_given_back_at_the_end():
    assert streamed(["Ends with E", "N"], ["END"]) == ("Ends with EN", False, "Ends with EN")
    assert streamed(["plain"], []) == ("plain", False, "plain")
