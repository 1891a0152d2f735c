"""The OpenAI-compatible `/v1` API on the app's own server (on only with `--api-key`)."""

from app.api.keys import ApiKeys
from app.api.routes import api_routes, served_model_name

__all__ = ["ApiKeys", "api_routes", "served_model_name"]
