"""The HTTP layer in front of Gradio: same-origin only, login on every data route, security
headers, upload limits and the temporary-file directory.

`launch.py` calls `prepare_temp_dir` before gradio is imported and passes `app_kwargs` to
`launch()`.
"""

from app.web.files import prepare_temp_dir, stored_photo_lookup
from app.web.install import app_kwargs
from app.web.policy import WebPolicy

__all__ = ["WebPolicy", "app_kwargs", "prepare_temp_dir", "stored_photo_lookup"]
