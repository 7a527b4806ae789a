"""The web page at `/` and offline `/docs` + `/redoc`, all served from files shipped in the package.

FastAPI's own docs pages load Swagger UI and ReDoc from a CDN, which a Pi without internet cannot
reach; here they load the copies vendored under `api/webui/vendor/` (see its README for versions
and licences). The page (`webui/index.html`, `app.js`, `style.css`) is plain HTML/CSS/JS that calls
the service's own API; `--no-ui` leaves it out (the docs stay).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import FileResponse, HTMLResponse

from ...settings import Settings

WEBUI_DIR = Path(__file__).resolve().parent.parent / "webui"
VENDOR_DIR = WEBUI_DIR / "vendor"
PAGE_ASSETS = ("app.js", "style.css")
DOCS_ASSETS_URL = "/docs/assets"
OAUTH2_REDIRECT_URL = "/docs/oauth2-redirect"
# The browser may fetch nothing from elsewhere (ReDoc would show a logo from its CDN, for one).
PAGE_HEADERS = {"Cache-Control": "no-cache",  # revalidate (ETag): an upgraded service is seen at once
                "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:"}
DOCS_CSP = {"Content-Security-Policy": "default-src 'self' 'unsafe-inline' data: blob:"}


def _vendor_files() -> dict[str, Path]:
    """`swagger-ui/swagger-ui.css` -> its path, for every vendored file (nothing else is served)."""
    return {p.relative_to(VENDOR_DIR).as_posix(): p for p in VENDOR_DIR.rglob("*") if p.is_file()}


def _root(request: Request) -> str:
    return request.scope.get("root_path", "")


def docs_router() -> APIRouter:
    """/docs (Swagger UI), /redoc and their assets, none of them from the network."""
    router = APIRouter(include_in_schema=False)
    files = _vendor_files()

    @router.get("/docs")
    async def swagger_ui(request: Request) -> HTMLResponse:
        root, app = _root(request), request.app
        page = get_swagger_ui_html(
            openapi_url=root + app.openapi_url, title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}{DOCS_ASSETS_URL}/swagger-ui/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{DOCS_ASSETS_URL}/swagger-ui/swagger-ui.css",
            swagger_favicon_url=f"{root}{DOCS_ASSETS_URL}/swagger-ui/favicon-32x32.png",
            oauth2_redirect_url=root + OAUTH2_REDIRECT_URL,
            swagger_ui_parameters={"validatorUrl": None},  # no badge fetched from the validator site
        )
        page.headers.update(DOCS_CSP)
        return page

    @router.get(OAUTH2_REDIRECT_URL)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @router.get("/redoc")
    async def redoc(request: Request) -> HTMLResponse:
        root, app = _root(request), request.app
        page = get_redoc_html(
            openapi_url=root + app.openapi_url, title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{DOCS_ASSETS_URL}/redoc/redoc.standalone.js",
            redoc_favicon_url=f"{root}{DOCS_ASSETS_URL}/swagger-ui/favicon-32x32.png",
            with_google_fonts=False,
        )
        page.headers.update(DOCS_CSP)
        return page

    @router.get(DOCS_ASSETS_URL + "/{name:path}")
    async def docs_asset(name: str) -> FileResponse:
        path = files.get(name)
        if path is None:
            raise HTTPException(404, "Not Found")
        return FileResponse(path, headers={"Cache-Control": "public, max-age=86400"})

    return router


def page_router() -> APIRouter:
    """GET / (the page) and GET /ui/app.js, /ui/style.css."""
    router = APIRouter(include_in_schema=False)

    @router.get("/")
    async def page() -> FileResponse:
        return FileResponse(WEBUI_DIR / "index.html", media_type="text/html", headers=PAGE_HEADERS)

    @router.get("/ui/{name}")
    async def page_asset(name: str) -> FileResponse:
        if name not in PAGE_ASSETS:
            raise HTTPException(404, "Not Found")
        return FileResponse(WEBUI_DIR / name, headers=PAGE_HEADERS)

    return router


def routers(settings: Settings) -> list[APIRouter]:
    """The routers to include: the docs always, the page unless `--no-ui`."""
    return [docs_router(), page_router()] if settings.ui else [docs_router()]
