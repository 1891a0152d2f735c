"""The Gradio UI of Mipha Chat: `build_app(services)` returns the page; `launch.py` serves it."""

from app.services import Services
from app.settings import Settings
from app.ui import build_app

__all__ = ["Services", "Settings", "build_app"]
