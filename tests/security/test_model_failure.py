"""A model that cannot load: the page says why once loading ends, and Send stays off with a reason."""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect

from tests.app_process import running_app

pytestmark = pytest.mark.browser


def test_asking_for_cuda_on_a_cpu_only_torch_ends_loading_with_the_cause(tmp_path, app_browser, app_screenshot):
    with running_app(tmp_path / "data", "--device", "cuda", name="cuda-on-cpu") as app:
        context = app_browser.new_context(viewport={"width": 1280, "height": 900})
        context.set_default_timeout(30_000)
        page = context.new_page()
        page.goto(app.url)
        banner = page.locator("#model-status")
        expect(banner).to_contain_text("could not be loaded")
        expect(banner).to_contain_text(re.compile(r"--device cpu|--device auto"))  # local: the cause is shown
        expect(banner).not_to_contain_text("Loading the model")
        expect(page.locator("#model-runs-on")).to_be_hidden()  # no model: no line saying what runs it
        send = page.locator("#send-button")
        expect(send).to_be_disabled()
        expect(send).to_contain_text("no model")
        page.locator("#chat-input textarea").fill("hello?")
        page.locator("#chat-input textarea").press("Enter")
        notice = page.locator("#composer-notice p.notice")  # by the composer, not a toast over the chat
        expect(notice).to_contain_text("could not be loaded")
        expect(page.locator("#chat-input textarea")).to_have_value("hello?")  # nothing typed is lost
        assert page.locator("[data-testid=toast-body]").count() == 0
        assert page.locator("#conversation-list label").count() == 0  # nothing was stored
        app_screenshot(page, "security-model-failed")
        context.close()
