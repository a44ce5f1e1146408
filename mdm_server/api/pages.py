"""The pages: the device user's portal (``/portal/``) and the admin console
(``/console/``), static files of ``mdm_server/web`` served by the API's own server.

Plain HTML, CSS and JavaScript modules: no build step, nothing fetched from another
origin. ``web/common`` (the API client and the small UI helpers both pages use) is
served under each page's prefix, ``/portal/common/...`` and ``/console/common/...``,
so each page is self-contained under its own path.

Only the files found when the routes are made are served (a fixed table, read once):
no path from a request ever reaches the file system. Every answer carries a
Content-Security-Policy that allows this origin only, no inline script or style,
no framing; tokens are never in a URL (the pages keep them in sessionStorage).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from aiohttp.typedefs import Handler

__all__ = ["SECURITY_HEADERS", "WEB_ROOT", "routes"]

WEB_ROOT = Path(__file__).resolve().parent.parent / "web"
_PAGES = ("portal", "console")
_COMMON = "common"
_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".json": "application/json",
}

#: Same origin only. No 'unsafe-inline' anywhere: scripts are modules from files,
#: styles come from stylesheets (the scripts set no style attributes).
CSP = "; ".join((
    "default-src 'self'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self' data: blob:",
    "connect-src 'self'",
    "font-src 'self'",
    "object-src 'none'",
    "base-uri 'none'",
    "form-action 'self'",
    "frame-ancestors 'none'",
))

SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=()",
}


@dataclass(frozen=True, slots=True)
class _File:
    body: bytes
    content_type: str
    etag: str


def _load(directory: Path, prefix: str, into: dict[str, _File]) -> None:
    if not directory.is_dir():
        return
    for path in sorted(directory.rglob("*")):
        content_type = _TYPES.get(path.suffix)
        if not path.is_file() or content_type is None:
            continue
        body = path.read_bytes()
        rel = path.relative_to(directory).as_posix()
        into[prefix + rel] = _File(body, content_type,
                                   '"' + hashlib.sha256(body).hexdigest()[:32] + '"')


def load_files(root: Path = WEB_ROOT) -> dict[str, _File]:
    """URL path -> file, for every page file and the shared ones under each page."""
    files: dict[str, _File] = {}
    for page in _PAGES:
        _load(root / page, f"/{page}/", files)
        _load(root / _COMMON, f"/{page}/{_COMMON}/", files)
    for page in _PAGES:
        if f"/{page}/index.html" in files:
            files[f"/{page}/"] = files[f"/{page}/index.html"]
    return files


def _handler(files: dict[str, _File]) -> Handler:
    async def serve(request: web.Request) -> web.StreamResponse:
        f = files.get(request.path)
        if f is None:
            raise web.HTTPNotFound(reason="no such page")
        headers = {**SECURITY_HEADERS, "ETag": f.etag, "Cache-Control": "no-cache"}
        if request.headers.get("If-None-Match") == f.etag:
            return web.Response(status=304, headers=headers)
        return web.Response(body=f.body, headers={**headers, "Content-Type": f.content_type})

    return serve


async def _to_slash(request: web.Request) -> web.StreamResponse:
    raise web.HTTPPermanentRedirect(request.path + "/", headers=SECURITY_HEADERS)


async def _to_console(request: web.Request) -> web.StreamResponse:
    """``/``: the server's front door is the console (its sign-in asks for a token)."""
    raise web.HTTPFound("/console/", headers=SECURITY_HEADERS)


def _favicon(files: dict[str, _File]) -> Handler:
    """``/favicon.ico``, which browsers ask for whatever the page links: the pages' own
    icon (an SVG, as its Content-Type says), rather than a 404 in every log."""
    icon = files.get(f"/{_PAGES[0]}/{_COMMON}/favicon.svg")

    async def serve(request: web.Request) -> web.StreamResponse:
        if icon is None:
            raise web.HTTPNotFound(reason="no icon")
        return web.Response(body=icon.body, headers={
            **SECURITY_HEADERS, "ETag": icon.etag, "Cache-Control": "max-age=86400",
            "Content-Type": icon.content_type})

    return serve


def routes(root: Path = WEB_ROOT) -> list[web.RouteDef]:
    files = load_files(root)
    serve = _handler(files)
    out: list[web.RouteDef] = [web.get("/", _to_console),
                               web.get("/favicon.ico", _favicon(files))]
    for page in _PAGES:
        out += [web.get(f"/{page}", _to_slash),
                web.get(f"/{page}/{{path:.*}}", serve)]
    return out
