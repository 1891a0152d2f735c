"""How the guard gets in front of Gradio while `gr.Blocks.launch()` still builds and runs the app.

`launch()` creates the FastAPI app, adds Gradio's CORS and compression middleware as the
outermost layers, and starts uvicorn, which runs the app's lifespan before it accepts a
single connection. The lifespan passed through `launch(app_kwargs={"lifespan": ...})` is
therefore the first moment the app exists and the last one before traffic: there the
middleware stack is rebuilt with the guard outermost, and the temp-file sweeper starts.
`--share` and Spaces keep working because everything still goes through `launch()`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import BaseRoute

from app.settings import Settings
from app.web.files import files_in, sweep
from app.web.guard import WebGuard
from app.web.policy import WebPolicy

log = logging.getLogger(__name__)

MAX_SWEEP_INTERVAL_S = 300.0


def app_kwargs(settings: Settings, *, photo_exists: Callable[[str], bool],
               inner: Sequence[Middleware] = (), routes: Sequence[BaseRoute] = ()) -> dict[str, Any]:
    """`launch(app_kwargs=...)`: the guard and the sweeper start with the app; no FastAPI schema page.

    `inner` middleware runs right inside the guard (first listed outermost), still outside
    Gradio's own. `routes` (the shared-conversation pages) are matched before Gradio's routes,
    behind the same guard.
    """
    policy = WebPolicy.from_settings(settings)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        app.router.routes[0:0] = routes
        install_guard(app, policy=policy, photo_exists=photo_exists, inner=inner)
        sweeper = asyncio.create_task(_sweep_forever(policy.temp_dir, max_age_s=policy.temp_max_age_s,
                                                     keep=files_in(policy.temp_dir)))
        try:
            yield
        finally:
            sweeper.cancel()

    return {"lifespan": lifespan, "openapi_url": None}


def install_guard(app: Starlette, *, policy: WebPolicy, photo_exists: Callable[[str], bool],
                  inner: Sequence[Middleware] = ()) -> None:
    """Rebuild `app`'s middleware stack with the guard, then `inner`, outside Gradio's middleware.

    Starlette builds the stack on the app's first call (the lifespan startup itself) and
    refuses `add_middleware` afterwards, so the built stack is dropped and built again.
    """
    app.middleware_stack = None
    for middleware in reversed(inner):
        app.add_middleware(middleware.cls, *middleware.args, **middleware.kwargs)
    app.add_middleware(WebGuard, policy=policy, photo_exists=photo_exists)
    app.middleware_stack = app.build_middleware_stack()
    log.info("HTTP guard installed: same-origin only, security headers, upload limits%s",
             ", login required" if policy.auth_required else "")


async def _sweep_forever(temp_dir: Path, *, max_age_s: float, keep: frozenset[Path]) -> None:
    interval = min(MAX_SWEEP_INTERVAL_S, max_age_s / 2)
    while True:
        await asyncio.sleep(interval)
        try:
            removed = await asyncio.to_thread(sweep, temp_dir, max_age_s=max_age_s, keep=keep)
        except OSError as e:  # e.g. a file made unreadable by hand: try again next round
            log.warning("could not sweep the temporary directory %s: %s", temp_dir, e)
            continue
        if removed:
            log.info("deleted %d temporary files older than %.0f minutes", removed, max_age_s / 60)
