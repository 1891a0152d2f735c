"""The real app (`launch.py --model tiny`) in headless Chromium, as a person uses it.

One server and one browser per module; the tests run in order and share the first visitor's
browser context (its identity lives in that context's localStorage). Screenshots of the
main views go to test-artifacts/.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from playwright.sync_api import expect

from mipha_core.precision import photo_reader_weights
from tests import browser_support as support
from tests.browser_support import WINDOW_SIZES, WindowSize, notice, poll

pytestmark = pytest.mark.browser

ASSETS = Path(__file__).resolve().parent.parent / "assets"
QUESTION = "What is in this photo?"
TIMEOUT_MS = 30_000


@pytest.fixture(scope="module")
def visitor(app_browser):
    """The first visitor's browser context, kept across the tests of this module."""
    context = app_browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(TIMEOUT_MS)
    yield context
    context.close()


def open_app(context, url: str):
    page = context.new_page()
    page.goto(url)
    page.locator("#chat-input textarea:not([disabled])").wait_for()  # enabled once the page load ran
    return page


def bot_messages(page):
    return page.locator("#chatbot [data-testid=bot]")


def test_ask_about_a_photo_see_it_stream_and_stop_it(app_server, visitor, app_screenshot):
    page = open_app(visitor, app_server)
    app_screenshot(page, "01-empty")
    page.locator("#chat-input input[type=file]").set_input_files(str(ASSETS / "chelsea.jpg"))
    page.locator("#chat-input textarea").fill(QUESTION)
    page.locator("#send-button").click()

    reply = bot_messages(page).last
    reply.filter(has_text=re.compile(r"\w")).wait_for()
    # text is on the page while the reply is still being written: Stop is live, no footer yet
    assert page.locator("#stop-button").is_enabled()
    assert page.locator("#chatbot .reply-footer").count() == 0
    first_seen = reply.inner_text()
    poll(page, "(n) => [...document.querySelectorAll('#chatbot [data-testid=bot]')].pop()?.innerText.length > n",
         arg=len(first_seen) + 5, message="the reply growing")
    app_screenshot(page, "02-streaming")

    page.locator("#stop-button").click()
    footer = page.locator("#chatbot .reply-footer").last
    footer.filter(has_text="stopped: partial reply").wait_for()
    expect(page.locator("#send-button")).to_be_enabled()
    expect(page.locator("#stop-button")).to_be_disabled()
    assert page.locator("#chatbot [data-testid=user] img").count() == 1
    app_screenshot(page, "03-stopped")
    page.close()


def test_reload_finds_the_conversation_with_its_photo(app_server, visitor, app_screenshot):
    page = open_app(visitor, app_server)
    entry = page.locator("#conversation-list label", has_text=QUESTION)
    entry.wait_for()
    entry.click()
    page.locator("#chatbot [data-testid=user] img").wait_for()
    page.locator("#chatbot .reply-footer", has_text="stopped: partial reply").wait_for()
    assert page.locator("#chatbot [data-testid=user]", has_text=QUESTION).count() == 1
    app_screenshot(page, "04-reopened")
    page.close()


def test_another_browser_sees_none_of_these_conversations(app_server, app_browser, app_screenshot):
    context = app_browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(TIMEOUT_MS)
    page = open_app(context, app_server)
    page.wait_for_timeout(500)  # the list is filled by the same page load that enabled the input
    assert page.locator("#conversation-list label").count() == 0
    assert QUESTION not in page.locator("#conversation-list").inner_text()
    app_screenshot(page, "05-second-browser")
    context.close()


def test_a_non_image_upload_shows_a_notice(app_server, visitor, app_screenshot, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("this is not a photo")
    page = open_app(visitor, app_server)
    page.locator("#chat-input input[type=file]").set_input_files(str(notes))
    page.locator("#chat-input textarea").fill("What is in my notes?")
    page.locator("#send-button").click()
    # refused by the composer, which says so itself: no toast, and the question stays in the box
    expect(notice(page).filter(has_text=re.compile(r"not a photo", re.I))).to_be_visible()
    expect(page.locator("[data-testid=toast-body]")).to_have_count(0)
    expect(page.locator("#chat-input textarea")).to_have_value("What is in my notes?")
    app_screenshot(page, "06-non-image-notice")

    broken = tmp_path / "broken.jpg"  # named like a photo, fails on the server
    broken.write_bytes((ASSETS / "coffee.jpg").read_bytes()[:300])
    page.get_by_role("button", name="Remove file").click()  # the refused file stayed attached, like the text
    page.locator("#chat-input input[type=file]").set_input_files(str(broken))
    page.locator("#chat-input textarea").fill("What is this?")
    page.locator("#send-button").click()
    expect(notice(page)).to_contain_text("not a photo this app can read")  # by the composer, not over the chat
    assert page.locator("[data-testid=toast-body]").count() == 0
    expect(page.locator("#chat-input textarea")).to_have_value("What is this?")  # nothing typed is lost
    app_screenshot(page, "07-corrupt-image-notice")
    listed = page.locator("#conversation-list").inner_text()
    assert "What is this?" not in listed and "What is in my notes?" not in listed  # nothing was stored
    page.close()


@pytest.mark.parametrize("size", WINDOW_SIZES)
def test_the_ready_page_says_which_model_runs_and_in_what_precision(app_server, app_browser, size: WindowSize):
    """Once the model is ready, a muted line under the composer names it and its precision (the tiny
    app runs llama.cpp in int8 on the CPU, reading photos on the 16-bit weights this processor is fastest
    on), on screen and accessible in both themes."""
    with support.visitor(app_browser, size, color_scheme="light") as context:
        page = support.open_app(context, app_server)
        line = page.locator("#model-runs-on .runs-on")
        reader = photo_reader_weights()
        expect(line).to_have_text(f"Model: tiny demo model · int8 · CPU (llama.cpp, prompts read in {reader})",
                                  timeout=120_000)
        expect(page.locator("#model-status")).to_be_hidden()  # the loading banner is gone
        support.assert_on_screen(page, "#model-runs-on .runs-on")
        assert support.document_scroll(page)["scrollWidth"] <= support.document_scroll(page)["innerWidth"]
        found = {}
        for theme in ("light", "dark"):
            if theme == "dark":
                support.switch_to_dark(page)
            support.wait_until_still(page)
            support.screenshot(page, f"model-line-{size.name}-{theme}")
            found[theme] = support.axe_violations(page)
    assert not any(found.values()), "\n".join(
        f"axe-core ({size.name}, {theme}):\n{support.describe_violations(violations)}"
        for theme, violations in found.items() if violations)


@pytest.mark.parametrize("size", WINDOW_SIZES)
def test_a_photo_and_question_typed_before_send_are_already_read(app_server, app_browser, size: WindowSize):
    """While the photo sits in the composer and the question is typed, the server reads them; after
    Send only the last word and the assistant's turn are left, which the reply's footer shows."""
    with support.visitor(app_browser, size) as context:
        page = support.open_app(context, app_server)
        expect(page.locator("#model-runs-on .runs-on")).to_contain_text("llama.cpp", timeout=120_000)
        page.locator("#chat-input input[type=file]").set_input_files(str(ASSETS / "coffee.jpg"))
        page.locator("#chat-input textarea").press_sequentially("What is on the table in", delay=40)
        page.wait_for_timeout(1500)  # the tiny model reads it in milliseconds; the events take longer
        page.locator("#chat-input textarea").press_sequentially(" this photo?", delay=40)
        page.locator("#send-button").click()
        footer = page.locator("#chatbot .reply-footer").last
        footer.filter(has_text="prompt tokens reused").wait_for(timeout=120_000)
        reused, prompt = map(int, re.search(r"(\d+) of (\d+) prompt tokens reused", footer.inner_text()).groups())
        assert prompt - reused <= 8  # " this photo?" and " ASSISTANT:"
        page.close()
