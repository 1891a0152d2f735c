"""The page: regions built by small functions (`regions`), one mapping from a `PageView` to
component updates (`page`), and the events that connect them (`wiring`). Handlers live in
`app.handlers`; the page's CSS and JavaScript are files under `assets/`.
"""

from app.ui.assets import ASSETS
from app.ui.wiring import build_app

__all__ = ["ASSETS", "build_app"]
