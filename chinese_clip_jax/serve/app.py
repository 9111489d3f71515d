"""The HTTP face of a ``Service``: a FastAPI app (JSON API, OpenAPI at /openapi.json, the page).

    GET  /                      the search page (static/, no build step, nothing from outside)
    GET  /search?q=...&k=10     text -> images (or POST /search with {"q": ..., "k": ...})
    POST /search/image?k=10&target=images|texts   body: the image file -> images or texts
    GET  /image?id=...          a result's source image;  GET /thumbnail?id=...  a JPEG thumbnail
    GET  /healthz               what is loaded; 503 once the index files changed underneath

Every error is a 4xx (or 503) with a one-line JSON body ``{"error": "..."}`` naming the
problem. Request handlers never block the event loop: queries wait on the micro-batchers'
futures, decoding and file reads run in the thread pool.
"""

from __future__ import annotations

import asyncio
import importlib.resources

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .batcher import Busy
from .catalog import ServeError
from .service import Service

__all__ = ["create_app"]

_IMAGE_BODY = {
    "requestBody": {
        "required": True,
        "description": "the image file itself (JPEG, PNG, ...), not a form",
        "content": {"image/*": {"schema": {"type": "string", "format": "binary"}}},
    }
}


class TextSearch(BaseModel):
    q: str = Field("", description="the query text (for queries too long for a URL)")
    k: int | None = Field(None, description="how many hits (1 .. corpus size; default 10)")


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": " ".join(str(message).split())}, status_code=status)


async def _body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes ``limit`` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ServeError(f"the upload is {int(declared)} bytes, above the limit of {limit} bytes", 413)
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            raise ServeError(f"the upload is above the limit of {limit} bytes", 413)
    return bytes(data)


def create_app(service: Service) -> FastAPI:
    from ..version import __version__

    app = FastAPI(
        title="ccj-serve",
        version=__version__,
        description=f"Chinese-CLIP search over {service.catalog.root} with {service.model_name}",
        docs_url=None,  # Swagger UI loads its scripts from a CDN: the machine may be offline
        redoc_url=None,
    )
    static = importlib.resources.files(__package__) / "static"
    app.state.service = service

    @app.exception_handler(ServeError)
    async def _serve_error(request, e: ServeError):
        return _error(e.status, str(e))

    @app.exception_handler(Busy)
    async def _busy(request, e: Busy):
        return _error(503, str(e))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        first = e.errors()[0]
        where = ".".join(str(x) for x in first.get("loc", ())[1:]) or "request"
        return _error(422, f"{where}: {first.get('msg', 'invalid')} (got {repr(first.get('input'))[:80]})")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e: StarletteHTTPException):
        return _error(e.status_code, f"{request.url.path}: {e.detail}")

    @app.exception_handler(Exception)
    async def _unexpected(request, e: Exception):  # never a stack trace to the client
        return _error(500, f"internal error: {type(e).__name__}: {e}")

    @app.middleware("http")
    async def _fresh(request: Request, call_next):
        if request.url.path != "/" and not request.url.path.startswith("/static/"):
            try:
                service.check_fresh()
            except ServeError as e:
                return _error(e.status, str(e))
        return await call_next(request)

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(str(static / "index.html"), media_type="text/html; charset=utf-8")

    app.mount("/static", StaticFiles(directory=str(static)), name="static")

    @app.get("/healthz", summary="what is loaded (503 once the index files changed)")
    async def healthz():
        return service.info()

    async def text_search(q: str, k: int | None) -> dict:
        k = service.check_k("images", k)
        query = service.queries.text_query(q)
        vector = await asyncio.wrap_future(service.queries.texts.submit(query))
        info = {"text": query.text, "tokens": query.tokens, "truncated": query.truncated}
        if query.truncated:
            info["note"] = (
                f"the query has {query.tokens} tokens; only the first {service.queries.context_length} were used"
            )
        return service.answer("images", vector, k, info)

    @app.get("/search", summary="text -> images")
    async def search(
        q: str = Query("", description="the query text (Chinese); cut to the context length"),
        k: int | None = Query(None, description="how many hits (1 .. corpus size; default 10)"),
    ):
        return await text_search(q, k)

    @app.post("/search", summary="text -> images, the query in a JSON body")
    async def search_post(body: TextSearch):
        return await text_search(body.q, body.k)

    @app.post("/search/image", summary="image -> images, or image -> texts", openapi_extra=_IMAGE_BODY)
    async def search_image(
        request: Request,
        k: int | None = Query(None, description="how many hits (1 .. corpus size; default 10)"),
        target: str = Query("images", pattern="^(images|texts)$", description="which corpus to search"),
    ):
        k = service.check_k(target, k)
        data = await _body(request, service.options.max_upload_bytes)
        pixels = await run_in_threadpool(service.queries.image_query, data)
        vector = await asyncio.wrap_future(service.queries.images.submit(pixels))
        return service.answer(target, vector, k, {"image_bytes": len(data)})

    def _sources():
        if service.sources is None:
            raise ServeError(f"no images run in {service.catalog.root}", 404)
        return service.sources

    @app.get("/image", summary="a hit's source image, by id", response_class=Response)
    def image(id: str = Query(..., description="an id of the images run")):
        data, mime = _sources().original(id)
        return Response(data, media_type=mime, headers={"Cache-Control": "max-age=3600"})

    @app.get("/thumbnail", summary="a JPEG thumbnail of a hit, by id", response_class=Response)
    def thumbnail(id: str = Query(..., description="an id of the images run")):
        return Response(_sources().thumbnail(id), media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    return app
