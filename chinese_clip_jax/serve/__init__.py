"""The search service over what ``ccj-embed`` wrote (``ccj-serve``; guide: docs/serving.md).

    from chinese_clip_jax import serve
    service = serve.Service.load("emb")          # the runs of emb/, their model, compiled
    from chinese_clip_jax.serve.app import create_app   # the serve extra: FastAPI
    app = create_app(service)                    # an ASGI app: run it with uvicorn

Modules: ``catalog`` (the runs and their indexes, change detection), ``batcher`` (micro-batching
concurrent queries), ``queries`` (texts and uploads -> embeddings), ``sources`` (source images
and thumbnails by id), ``service`` (all of it, without HTTP), ``app`` (the HTTP API and the page
in ``static/``), ``cli``. The HTTP part needs the ``serve`` extra (FastAPI, uvicorn).
"""

from .batcher import Busy, MicroBatcher
from .catalog import Catalog, Run, ServeError
from .service import ServeOptions, Service

__all__ = ["Busy", "MicroBatcher", "Catalog", "Run", "ServeError", "ServeOptions", "Service"]
