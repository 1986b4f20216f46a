"""`GET /join`: the page that makes a browser tab a mesh member (static files in `static/join/`, plain ES
modules, no bundler, nothing fetched from elsewhere at run time).

The invite travels in the URL fragment (`/join#shoal1-…`), which browsers never send to a server; the page
joins with the same signed signalling as native nodes (`/v1/mesh/signal`, same origin) and chats through
`/v1/chat/completions` (same origin, so the API guard's Origin check passes as for any same-origin page; no
CORS is opened). The page itself holds nothing secret, so it is served without the API key (`PATHS` join
`app.OPEN_PATHS`), and it gets no power a page could not get anyway: joining needs the invite, chatting from
another device needs the node's API key.

The tab also serves offloaded requests for the default model with wllama (llama.cpp in WebAssembly,
`serve.js`), which `scripts/install_wllama.sh` vendors into `static/join/vendor/wllama/` (git-ignored):
`VENDOR` lists the files served from there, as they are on disk (none: the page joins and chats, and says it
does not compute). The CSP allows what that needs and nothing more: `'wasm-unsafe-eval'` (compiling the wasm)
and `blob:` workers (wllama starts its worker from a Blob of its own code); everything else stays `'self'`.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web
from shoal.mesh.api.errors import ApiError

STATIC = Path(__file__).resolve().parent / "static" / "join"
ASSETS: dict[str, str] = {
    "index.html": "text/html",
    "join.js": "text/javascript",
    "crypto.js": "text/javascript",
    "link.js": "text/javascript",
    "member.js": "text/javascript",
    "mesh.js": "text/javascript",
    "ipfs.js": "text/javascript",
    "serve.js": "text/javascript",
    "kept.js": "text/javascript",
    "join.css": "text/css",
}
VENDOR: dict[str, str] = {
    "wllama/index.js": "text/javascript",
    "wllama/wllama.wasm": "application/wasm",
    "wllama/LICENCE": "text/plain",
}
"""Vendored files (`static/join/vendor/`), served when present."""
PATHS = frozenset({"/join", *(f"/join/{name}" for name in ASSETS if name != "index.html"),
                   *(f"/join/vendor/{name}" for name in VENDOR)})
"""The page's paths (served without the API key)."""
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self' 'wasm-unsafe-eval'; worker-src blob:; "
    "style-src 'self'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


def _load() -> dict[str, bytes]:
    return {name: (STATIC / name).read_bytes() for name in ASSETS}


def add_routes(app: web.Application) -> None:
    """Serve the join page and its modules (read once, when the app is built)."""
    files = _load()

    def serve(name: str) -> web.Response:
        response = web.Response(body=files[name], content_type=ASSETS[name], headers=HEADERS)
        response.charset = "utf-8"
        return response

    async def page(request: web.Request) -> web.Response:
        return serve("index.html")

    async def asset(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in files or name == "index.html":
            raise web.HTTPNotFound(text=f"no such file of the join page: {name[:80]}")
        return serve(name)

    async def vendored(request: web.Request) -> web.StreamResponse:
        name = f"{request.match_info['package']}/{request.match_info['name']}"
        path = STATIC / "vendor" / name
        if name not in VENDOR or not path.is_file():
            raise ApiError(404, f"not vendored on this node: {name[:80]} (scripts/install_wllama.sh)",
                           code="not_vendored")
        response = web.FileResponse(path, headers={**HEADERS, "Content-Type": VENDOR[name],
                                                   "Cache-Control": "public, max-age=86400"})
        return response

    app.router.add_get("/join", page)
    app.router.add_get("/join/{name}", asset)
    app.router.add_get("/join/vendor/{package}/{name}", vendored)
