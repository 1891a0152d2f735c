"""The static files the page loads: its stylesheet, its script and the example photos."""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parents[2] / "assets"
EXAMPLES = (
    ("chelsea.jpg", "What animal is this, and what is it doing?"),
    ("coffee.jpg", "Describe this photo in two sentences."),
    ("astronaut.jpg", "Who might this person be? What clues are in the picture?"),
    ("rocket.jpg", "What is happening in this picture?"),
)


def page_head() -> str:
    """`<head>` additions: the stylesheet and the script, served from `assets/` (same origin, no inline code)."""
    return (f'<link rel="stylesheet" href="gradio_api/file={ASSETS / "app.css"}">'
            f'<script src="gradio_api/file={ASSETS / "app.js"}" defer></script>')


def example_messages() -> list[dict]:
    """The chat's starting suggestions: a photo and a question each (only those whose photo exists)."""
    return [{"text": question, "files": [str(ASSETS / name)]} for name, question in EXAMPLES
            if (ASSETS / name).exists()]
