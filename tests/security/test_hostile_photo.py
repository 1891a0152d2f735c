"""A 5 KB PNG of 65535×610 pixels, sent to the real server: bounded memory and a sentence, never an OOM."""

from __future__ import annotations

import json
import secrets
from contextlib import closing
from pathlib import Path

import httpx
import pytest
from PIL import Image, ImageDraw

from tests.app_process import running_app
from tests.security.gradio_protocol import chained, data_for, dependency, output_of, run_event

pytestmark = pytest.mark.slow

MEMORY_BUDGET = 1024**3  # above the idle server


def wide_png(path: Path) -> Path:
    image = Image.new("1", (65535, 610), 1)
    ImageDraw.Draw(image).rectangle((30000, 200, 35000, 400), fill=0)
    image.save(path, optimize=True)
    return path


def status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise LookupError(field)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to reset peak memory")
def test_a_huge_canvas_photo_is_handled_within_a_fixed_memory_budget(tmp_path):
    photo = wide_png(tmp_path / "wide.png")
    assert photo.stat().st_size < 20_000
    with running_app(tmp_path / "data", name="hostile-photo") as app, \
            closing(httpx.Client(base_url=app.url, timeout=300)) as client:
        client.get("")
        config = client.get("config").json()
        pid = app.process.pid
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # peak memory from here on
        idle_kb = status_kb(pid, "VmRSS")
        with photo.open("rb") as f:
            (uploaded,) = client.post("gradio_api/upload", files={"files": ("wide.png", f, "image/png")}).json()
        session = secrets.token_hex(6)
        ask = dependency(config, elem_id="chat-input", event="submit")
        message = {"text": "What is in this panorama?",
                   "files": [{"path": uploaded, "orig_name": "wide.png", "meta": {"_type": "gradio.FileData"}}]}
        params = {"Temperature": 0.0, "Top-p": 1.0, "Max new tokens": 16}
        asked = run_event(client, ask, data_for(config, ask, {"chat-input": message, **params}), session_hash=session,
                          timeout=300)
        reply = chained(config, after=ask)  # follows the reply the question started on the server
        replied = (run_event(client, reply, data_for(config, reply, {}), session_hash=session, timeout=300)
                   if asked.get("success") else asked)
        peak_kb = status_kb(pid, "VmHWM")
    grown = (peak_kb - idle_kb) * 1024
    assert grown < MEMORY_BUDGET, f"the server grew by {grown / 1e6:.0f} MB"
    assert asked.get("success") is True, asked  # the panorama is a photo like any other: stored and answered
    assert replied.get("success") is True, replied
    assert "Traceback" not in json.dumps(replied) and "MemoryError" not in json.dumps(replied)
    assert output_of(config, ask, asked, "composer-notice") in ("", None), asked  # no refusal by the composer
    shown_photo, question, answer = output_of(config, reply, replied, "chatbot")
    assert shown_photo["content"][0]["file"]["path"].endswith(".png")  # stored (cleaned) and shown
    assert "What is in this panorama?" in json.dumps(question) and "reply-footer" in json.dumps(answer)
