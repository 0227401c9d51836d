"""The tenant dashboard: `GET /ui` (one static page), its assets, and `GET /` redirecting there.

The page holds no data and needs no key to load. It asks for the tenant's API key (kept in the
browser's localStorage; also accepted once as `/ui#key=...`: a URL fragment never reaches the
server, so keys never appear in access logs) and calls the JSON API with `Authorization: Bearer`.
Charts are drawn by plotly.js, served from the `plotly` Python package installed with the
service: no CDN, the page works offline, and its Content-Security-Policy keeps it to this origin.
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.metadata
from importlib import resources
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from starlette.concurrency import run_in_threadpool

from api.errors import APIError

router = APIRouter(include_in_schema=False)

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
ASSETS = {"dashboard.js": "text/javascript; charset=utf-8", "dashboard.css": "text/css"}
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        # plotly.js styles its SVG through style attributes and one injected <style> element
        "style-src 'self' 'unsafe-inline'",
        "img-src 'self' data: blob:",
        "font-src 'self' data:",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "Cache-Control": "no-cache",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}
ASSET_HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
IMMUTABLE = "public, max-age=31536000, immutable"


@router.get("/")
async def root(request: Request) -> RedirectResponse:
    """The service's front door is the dashboard."""
    return RedirectResponse(f"{request.scope.get('root_path', '')}/ui", status_code=307)


@router.get("/ui")
async def dashboard(request: Request) -> HTMLResponse:
    """The dashboard page (jobs, live metric charts, events, checkpoints, adapter download)."""
    page = _page(str(request.scope.get("root_path", "")), _plotly_version())
    return HTMLResponse(page, headers=PAGE_HEADERS)


@router.get("/ui/assets/plotly.min.js")
async def plotly_js(
    request: Request,
    v: Annotated[
        str | None,
        Query(max_length=64, description="The plotly version the page asks for (a cache key)"),
    ] = None,
) -> Response:
    """plotly.js from the installed `plotly` package (gzipped once, cached by version).

    The page names the version in `?v=` so a browser's immutable cache entry ends with an
    upgrade; the bundle served is always the installed one.
    """
    raw, packed = await run_in_threadpool(_plotly_bundle)  # first call reads and compresses
    headers = {**ASSET_HEADERS, "Cache-Control": IMMUTABLE, "Vary": "Accept-Encoding"}
    if "gzip" in request.headers.get("accept-encoding", ""):
        return Response(
            packed,
            media_type="text/javascript",
            headers={**headers, "Content-Encoding": "gzip"},
        )
    return Response(raw, media_type="text/javascript", headers=headers)


@router.get("/ui/assets/{name}")
async def asset(name: str) -> Response:
    """The dashboard's own script and stylesheet."""
    if name not in ASSETS:
        raise APIError(404, "not_found", f"no asset {name!r}")
    return Response(_read_asset(name), media_type=ASSETS[name], headers=ASSET_HEADERS)


@functools.cache
def _read_asset(name: str) -> bytes:
    return (STATIC_DIR / name).read_bytes()


@functools.cache
def _page(root_path: str, plotly_version: str) -> str:
    template = (STATIC_DIR / "dashboard.html").read_text(encoding="utf-8")
    return template.replace("{{ROOT}}", html.escape(root_path, quote=True)).replace(
        "{{PLOTLY_VERSION}}", html.escape(plotly_version, quote=True)
    )


@functools.cache
def _plotly_version() -> str:
    try:
        return importlib.metadata.version("plotly")
    except importlib.metadata.PackageNotFoundError:
        return "missing"


@functools.cache
def _plotly_bundle() -> tuple[bytes, bytes]:
    """(plotly.min.js, its gzip) from the `plotly` package's bundled copy."""
    try:
        source = resources.files("plotly") / "package_data" / "plotly.min.js"
        raw = source.read_bytes()
    except (ModuleNotFoundError, FileNotFoundError):
        try:
            from plotly.offline import get_plotlyjs
        except ModuleNotFoundError:
            raise APIError(
                503,
                "dashboard_unavailable",
                "the dashboard's charts need the plotly package: pip install 'opsd[api]'",
            ) from None
        raw = get_plotlyjs().encode()
    return raw, gzip.compress(raw, compresslevel=6, mtime=0)
