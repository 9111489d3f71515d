"""``ccj-serve``: the search service over a ``ccj-embed`` output directory (guide: docs/serving.md).

    ccj-serve --embeddings DIR [--model SRC] [--host 127.0.0.1] [--port 8000]
        [--max-batch 16] [--max-wait-ms 5] [--max-queue 256] [--max-upload-mb 10] [--no-warm-up]

(module form: ``python -m chinese_clip_jax.serve``). DIR: ``ccj-embed --out`` (an images run,
a texts run, or both). SRC: anything ``ccj.from_pretrained`` reads; default the runs' model.
Binds to 127.0.0.1 unless ``--host`` says otherwise. A directory that is not a finished
ccj-embed output is a one-line error and exit status 2, before the model is loaded.
"""

from __future__ import annotations

import argparse
import socket
import sys
import threading
import time
from collections.abc import Sequence

__all__ = ["main", "MAX_REQUEST_LINE"]

MAX_REQUEST_LINE = 256 * 1024  # h11's buffer for a request's head: a 10,000-character query fits


def _parser() -> argparse.ArgumentParser:
    from .service import ServeOptions

    d = ServeOptions()
    p = argparse.ArgumentParser(prog="ccj-serve", description=__doc__.split("\n")[0])
    p.add_argument("--embeddings", required=True, help="a ccj-embed --out directory")
    p.add_argument("--model", help="anything ccj.from_pretrained reads (default: the runs' model)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=d.max_batch, help="queries per device call")
    p.add_argument("--max-wait-ms", type=float, default=d.max_wait_ms, help="how long a batch waits to fill")
    p.add_argument("--max-queue", type=int, default=d.max_queue, help="queries waiting before 503")
    p.add_argument("--max-upload-mb", type=float, default=d.max_upload_bytes / 2**20, help="largest image upload")
    p.add_argument("--no-warm-up", action="store_true", help="compile on the first queries instead of at start-up")
    return p


def _check_extra() -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise ImportError(f"ccj-serve needs FastAPI and uvicorn: pip install 'chinese-clip-jax[serve]' ({e})") from e


def _check_address(host: str, port: int) -> None:
    """Before the model loads: a port out of range or already taken is a one-line error."""
    if not 0 <= port < 65536:
        raise ValueError(f"--port must be 0..65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ValueError(f"--host {host}: {e.strerror}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            s.bind(address)
        except OSError as e:
            raise ValueError(f"--host {host} --port {port}: cannot bind ({e.strerror})") from None


def _say_when_listening(server, url: str) -> None:
    while not server.started and not server.should_exit:
        time.sleep(0.05)
    if server.started:
        print(f"ccj-serve: listening on {url}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the service until interrupted; returns the exit status (2: bad input)."""
    args = _parser().parse_args(argv)
    from ..embed import EmbedError
    from .service import ServeOptions, Service

    options = ServeOptions(
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue,
        max_upload_bytes=int(args.max_upload_mb * 2**20),
        warm_up=not args.no_warm_up,
    )
    try:
        _check_extra()
        options.check()
        _check_address(args.host, args.port)
        service = Service.load(args.embeddings, args.model, options)
    except (EmbedError, ValueError, ImportError, OSError) as e:
        text = str(e).strip()
        print(f"error: {text.splitlines()[0] if text else type(e).__name__}", file=sys.stderr)
        return 2
    import uvicorn

    from .app import create_app

    for line in service.loaded():
        print(f"ccj-serve: {line}", file=sys.stderr, flush=True)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"ccj-serve: bound to {args.host}: reachable from other machines, with no authentication",
            file=sys.stderr,
            flush=True,
        )
    config = uvicorn.Config(
        create_app(service),
        host=args.host,
        port=args.port,
        log_level="warning",
        h11_max_incomplete_event_size=MAX_REQUEST_LINE,
    )
    server = uvicorn.Server(config)
    threading.Thread(target=_say_when_listening, args=(server, f"http://{args.host}:{args.port}/"), daemon=True).start()
    try:
        server.run()
    finally:
        service.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
