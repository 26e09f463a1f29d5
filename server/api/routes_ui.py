"""The playground page: static files shipped in the package (server/ui/), served under /ui.

The page is plain HTML, CSS and ES modules with no build step and nothing fetched from elsewhere;
it calls the public API like any client, with the key the user gives it. Every response here
carries a Content-Security-Policy that allows same-origin scripts, styles and requests only (no
inline code), so an injected string in an adapter name or a model's output cannot run.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse, Response

from server.api.errors import error_response

UI_DIR = Path(__file__).resolve().parent.parent / "ui"
# The files are known when the package is built: a fixed name -> path table, so no request path reaches the disk.
FILES = {p.name: p for p in sorted(UI_DIR.iterdir()) if p.is_file()} if UI_DIR.is_dir() else {}
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "Cache-Control": "no-cache"}

router = APIRouter(tags=["ui"], include_in_schema=False)


@router.api_route("/", methods=["GET", "HEAD"])
def root() -> RedirectResponse:
    return RedirectResponse("/ui", status_code=307)


@router.api_route("/ui", methods=["GET", "HEAD"])
def page() -> Response:
    return _file("index.html")


@router.api_route("/ui/{name}", methods=["GET", "HEAD"])
def asset(name: str) -> Response:
    return _file(name)


def _file(name: str) -> Response:
    path = FILES.get(name)
    if path is None:
        return error_response(404, f"the playground has no file {name!r}")
    return FileResponse(path, headers=HEADERS)
