"""What a person notices while chatting, in the real app in headless Chromium, on a desktop
(1280×800) and a phone (390×844) window: the composer stays on screen, expected problems are
told next to it without an overlay, the address follows the conversation, a reply survives a
reload, edits and regenerations keep the earlier version, shared links are read-only and can be
turned off, copies are clean text, the phone drawer, export and import, the theme, and axe-core.

Two servers per module, started together: replies of up to 32 tokens for most tests, and the
1024 for the tests about long replies (the reload test comes first: it needs the reply still
running). Each test is its own visitor (a browser context of its own) unless it reads another's
conversation. The page's policy forbids eval, so waits poll (see tests/browser_support.py).
Screenshots go to test-artifacts/chat-*.png.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, expect

from tests.app_process import running_app
from tests.browser_support import (
    DESKTOP,
    PHONE,
    WINDOW_SIZES,
    WindowSize,
    address_id,
    assert_on_screen,
    axe_violations,
    bot_messages,
    chat_scroller,
    clipped_labels,
    composer,
    describe_violations,
    document_scroll,
    no_overlay,
    notice,
    open_app,
    poll,
    reply_text,
    screenshot,
    send,
    set_max_new_tokens,
    set_temperature,
    sidebar_open,
    started_together,
    switch_to_dark,
    user_messages,
    visitor,
    wait_for_reply_end,
    wait_until_loaded,
    wait_until_still,
)

pytestmark = pytest.mark.browser

QUICK_TOKENS = 32
LONG_QUESTION = "Tell me a long story about this app."  # at temperature 0: no early end
LONG_TOKENS = 1024  # ~30 s at ~35 tokens/s: room to reload mid-reply even on a busy machine
LONG_REPLY_MS = 180_000
UNFINISHED = re.compile(r"partial|interrupted|failed")


# --- servers and shared conversations ------------------------------------------------------


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """Two apps started at once: replies of at most 32 tokens (a second or two each), and of 1024."""
    quick = running_app(tmp_path_factory.mktemp("quick-data"), "--max-new-tokens", str(QUICK_TOKENS),
                        name="chat-experience-quick")
    long = running_app(tmp_path_factory.mktemp("long-data"), "--max-new-tokens", str(LONG_TOKENS),
                       name="chat-experience-long")
    with started_together(quick, long) as (quick_app, long_app):
        yield quick_app.url, long_app.url


@pytest.fixture(scope="module")
def quick_server(servers: tuple[str, str]) -> str:
    return servers[0]


@pytest.fixture(scope="module")
def long_server(servers: tuple[str, str]) -> str:
    return servers[1]


@dataclass(frozen=True)
class Conversation:
    """A visitor's conversation: its address, the visitor's cookies, its question."""

    url: str
    storage_state: dict
    question: str


@pytest.fixture(scope="module")
def streaming_reply(long_server: str, app_browser: Browser) -> Iterator[Page]:
    """A desktop page whose 1024-token reply has started (the reload test reloads it mid-reply)."""
    with visitor(app_browser) as context:
        page = open_app(context, long_server)
        set_temperature(page, 0)
        set_max_new_tokens(page, LONG_TOKENS)
        send(page, LONG_QUESTION)
        bot_messages(page).last.filter(has_text=re.compile(r"\w{2}")).wait_for()
        yield page


@pytest.fixture(scope="module")
def long_conversation(streaming_reply: Page) -> Conversation:
    """The same conversation once its long reply has ended."""
    wait_for_reply_end(streaming_reply, count=1, timeout_ms=LONG_REPLY_MS)
    return Conversation(url=streaming_reply.url, storage_state=streaming_reply.context.storage_state(),
                        question=LONG_QUESTION)


@pytest.fixture(scope="module")
def shared_conversation(quick_server: str, app_browser: Browser) -> Iterator[tuple[Conversation, str]]:
    """A finished conversation with a read-only link that stays on; yields it and the link's URL."""
    with visitor(app_browser) as context:
        page = open_app(context, quick_server)
        send(page, "Describe the shared photo, please.")
        wait_for_reply_end(page, count=1)
        page.locator("#manage-conversation").click()
        page.locator("#share-button").click()
        href = page.locator("#share-link a[href^='/share/']").get_attribute("href")
        yield (Conversation(url=page.url, storage_state=context.storage_state(),
                            question="Describe the shared photo, please."), quick_server.rstrip("/") + href)


def as_visitor(browser: Browser, conversation: Conversation, size: WindowSize, **options) -> BrowserContext:
    """A context with the conversation owner's cookies (close it yourself)."""
    context = browser.new_context(**size.context_options(), storage_state=conversation.storage_state, **options)
    context.set_default_timeout(30_000)
    return context


# --- a reply survives a reload ----------------------------------------------------------


def test_a_reload_mid_reply_picks_the_reply_up_and_it_finishes(streaming_reply: Page):
    page = streaming_reply
    expect(page.locator("#stop-button")).to_be_enabled()  # the reply is still being written
    # the page moves its address to the new conversation on its next 250 ms tick, which a fast
    # reply's first words may beat
    poll(page, "() => new URL(location.href).searchParams.has('c')", timeout=5,
         message="no conversation in the address while its reply runs")
    url = page.url
    assert address_id(page)
    seen = len(reply_text(bot_messages(page).last))

    page.reload()
    wait_until_loaded(page, idle=False)
    assert page.url == url
    expect(user_messages(page).first).to_contain_text("Tell me a long story")
    expect(page.locator("#stop-button")).to_be_enabled()
    poll(page, "(n) => { const m = document.querySelectorAll('#chatbot [data-testid=bot]');"
               " return m.length && m[m.length - 1].innerText.length > n; }", arg=seen + 20,
         message="the reply keeps growing after the reload")
    assert page.locator("#chatbot .reply-footer").count() == 0, "the reply ended before the reload was tested"

    footer = wait_for_reply_end(page, count=1, timeout_ms=LONG_REPLY_MS)
    assert f"{LONG_TOKENS} tokens" in footer and not UNFINISHED.search(footer), footer
    expect(page.locator("#stop-button")).to_be_disabled()
    shown = reply_text(bot_messages(page).last)
    assert len(shown) > seen

    page.reload()  # what was stored is the whole reply
    wait_until_loaded(page)
    expect(page.locator("#chatbot .reply-footer")).to_have_text(footer)
    assert reply_text(bot_messages(page).last) == shown


# --- the composer stays on screen -------------------------------------------------------


@pytest.mark.parametrize("size", WINDOW_SIZES)
def test_composer_stays_on_screen_after_a_long_reply(app_browser, long_conversation, size: WindowSize):
    context = as_visitor(app_browser, long_conversation, size)
    try:
        page = open_app(context, long_conversation.url)
        footer = page.locator("#chatbot .reply-footer").last
        footer.wait_for()
        page.wait_for_timeout(500)  # the chat scrolls to its end after rendering
        screenshot(page, f"conversation-{size.name}")

        for selector in ("#chat-input textarea", "#send-button"):
            assert_on_screen(page, selector)
        sizes = document_scroll(page)
        assert sizes["scroll"] <= sizes["inner"] + 2, f"the whole page scrolls: {sizes}"
        assert sizes["scrollWidth"] <= sizes["innerWidth"] + 2, f"the page scrolls sideways: {sizes}"
        scroller = chat_scroller(page)
        assert scroller is not None, "the long reply does not scroll inside the chat"
        # the end of the reply is what is shown: its footer is inside the window, above the composer
        where = footer.bounding_box()
        composer_top = composer(page).bounding_box()["y"]
        assert where is not None and 0 <= where["y"] and where["y"] + where["height"] <= composer_top, (
            f"the end of the reply is not in view: footer {where}, composer top {composer_top}")
        clipped = clipped_labels(page, "#composer-buttons button")
        assert not clipped, f"composer buttons whose label does not fit: {clipped}"
    finally:
        context.close()


# --- expected problems are told inline, and the text stays ------------------------------


@pytest.mark.parametrize("size", WINDOW_SIZES)
def test_problems_are_told_next_to_the_composer_and_the_text_stays(app_browser, quick_server, size, tmp_path):
    with visitor(app_browser, size) as context:
        page = open_app(context, quick_server)
        screenshot(page, f"empty-{size.name}")

        page.locator("#send-button").click()
        expect(notice(page)).to_contain_text("Type a question or add a photo first")
        assert_on_screen(page, "#composer-notice p.notice")
        no_overlay(page)

        too_long = "a" * 4001
        composer(page).fill(too_long)
        counter = page.locator("#char-counter")
        expect(counter).to_contain_text("4,001 / 4,000")
        expect(counter).to_contain_text("1 too many")
        expect(page.locator("#send-button")).to_be_disabled()
        composer(page).press("Enter")
        expect(notice(page)).to_contain_text("the limit is 4,000")
        expect(composer(page)).to_have_value(too_long)
        assert_on_screen(page, "#composer-notice p.notice")
        no_overlay(page)
        screenshot(page, f"notice-too-long-{size.name}")

        composer(page).fill("shorter now")
        expect(counter).to_have_text("")
        expect(page.locator("#send-button")).to_be_enabled()

        not_a_photo = tmp_path / "holiday.png"
        not_a_photo.write_text("this is text, not a photo\n")
        composer(page).fill("What is in this photo?")
        page.locator("#chat-input input[type=file]").set_input_files(str(not_a_photo))
        page.locator("#send-button").click()
        expect(notice(page)).to_contain_text("not a photo this app can read")
        expect(composer(page)).to_have_value("What is in this photo?")
        no_overlay(page)
        screenshot(page, f"notice-bad-photo-{size.name}")
        assert user_messages(page).count() == 0, "a refused message was added to the chat"
        assert page.locator("#conversation-list label").count() == 0, "a refused message made a conversation"


def test_a_text_file_is_refused_next_to_the_composer(app_browser, quick_server, tmp_path):
    """A file that is plainly not an image is an expected problem too: a notice on Send, no toast."""
    notes = tmp_path / "notes.txt"
    notes.write_text("this is not a photo\n")
    with visitor(app_browser) as context:
        page = open_app(context, quick_server)
        composer(page).fill("What is this?")
        page.locator("#chat-input input[type=file]").set_input_files(str(notes))
        page.locator("#send-button").click()
        expect(notice(page)).to_contain_text("not a photo this app can read")
        screenshot(page, "notice-text-file-desktop")
        no_overlay(page)
        expect(composer(page)).to_have_value("What is this?")
        expect(page.locator("#chatbot .message-content")).to_have_count(0)  # nothing was stored


# --- focus -----------------------------------------------------------------------------


def test_the_text_box_has_the_focus_on_load_and_after_each_send(app_browser, quick_server):
    in_composer = "() => document.activeElement !== null && document.activeElement.closest('#chat-input') !== null"
    with visitor(app_browser) as context:
        page = open_app(context, quick_server)
        poll(page, in_composer, message="the text box has the focus once the page is loaded")
        composer(page).fill("Where does the focus go?")
        page.locator("#send-button").click()
        wait_for_reply_end(page, count=1)
        poll(page, in_composer, message="the text box has the focus again after Send")
        page.keyboard.type("typed without clicking")
        expect(composer(page)).to_have_value("typed without clicking")


# --- the address follows the conversation -----------------------------------------------


def test_the_address_follows_the_conversation(app_browser, quick_server):
    with visitor(app_browser) as context:
        page = open_app(context, quick_server)
        assert address_id(page) is None
        send(page, "First conversation here")
        wait_for_reply_end(page, count=1)
        poll(page, "() => new URL(location.href).searchParams.has('c')", message="?c= in the address")
        first_url, first_id = page.url, address_id(page)
        assert re.fullmatch(r"[\w-]{8,}", first_id or ""), page.url
        assert page.evaluate("() => !!document.activeElement?.closest('#chat-input')"), "focus left the text box"
        first_reply = reply_text(bot_messages(page).last)

        page.reload()
        wait_until_loaded(page)
        assert page.url == first_url
        expect(user_messages(page)).to_have_count(1)
        expect(user_messages(page).first).to_contain_text("First conversation here")
        assert reply_text(bot_messages(page).last) == first_reply

        page.locator("#new-chat-button").click()
        expect(user_messages(page)).to_have_count(0)
        send(page, "Second conversation here")
        wait_for_reply_end(page, count=1)
        poll(page, "(id) => { const c = new URL(location.href).searchParams.get('c'); return c && c !== id; }",
             arg=first_id, message="the second conversation's address")
        second_url = page.url

        # going between them through the list, then back and forward
        page.locator("#conversation-list label", has_text="First conversation here").click()
        expect(user_messages(page).first).to_contain_text("First conversation here")
        poll(page, "(url) => location.href === url", arg=first_url, message="the first address")
        page.locator("#conversation-list label", has_text="Second conversation here").click()
        expect(user_messages(page).first).to_contain_text("Second conversation here")
        poll(page, "(url) => location.href === url", arg=second_url, message="the second address")

        page.go_back()
        expect(user_messages(page).first).to_contain_text("First conversation here")
        expect(user_messages(page)).to_have_count(1)
        assert page.url == first_url
        page.go_forward()
        expect(user_messages(page).first).to_contain_text("Second conversation here")
        assert page.url == second_url

    with visitor(app_browser) as stranger:
        page = open_app(stranger, first_url)
        expect(notice(page)).to_contain_text("not found")
        assert user_messages(page).count() == 0
        assert "First conversation here" not in page.locator("body").inner_text()


# --- edits and regenerations keep the earlier version -----------------------------------


@pytest.mark.parametrize("size", WINDOW_SIZES)
def test_editing_a_question_makes_a_version_and_both_stay_reachable(app_browser, quick_server, size):
    with visitor(app_browser, size) as context:
        page = open_app(context, quick_server)
        send(page, "The original question")
        wait_for_reply_end(page, count=1)
        original_reply = reply_text(bot_messages(page).last)

        page.locator("#chatbot button.action-edit").last.click()
        expect(page.locator("#editing-bar")).to_be_visible()
        expect(composer(page)).to_have_value("The original question")
        assert page.evaluate("() => !!document.activeElement?.closest('#chat-input')"), "edit did not focus the box"
        screenshot(page, f"editing-{size.name}")
        send(page, "The edited question")
        expect(user_messages(page).last).to_contain_text("The edited question")  # the old reply is gone
        wait_for_reply_end(page, count=1)
        expect(page.locator("#editing-bar")).to_be_hidden()

        question = user_messages(page).last
        expect(question).to_contain_text("The edited question")
        expect(question.locator(".branch-position")).to_contain_text("2/2")
        assert_on_screen(page, "#chatbot .branch-switch button.action-switch")
        screenshot(page, f"branches-{size.name}")
        edited_reply = reply_text(bot_messages(page).last)

        question.locator(".branch-switch button.action-switch").click()  # ‹ the earlier version
        expect(user_messages(page).last).to_contain_text("The original question")
        expect(user_messages(page).last.locator(".branch-position")).to_contain_text("1/2")
        expect(user_messages(page)).to_have_count(1)
        assert reply_text(bot_messages(page).last) == original_reply

        user_messages(page).last.locator(".branch-switch button.action-switch").click()  # › the edited one
        expect(user_messages(page).last).to_contain_text("The edited question")
        expect(user_messages(page).last.locator(".branch-position")).to_contain_text("2/2")
        assert reply_text(bot_messages(page).last) == edited_reply

        page.reload()  # the version shown is remembered
        wait_until_loaded(page)
        expect(user_messages(page).last).to_contain_text("The edited question")


def test_regenerate_keeps_the_earlier_reply_as_version_one(app_browser, quick_server):
    with visitor(app_browser) as context:
        page = open_app(context, quick_server)
        send(page, "Answer twice, please")
        wait_for_reply_end(page, count=1)
        first_reply = reply_text(bot_messages(page).last)

        page.locator("#regenerate-button").click()
        reply = bot_messages(page).last
        expect(reply.locator(".branch-position")).to_contain_text("2/2", timeout=30_000)
        wait_for_reply_end(page, count=1)
        second_reply = reply_text(bot_messages(page).last)

        bot_messages(page).last.locator(".branch-switch button.action-switch").click()
        expect(bot_messages(page).last.locator(".branch-position")).to_contain_text("1/2")
        assert reply_text(bot_messages(page).last) == first_reply
        bot_messages(page).last.locator(".branch-switch button.action-switch").click()
        expect(bot_messages(page).last.locator(".branch-position")).to_contain_text("2/2")
        assert reply_text(bot_messages(page).last) == second_reply


# --- a shared link is read-only and can be turned off -----------------------------------


def test_a_shared_link_is_read_only_and_stops_when_turned_off(app_browser, quick_server):
    with visitor(app_browser) as owner:
        page = open_app(owner, quick_server)
        send(page, "A question worth sharing")
        wait_for_reply_end(page, count=1)
        page.locator("#manage-conversation").click()
        page.locator("#share-button").click()
        link = page.locator("#share-link a[href^='/share/']")
        expect(link).to_be_visible()
        expect(page.locator("#unshare-button")).to_be_visible()
        screenshot(page, "share-on-desktop")
        share_url = quick_server.rstrip("/") + link.get_attribute("href")

        with visitor(app_browser) as reader:
            shared = reader.new_page()
            response = shared.goto(share_url)
            assert response is not None and response.status == 200
            expect(shared.locator("body")).to_contain_text("A question worth sharing")
            assert shared.locator("article.reply").count() == 1
            assert shared.locator("textarea, input, form, button").count() == 0, "the shared page can be edited"
            screenshot(shared, "share-page-desktop")
            shared.set_viewport_size({"width": PHONE.width, "height": PHONE.height})
            screenshot(shared, "share-page-phone")

            page.locator("#unshare-button").click()
            expect(page.locator("#share-button")).to_be_visible()
            expect(link).to_have_count(0)
            response = shared.goto(share_url)
            assert response is not None and response.status == 410
            expect(shared.locator("body")).to_contain_text("turned this shared link off")
            assert "A question worth sharing" not in shared.locator("body").inner_text()


# --- copying a reply gives its text ------------------------------------------------------


def test_copying_a_reply_gives_clean_text(app_browser, quick_server, shared_conversation):
    conversation, _ = shared_conversation
    context = as_visitor(app_browser, conversation, DESKTOP)
    try:
        context.grant_permissions(["clipboard-read", "clipboard-write"], origin=quick_server.rstrip("/"))
        page = open_app(context, conversation.url)
        page.locator("#chatbot .reply-footer").wait_for()
        shown = reply_text(bot_messages(page).last)

        page.locator("#chatbot .message-buttons-left button[aria-label='Copy message']").last.click()
        copied = poll(page, "() => navigator.clipboard.readText()", message="text on the clipboard")
        assert "tokens/s" not in copied and "reply-footer" not in copied, copied
        assert not re.search(r"</?(p|span|div|button|em|strong|code|pre)\b", copied), copied
        # whitespace aside: innerText drops the space where a line wraps, which the random reply's
        # words move from run to run, while the copy keeps the source's space or line break
        assert "".join(copied.split()) == "".join(shown.split()), f"copied {copied!r}, shown {shown!r}"
    finally:
        context.close()


# --- the phone drawer --------------------------------------------------------------------


def test_the_phone_drawer_is_closed_at_load_and_closes_after_choosing(app_browser, quick_server,
                                                                     shared_conversation):
    conversation, _ = shared_conversation
    context = as_visitor(app_browser, conversation, PHONE)
    try:
        page = open_app(context, quick_server)  # a new chat; the conversation is in the drawer
        poll(page, "() => document.querySelector('#sidebar').getBoundingClientRect().right <= 1", timeout=5,
             message="the drawer closed at load")
        assert_on_screen(page, "#chat-input textarea")
        assert_on_screen(page, "#send-button")
        assert user_messages(page).count() == 0

        page.locator("#sidebar .toggle-button").click()
        poll(page, "() => document.querySelector('#sidebar').getBoundingClientRect().left >= -1", timeout=5,
             message="the drawer opened")
        wait_until_still(page)
        screenshot(page, "drawer-open-phone")

        page.locator("#conversation-list label", has_text=conversation.question).click()
        expect(user_messages(page).first).to_contain_text(conversation.question)
        page.wait_for_timeout(1000)  # the drawer slides away within a few hundred ms
        wait_until_still(page)
        screenshot(page, "drawer-after-choosing-phone")
        assert not sidebar_open(page), "the drawer is still open after choosing a conversation"
        assert_on_screen(page, "#chat-input textarea")
    finally:
        context.close()


# --- axe-core ----------------------------------------------------------------------------


@pytest.mark.parametrize("size", WINDOW_SIZES)
@pytest.mark.parametrize("view", ["empty-chat", "conversation", "share-page"])
def test_no_serious_accessibility_violations_in_light_and_dark(app_browser, quick_server, shared_conversation,
                                                               view, size):
    conversation, share_url = shared_conversation
    context = as_visitor(app_browser, conversation, size, color_scheme="light")
    found = {}
    try:
        page = context.new_page()
        if view == "share-page":
            page.goto(share_url)
            expect(page.locator("article.reply")).to_have_count(1)
        else:
            page.goto(quick_server if view == "empty-chat" else conversation.url)
            wait_until_loaded(page)
            if view == "conversation":
                page.locator("#chatbot .reply-footer").wait_for()
        for theme in ("light", "dark"):
            if theme == "dark" and view == "share-page":
                page.emulate_media(color_scheme="dark")  # the share page follows the system; it has no script
            elif theme == "dark":
                switch_to_dark(page)
            wait_until_still(page)
            screenshot(page, f"axe-{view}-{size.name}-{theme}")
            found[theme] = axe_violations(page)
    finally:
        context.close()
    assert not any(found.values()), "\n".join(
        f"axe-core on the {view} ({size.name}, {theme}):\n{describe_violations(violations)}"
        for theme, violations in found.items() if violations)


# --- export and import ------------------------------------------------------------------


def test_an_exported_conversation_imports_as_a_second_one(app_browser, quick_server, tmp_path: Path):
    with visitor(app_browser) as context:
        page = open_app(context, quick_server)
        send(page, "Keep this conversation")
        wait_for_reply_end(page, count=1)
        page.locator("#manage-conversation").click()
        page.locator("#export-json").click()
        download_link = page.locator("#export-file a[download], #export-file a.download-link").first
        with page.expect_download() as download:
            download_link.click()
        exported = tmp_path / download.value.suggested_filename
        download.value.save_as(exported)
        assert exported.suffix == ".json"
        assert "Keep this conversation" in json.dumps(json.loads(exported.read_text()))

        page.locator("#all-conversations").click()
        page.locator("#all-conversations input[type=file]").set_input_files(str(exported))
        expect(notice(page)).to_contain_text("Imported 1 conversation")
        entries = page.locator("#conversation-list label", has_text="Keep this conversation")
        expect(entries).to_have_count(2)
        expect(user_messages(page).first).to_contain_text("Keep this conversation")
        expect(page.locator("#chatbot .reply-footer")).to_have_count(1)
        no_overlay(page)


# --- the theme --------------------------------------------------------------------------


def test_the_theme_toggle_switches_and_is_remembered(app_browser, quick_server):
    with visitor(app_browser, DESKTOP, color_scheme="light") as context:
        page = open_app(context, quick_server)
        toggle = page.locator("#theme-toggle")
        expect(toggle).to_have_attribute("aria-pressed", "false")
        assert "dark" not in (page.locator("body").get_attribute("class") or "").split()
        switch_to_dark(page)
        expect(toggle).to_have_attribute("aria-pressed", "true")
        screenshot(page, "dark-desktop")

        page.reload()
        wait_until_loaded(page)
        expect(page.locator("body")).to_have_class(re.compile(r"\bdark\b"))
        expect(toggle).to_have_attribute("aria-pressed", "true")
        expect(toggle).to_have_text("Light mode")
