"""The web studio: a page the gateway serves at `/`, with its scripts and styles under `/studio/`.

Plain HTML, CSS and JavaScript modules from `gateway/studio/` (package data, so an installed gateway
serves them too); no build step and nothing fetched from another server. The page itself holds no
data, so it is served without an API key (the API calls it makes carry the key the user enters).
"""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

STUDIO_DIR = Path(__file__).resolve().parent / "studio"
STATIC_PREFIX = "/studio"
# Everything the page loads comes from the gateway: scripts, styles, the API, the WebSocket, and
# blob: URLs for the videos and previews it fetched with the key.
CONTENT_SECURITY_POLICY = "; ".join([
    "default-src 'self'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self' blob: data:",
    "media-src 'self' blob:",
    "connect-src 'self' blob:",  # blob: the page reading back a file it fetched
    "object-src 'none'",
    "base-uri 'none'",
    "frame-ancestors 'none'",
    "form-action 'none'",
])


def is_studio_path(path: str) -> bool:
    """The page and its files: open without a key."""
    return path == "/" or path.startswith(STATIC_PREFIX + "/")


async def index(request: Request) -> Response:
    headers = {"Content-Security-Policy": CONTENT_SECURITY_POLICY, "X-Content-Type-Options": "nosniff",
               "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}
    return FileResponse(STUDIO_DIR / "index.html", media_type="text/html; charset=utf-8", headers=headers)


def studio_routes() -> list[BaseRoute]:
    return [
        Route("/", index, methods=["GET"]),
        Mount(STATIC_PREFIX, app=StaticFiles(directory=STUDIO_DIR), name="studio"),
    ]
