"""Helpers for browser tests of the real page: window sizes, opening the app, waiting for replies,
layout checks and axe-core.

The page's Content-Security-Policy forbids `eval`, so nothing here uses `page.wait_for_function`
(Playwright builds its predicate with `new Function`): waits poll `page.evaluate` or use locator
assertions. axe-core is evaluated through the DevTools protocol, which the policy does not cover.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, expect

from tests.app_process import ARTIFACTS, REPO

TIMEOUT_MS = 30_000
expect.set_options(timeout=15_000)  # the page answers in well under a second, but CI runs two cores busy
AXE_JS = REPO / ".venv" / "axe-core" / "node_modules" / "axe-core" / "axe.min.js"
"""Installed by scripts/install-axe.sh (which `make test` runs)."""
BLOCKING_IMPACTS = ("serious", "critical")


@dataclass(frozen=True)
class WindowSize:
    """A browser window the page must work in."""

    name: str
    width: int
    height: int
    phone: bool

    def context_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"viewport": {"width": self.width, "height": self.height}}
        if self.phone:
            options.update(is_mobile=True, has_touch=True, device_scale_factor=2)
        return options


DESKTOP = WindowSize("desktop", 1280, 800, phone=False)
PHONE = WindowSize("phone", 390, 844, phone=True)
WINDOW_SIZES = [pytest.param(DESKTOP, id="desktop"), pytest.param(PHONE, id="phone")]


@contextmanager
def started_together(*managers: AbstractContextManager) -> Iterator[list]:
    """Enter several context managers (app servers) at once on threads; exit them all at the end."""
    with ThreadPoolExecutor(max_workers=len(managers)) as pool:
        futures = [pool.submit(manager.__enter__) for manager in managers]
    entered = [m for m, f in zip(managers, futures, strict=True) if f.exception() is None]
    try:
        for future in futures:
            if future.exception() is not None:
                raise future.exception()
        yield [future.result() for future in futures]
    finally:
        for manager in reversed(entered):
            manager.__exit__(None, None, None)


@contextmanager
def visitor(browser: Browser, size: WindowSize = DESKTOP, **options: Any) -> Iterator[BrowserContext]:
    """A new browser context: a visitor of its own (the identity cookie lives in the context)."""
    context = browser.new_context(**size.context_options(), **options)
    context.set_default_timeout(TIMEOUT_MS)
    try:
        yield context
    finally:
        context.close()


def open_app(context: BrowserContext, url: str) -> Page:
    """A new page at `url`, once the page load has answered (it enables the text box)."""
    page = context.new_page()
    page.goto(url)
    wait_until_loaded(page)
    return page


def wait_until_loaded(page: Page, *, idle: bool = True) -> None:
    """Until the page load has answered: the server wrote the address field ("c:" and the open
    conversation's id) and the composer's loading overlay is gone; with `idle`, Send is enabled too
    (it is not while a reply runs)."""
    page.locator("#chat-input textarea:not([disabled])").wait_for()
    poll(page, """() => {
            const field = document.querySelector('#conversation-address textarea, #conversation-address input');
            const tracker = document.querySelector('#chat-input [data-testid=status-tracker]');
            return !!field && field.value.startsWith('c:') && (!tracker || tracker.classList.contains('hide'));
        }""", message="the page load answered")
    if idle:
        expect(page.locator("#send-button")).to_be_enabled()


def set_temperature(page: Page, value: float) -> None:
    """Generation settings → Temperature (0 makes the tiny model's reply the same every time)."""
    _set_generation_setting(page, 0, value)


def set_max_new_tokens(page: Page, value: int) -> None:
    """Generation settings → Max new tokens."""
    _set_generation_setting(page, 2, value)


def _set_generation_setting(page: Page, index: int, value: float) -> None:
    header = page.locator("#generation-settings > button, #generation-settings .label-wrap").first
    header.click()
    number = page.locator("#generation-settings input[type=number]").nth(index)
    for _ in range(20):  # the accordion mounts its sliders as it opens: a value typed too early is reset
        number.fill(f"{value:g}")
        number.press("Enter")
        page.wait_for_timeout(250)
        if number.input_value() == f"{value:g}":
            break
    expect(number).to_have_value(f"{value:g}")
    header.click()


def poll(page: Page, expression: str, *, arg: Any = None, timeout: float = TIMEOUT_MS / 1000,
         message: str = "") -> Any:
    """Evaluate `expression` (a JS function of `arg`) until it returns something truthy; return that."""
    deadline = time.monotonic() + timeout
    while True:
        value = page.evaluate(expression, arg)
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout} s: {message or expression} (last value {value!r})")
        page.wait_for_timeout(100)


# --- the composer and the chat -------------------------------------------------------------


def composer(page: Page):
    return page.locator("#chat-input textarea")


def send(page: Page, text: str) -> None:
    composer(page).fill(text)
    page.locator("#send-button").click()


def bot_messages(page: Page):
    return page.locator("#chatbot [data-testid=bot]")


def user_messages(page: Page):
    return page.locator("#chatbot [data-testid=user]")


def wait_for_reply_end(page: Page, *, count: int | None = None, timeout_ms: float = TIMEOUT_MS) -> str:
    """Wait until the last reply has its footer and Send is enabled again; returns the footer text.

    `count`: how many replies the chat shows by then. Call it once the chat shows the new question:
    until then an earlier reply's footer is still on the page.
    """
    footers = page.locator("#chatbot .reply-footer")
    if count is not None:
        expect(footers).to_have_count(count, timeout=timeout_ms)
    footers.last.wait_for(timeout=timeout_ms)
    expect(page.locator("#send-button")).to_be_enabled(timeout=timeout_ms)
    return footers.last.inner_text()


def reply_text(message) -> str:
    """A reply's visible text without the line under it (versions, speed)."""
    return message.evaluate(
        "e => { const c = e.cloneNode(true); c.querySelectorAll('.message-controls').forEach(x => x.remove());"
        " return c.innerText; }")


def notice(page: Page):
    return page.locator("#composer-notice p.notice")


def address_id(page: Page) -> str | None:
    match = re.search(r"[?&]c=([^&#]+)", page.url)
    return match[1] if match else None


def no_overlay(page: Page) -> None:
    """No Gradio toast or error modal covers the page."""
    assert page.locator("[data-testid=toast-body], .toast-body").count() == 0, (
        "a toast appeared: " + " | ".join(page.locator("[data-testid=toast-body], .toast-body").all_inner_texts()))
    assert page.locator(".modal, [role=alertdialog]").count() == 0, "an error modal appeared"


# --- layout --------------------------------------------------------------------------------


def box_in_viewport(page: Page, selector: str) -> dict:
    """Where `selector` is, and whether it lies wholly inside the window and is not covered at its centre."""
    return page.evaluate(
        """(selector) => {
            const el = document.querySelector(selector);
            if (!el) return {missing: true};
            const r = el.getBoundingClientRect();
            const cx = r.left + r.width / 2, cy = r.top + r.height / 2;
            const top = document.elementFromPoint(cx, cy);
            return {top: r.top, bottom: r.bottom, left: r.left, right: r.right,
                    inside: r.width > 0 && r.height > 0 && r.top >= 0 && r.left >= 0
                            && r.bottom <= window.innerHeight + 1 && r.right <= window.innerWidth + 1,
                    uncovered: !!top && (el === top || el.contains(top)),
                    coveredBy: top && !(el === top || el.contains(top)) ? top.outerHTML.slice(0, 160) : null};
        }""", selector)


def assert_on_screen(page: Page, selector: str) -> None:
    where = box_in_viewport(page, selector)
    assert where.get("inside") and where.get("uncovered"), f"{selector} is not fully on screen and uncovered: {where}"


def clipped_labels(page: Page, selector: str) -> list[str]:
    """The buttons under `selector` whose label is wider than the button (cut off or spilling out)."""
    return page.evaluate(
        "(selector) => [...document.querySelectorAll(selector)]"
        ".filter(b => b.offsetParent !== null && b.scrollWidth > b.clientWidth + 1)"
        ".map(b => `${b.id || b.innerText}: label ${b.scrollWidth}px in ${b.clientWidth}px`)", selector)


def document_scroll(page: Page) -> dict:
    return page.evaluate("() => ({scroll: document.scrollingElement.scrollHeight, inner: window.innerHeight,"
                         " scrollWidth: document.scrollingElement.scrollWidth, innerWidth: window.innerWidth})")


def chat_scroller(page: Page) -> dict | None:
    """The element inside #chatbot that scrolls the conversation: its sizes and position; None if nothing does."""
    return page.evaluate(
        """() => {
            for (const el of [document.querySelector('#chatbot'), ...document.querySelectorAll('#chatbot *')]) {
                const style = getComputedStyle(el);
                if (/(auto|scroll)/.test(style.overflowY) && el.scrollHeight > el.clientHeight + 20)
                    return {scrollHeight: el.scrollHeight, clientHeight: el.clientHeight, scrollTop: el.scrollTop};
            }
            return null;
        }""")


def sidebar_open(page: Page) -> bool:
    """Whether any of the sidebar lies inside the window."""
    return page.evaluate("() => { const r = document.querySelector('#sidebar').getBoundingClientRect();"
                         " return r.right > 1 && r.left < window.innerWidth - 1; }")


def wait_until_still(page: Page) -> None:
    """Until no finite CSS transition or animation runs (colours settle after a theme switch)."""
    poll(page, "() => document.getAnimations().every(a => a.playState !== 'running'"
               " || a.effect?.getComputedTiming().iterations === Infinity)", timeout=5, message="animations finished")


def switch_to_dark(page: Page) -> None:
    page.locator("#theme-toggle").click()
    expect(page.locator("body")).to_have_class(re.compile(r"\bdark\b"))
    wait_until_still(page)


# --- axe-core ------------------------------------------------------------------------------


def axe_source() -> str:
    """axe.min.js; a missing file is a failed set-up, not a skipped check."""
    if not AXE_JS.exists():
        pytest.fail(f"{AXE_JS} is missing: run `bash scripts/install-axe.sh` (make test does)")
    return AXE_JS.read_text()


def axe_violations(page: Page, *, impacts: tuple[str, ...] = BLOCKING_IMPACTS) -> list[dict]:
    """axe-core's violations of the given impacts on the page as it is now: id, impact, help, targets.

    `add_script_tag` would be refused by the page's policy (an inline script without its nonce),
    so the library is evaluated through the DevTools protocol instead.
    """
    if page.evaluate("() => typeof window.axe") != "object":
        page.evaluate(axe_source())
    return page.evaluate(
        """async (impacts) => {
            const result = await axe.run(document, {resultTypes: ['violations']});
            return result.violations.filter(v => impacts.includes(v.impact)).map(v => ({
                id: v.id, impact: v.impact, help: v.help,
                targets: v.nodes.map(n => n.target.join(' ')),
                summary: v.nodes[0] ? v.nodes[0].failureSummary : ''}));
        }""", list(impacts))


def describe_violations(violations: list[dict]) -> str:
    return "\n".join(f"  {v['impact']} {v['id']} ({v['help']}): {', '.join(v['targets'][:6])}\n"
                     f"    {v['summary'].splitlines()[-1].strip() if v['summary'] else ''}" for v in violations)


# --- screenshots ---------------------------------------------------------------------------


def screenshot(page: Page, name: str) -> Path:
    """test-artifacts/chat-NAME.png: the window as a person sees it."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"chat-{name}.png"
    page.screenshot(path=str(path))
    return path

