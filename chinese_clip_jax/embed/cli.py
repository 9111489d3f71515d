"""``ccj-embed``: embed a corpus into sharded files, optionally index it; query the index.

    ccj-embed --model SRC (--images SPEC | --texts FILE) --out DIR [--index]
        [--shard-size 10000] [--batch-size 256] [--dtype {float16,float32}] [--crop {center,squash}]
        [--workers 0] [--threads 2] [--context-length 52] [--compute-dtype {float32,bfloat16}]
        [--index-kind {flat,hnsw}] [--no-progress]
        [--coordinator HOST:PORT --num-processes N --process-id I]
    ccj-embed query DIR (--text T ... | --image PATH ...) [--kind images] [-k 10] [--model SRC]

(module form: ``python -m chinese_clip_jax.embed``). SRC: anything ``ccj.from_pretrained``
reads. SPEC / FILE: see ``corpus``; DIR's files: see ``store``. Rerun the same command after a
kill: finished shards are kept. Multi-host: every host runs the same command (``jax.distributed``
reads TPU / SLURM / Open MPI environments, or pass ``--coordinator`` ...); each embeds its share.
Bad input (a missing folder, a manifest written with other arguments) is a one-line error and
exit status 2, before the model is loaded.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

from ..data.bad_records import max_bad_limit, skipped_line, too_many
from ..data.readers import open_images, read_texts
from ..data.sets import DatasetError
from .runner import DTYPES, EmbedOptions, embed_images, embed_texts
from .store import PLAN_KEYS, EmbedError, Store

__all__ = ["main"]

_CLUSTER_ENV = ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "OMPI_COMM_WORLD_SIZE")


def _embed_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ccj-embed", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="anything ccj.from_pretrained reads")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--images",
        help="a data-set spec (docs/data.md): folder:PATH, list:FILE, files:TABLE, cn_clip:ROOT[@SPLIT], "
        "webdataset:SHARDS, tfds:NAME[@SPLIT], tfds-dir:PATH[@SPLIT], or a path (split default: train)",
    )
    src.add_argument("--texts", help="a .jsonl of {text_id, text} or a text file, one text per line")
    p.add_argument("--encoding", default="utf-8", help="of --texts, a list: file or a table (default utf-8)")
    p.add_argument("--max-bad", type=int, help="unreadable records tolerated before the run fails (default: 1%%, >= 5)")
    p.add_argument("--out", required=True, help="output directory (local or gs://)")
    p.add_argument("--index", action="store_true", help="build a faiss index over the embeddings")
    p.add_argument("--index-kind", choices=("flat", "hnsw"), default="flat", help="flat: exact; hnsw: approximate")
    d = EmbedOptions()
    p.add_argument("--shard-size", type=int, default=d.shard_size, help="records per output shard")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="records per device step")
    p.add_argument("--dtype", choices=DTYPES, default=d.dtype, help="stored embeddings")
    p.add_argument("--crop", choices=("center", "squash"), default=d.crop, help="image resize (squash: cn_clip's)")
    p.add_argument("--workers", type=int, default=d.workers, help="grain worker processes decoding images")
    p.add_argument("--threads", type=int, default=d.threads, help="grain reader threads")
    p.add_argument("--context-length", type=int, default=d.context_length, help="text tokens")
    p.add_argument("--compute-dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--coordinator", help="multi-host: HOST:PORT of process 0 (jax.distributed)")
    p.add_argument("--num-processes", type=int)
    p.add_argument("--process-id", type=int)
    return p


def _query_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ccj-embed query", description="top-k ids of an indexed run for texts or images")
    p.add_argument("out", help="a ccj-embed output directory with an index")
    p.add_argument("--text", action="append", default=[], help="a query text (repeatable)")
    p.add_argument("--image", action="append", default=[], help="a query image path (repeatable)")
    p.add_argument("--kind", choices=("images", "texts"), default="images", help="which run of DIR to search")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--model", help="default: the run's model (its manifest)")
    return p


def _initialize_distributed(args) -> None:
    import jax

    if args.coordinator:
        jax.distributed.initialize(
            coordinator_address=args.coordinator, num_processes=args.num_processes, process_id=args.process_id
        )
    elif any(k in os.environ for k in _CLUSTER_ENV):
        jax.distributed.initialize()


def _model_name(src: str) -> str:
    """The manifest's ``model``: a local path made absolute, anything else (a hub id) as given."""
    return os.path.abspath(src) if os.path.exists(src) else src


def _precheck(store: Store, known: dict) -> None:
    """Before the model is loaded: the plan keys known without it against an existing manifest."""
    existing = store.read_manifest()
    for key in PLAN_KEYS:
        if existing is not None and key in known and existing.get(key) != known[key]:
            raise EmbedError(
                f"{store.manifest_path} was written for {key}={existing.get(key)!r}, this run has "
                f"{key}={known[key]!r}: use another --out, or the same arguments to resume"
            )


def _embed(argv: Sequence[str]) -> int:
    args = _embed_parser().parse_args(argv)
    options = EmbedOptions(
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        dtype=args.dtype,
        crop=args.crop,
        workers=args.workers,
        threads=args.threads,
        context_length=args.context_length,
        progress=not args.no_progress,
    )
    kind = "images" if args.images else "texts"
    try:
        options.check()
        if args.images:
            corpus = open_images(args.images, encoding=args.encoding)
        else:
            corpus = read_texts(args.texts, encoding=args.encoding)
        store = Store(args.out, kind)
        known = {
            "kind": kind,
            "input": corpus.source,
            "model": _model_name(args.model),
            "num_records": len(corpus),
            "shard_size": options.shard_size,
            "dtype": options.dtype,
        }
        _precheck(store, known)
        if args.index:
            from .index import _faiss

            _faiss()
    except (DatasetError, EmbedError, ValueError, ImportError) as e:
        return _fail(e)
    _initialize_distributed(args)
    import jax
    import jax.numpy as jnp

    from ..conversion import CheckpointError, from_pretrained

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        model, params = from_pretrained(args.model, jnp.bfloat16 if args.compute_dtype == "bfloat16" else jnp.float32)
        run = embed_images if kind == "images" else embed_texts
        report = run(model, params, corpus, args.out, model_name=_model_name(args.model), options=options)
    except (CheckpointError, EmbedError, FileNotFoundError, ValueError) as e:
        return _fail(e)
    print(f"process {jax.process_index()}: {report.line()}", file=sys.stderr, flush=True)
    if report.manifest is not None and _too_many_bad(store, report.manifest, args.max_bad):
        store.reopen(report.manifest)  # over the cap: the run does not stay marked complete
        return 1
    if report.manifest is not None:  # process 0, every shard written
        if args.index:
            from .index import build_index

            print(f"index: {build_index(args.out, kind, index_kind=args.index_kind)}", file=sys.stderr)
        print(json.dumps(report.manifest, ensure_ascii=False, sort_keys=True))
    return 0


def _query(argv: Sequence[str]) -> int:
    args = _query_parser().parse_args(argv)
    from .index import query

    try:
        hits = query(args.out, texts=args.text, images=args.image, kind=args.kind, k=args.k, model=args.model)
    except (EmbedError, ValueError, ImportError, FileNotFoundError) as e:
        return _fail(e)
    for q, row in zip([*args.text, *args.image], hits):
        print(json.dumps({"query": q, "hits": [{"id": i, "score": round(s, 6)} for i, s in row]}, ensure_ascii=False))
    return 0


def _too_many_bad(store: Store, manifest: dict, max_bad: int | None) -> bool:
    """The bad-record policy (``data.bad_records``): a warning line when records were skipped
    (all listed in DIR/KIND-bad.jsonl); True (after an error line) when more than the cap."""
    n_bad, n = int(manifest.get("bad", 0) or 0), int(manifest.get("num_records", 0) or 0)
    if not n_bad:
        return False
    listed = store.path("-bad.jsonl")
    try:
        first = json.loads(listed.read_text(encoding="utf-8").splitlines()[0])
        first = f"{first['id']}: {first['why']}"
    except (OSError, ValueError, IndexError, KeyError):
        first = "see the list"
    limit = max_bad_limit(max_bad, n)
    if n_bad > limit:
        print(f"error: {too_many(n_bad, n, limit, first)} (all listed in {listed})", file=sys.stderr)
        return True
    print(skipped_line(n_bad, n, first, listed=str(listed)), file=sys.stderr)
    return False


def _fail(e: BaseException) -> int:
    text = str(e).strip()
    print(f"error: {text.splitlines()[0] if text else type(e).__name__}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """``ccj-embed`` (and ``ccj-embed query``); returns the exit status (0 ok, 2 bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "query":
        return _query(argv[1:])
    return _embed(argv)


if __name__ == "__main__":
    sys.exit(main())
