"""Builds a TFDS dataset directory (ArrayRecord shards) from a cn_clip split, webdataset shards or a files table.

    python -m chinese_clip_jax.data.build SRC OUT --format {cn_clip,webdataset,files} --split NAME [--num-shards N]
        [--cn-clip-format {tsv,lmdb}] [--image-key K --caption-key K] [--encoding utf-8|gbk|...]
    python -m chinese_clip_jax.data.build SPEC OUT [--split NAME] ...

SRC may be a data-set spec (docs/data.md: ``cn_clip:ROOT@SPLIT``, ``files:TABLE``,
``webdataset:SHARDS``, or a table's path), which gives ``--format`` (and the split) itself.

SRC (local or ``gs://...``): for ``cn_clip``, the directory holding ``{split}_imgs.tsv`` +
``{split}_texts.jsonl`` or cn_clip's LMDB build ``lmdb/{split}/{imgs,pairs}`` (SRC may also be
that ``lmdb`` directory), read by ``data.cn_clip``'s own readers: the layout present is used,
``--cn-clip-format`` picks one where SRC holds both, and SRC with neither is refused (exit 2)
before anything is written; a remote LMDB split is copied to a local temp dir once. For
``webdataset``, shard paths/globs/braces (as ``data.webdataset.shards``). For ``files``, a table
(``.csv``/``.tsv``/``.jsonl``) of image paths and captions (as ``data.files.table``; columns
``--image-key`` / ``--caption-key``), checked (columns, a sample of paths) before anything is
written. The formats are the sources of ``data.registry`` that can be built. OUT (local or
``gs://...``) receives ``dataset_info.json``, ``features.json`` and
``ccj-{split}.array_record-0000i-of-0000n``; ``tfds.builder_from_directory(OUT)`` reads it and
``--config.data.name=tfds --config.data.tfds.builder_dir=OUT`` trains on it. Several splits go
into one OUT by running once per split; a split that already exists is refused (nothing is
overwritten).

One record per (image, text) pair; features ``image`` (the encoded file bytes as given,
decoded on read), ``text``, ``image_id``, ``text_id``. Every image is decoded once with PIL
while building (in ``--workers`` processes): undecodable images and empty captions are skipped
and counted, and a summary is printed at the end.

How it writes without TensorFlow: ``tfds.features.FeaturesDict.serialize_example`` (tfds'
own example serializer, pure Python), ``array_record``'s ``ArrayRecordWriter`` for the shards
(written through ``io.staged_output``: into OUT, or for ``gs://...`` a local temp dir copied to
OUT once every shard is complete; a failed build removes its shards), and
``tfds.core.DatasetInfo.write_to_directory`` for the metadata, written last, so a split only
appears in OUT once its shards are complete.
"""

from __future__ import annotations

import argparse
import base64
import codecs
import io
import json
import logging
import multiprocessing
import os
import sys

from . import registry
from .tfds_source import import_tfds

__all__ = ["build", "features", "DATASET_NAME"]

logger = logging.getLogger(__name__)
DATASET_NAME = "ccj"
FORMATS = registry.build_formats()


def features():
    """The FeaturesDict of a built dataset: image (encoded bytes), text, image_id, text_id."""
    tfds = import_tfds()

    return tfds.features.FeaturesDict(
        {
            "image": tfds.features.Image(),
            "text": tfds.features.Text(),
            "image_id": tfds.features.Text(),
            "text_id": tfds.features.Text(),
        }
    )


def _check(record: dict) -> tuple[bytes | None, str]:
    """Worker: record -> (serialized example, "") or (None, "where: why")."""
    import PIL.Image

    where = record.get("where", "?")
    try:
        if record.get("error"):
            raise ValueError(record["error"])
        text = record["text"]
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"caption must be a non-empty string, got {text!r}")
        image = record["image"]
        if isinstance(image, str):
            image = base64.urlsafe_b64decode(image)  # cn_clip's encoding; plain base64 too
        with PIL.Image.open(io.BytesIO(image)) as im:
            im.load()
        ex = {"image": image, "text": text, "image_id": record["image_id"], "text_id": record["text_id"]}
        feats = _FEATURES or features()
        return feats.serialize_example(feats.encode_example(ex)), ""
    except Exception as e:  # noqa: BLE001 - a bad record is skipped and counted
        return None, f"{where}: {type(e).__name__}: {e}"


_FEATURES = None


def _init_worker():
    global _FEATURES
    _FEATURES = features()


def _existing_dataset(out_path, split: str):
    """The DatasetInfo of a dataset this command built in OUT (None for a new OUT). OUT holding
    something else (a file, another TFDS dataset, an unreadable dataset_info.json) or already
    holding ``split`` raises a one-line error: nothing there is touched."""
    tfds = import_tfds()

    from ..io import first_line

    if out_path.exists() and not out_path.is_dir():
        raise FileExistsError(f"OUT: {out_path} is a file, not a directory; choose another OUT")
    info_file = out_path / "dataset_info.json"
    if not info_file.exists():
        return None
    try:
        existing = tfds.builder_from_directory(os.fspath(out_path)).info
    except Exception as e:  # noqa: BLE001 - tfds raises many types for a damaged or foreign file
        raise ValueError(
            f"OUT: {info_file} is not a TFDS dataset_info.json this command can add to ({first_line(e)}); "
            "choose another OUT"
        ) from None
    ours = {k: type(v).__name__ for k, v in features().items()}
    theirs = {k: type(v).__name__ for k, v in existing.features.items()} if existing.features else {}
    if existing.name != DATASET_NAME or theirs != ours:
        raise FileExistsError(
            f"OUT: {out_path} holds another TFDS dataset ({existing.name!r} {existing.version}, splits "
            f"{sorted(existing.splits.keys())}, features {sorted(theirs)}), not one built by this command; "
            "choose another OUT"
        )
    if split in existing.splits:
        raise FileExistsError(f"OUT: {out_path} already holds split {split!r}; choose another OUT or split")
    return existing


def _write_shards(records, paths, workers: int, progress: bool, split: str, skipped: list, reasons: list):
    """Checks and writes ``records`` round robin into ArrayRecord shards at ``paths`` (local);
    -> (pairs written, per-shard lengths). Skipped records are counted in ``skipped[0]``."""
    from array_record.python.array_record_module import ArrayRecordWriter

    num_shards = len(paths)
    writers = [ArrayRecordWriter(os.fspath(p), "group_size:1") for p in paths]
    lengths = [0] * num_shards
    bar = None
    if progress:
        from ..console import progress_bar

        bar = progress_bar(desc=f"build {split}", unit="pair", dynamic_ncols=True, mininterval=1.0)
    pool = multiprocessing.get_context("spawn").Pool(workers, _init_worker) if workers > 1 else None
    _init_worker()
    written = 0
    try:
        results = pool.imap(_check, records, chunksize=32) if pool else map(_check, records)
        for example, why in results:
            if example is None:
                skipped[0] += 1
                if len(reasons) < 10:
                    logger.warning("build: skipping %s", why)
                reasons.append(why)
            else:
                shard = written % num_shards  # round robin: shard sizes differ by at most one
                writers[shard].write(example)
                lengths[shard] += 1
                written += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(skipped=skipped[0], refresh=False)
    finally:
        if pool:
            pool.terminate()
        for w in writers:
            w.close()
        if bar is not None:
            bar.close()
    return written, lengths


def _remove_partial(paths, created_dir) -> None:
    """Removes the shards of a build that failed (and OUT itself when this build created it empty)."""
    for p in paths:
        if os.path.lexists(p):
            os.remove(p)
    if created_dir is not None and os.path.isdir(created_dir) and not os.listdir(created_dir):
        os.rmdir(created_dir)


def build(
    src: str,
    out: str,
    *,
    fmt: str,
    split: str,
    num_shards: int = 1,
    workers: int = 1,
    progress: bool = True,
    encoding: str = "utf-8",
    **options,
) -> dict:
    """Writes split ``split`` of ``src`` into the TFDS directory ``out``; returns the summary
    {"split", "written", "skipped", "shards", "out"}. ``options`` are the format's own
    (``source.Source.build_options``): ``cn_clip_format`` ("tsv", "lmdb"; None: the one SRC
    holds) for cn_clip, ``image_key`` / ``caption_key`` for files; None means the default.
    ``encoding``: of the caption files (cn_clip's JSONL, webdataset .txt/.json members), e.g.
    "gbk"; a JSONL line not in it stops the build before any work, naming the file and line; a
    webdataset caption not in it is skipped and counted, naming the member."""
    import_tfds()  # the [tfds] extra, or one line naming it
    from tensorflow_datasets.core import dataset_info, file_adapters, naming
    from tensorflow_datasets.core import splits as splits_lib

    from ..io import as_path, staged_output

    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {FORMATS}, got {fmt!r}")
    source = registry.get(fmt, what="--format")
    if num_shards < 1 or workers < 1:
        raise ValueError(f"--num-shards and --workers must be >= 1, got {num_shards}, {workers}")
    if not split or not split.replace("_", "").isalnum():
        raise ValueError(f"--split must be a name like 'train' (letters, digits, _), got {split!r}")
    try:
        codecs.lookup(encoding)
    except (LookupError, TypeError):
        raise ValueError(f"--encoding {encoding!r}: unknown text encoding (e.g. utf-8, gbk, gb18030, big5)") from None
    out_path = as_path(out, what="OUT")
    for key, value in options.items():
        if value is not None and key not in source.build_options:
            flag = "--" + key.replace("_", "-")
            owners = [n for n, s in registry.sources().items() if key in s.build_options]
            raise ValueError(f"{flag} applies to --format {' / '.join(owners) or '(none)'} only, not {fmt!r}")
    options = {k: v for k, v in options.items() if v is not None}
    existing = _existing_dataset(out_path, split)  # before any work: OUT must be ours or new
    if source.build_check is not None:
        try:
            options = source.build_check(src, split, {**options, "encoding": encoding})
        except (FileNotFoundError, ValueError, KeyError) as e:
            raise (ValueError if isinstance(e, KeyError) else type(e))(f"SRC: {e.args[0] if e.args else e}") from None

    skipped = [0]
    # opened here, before any work: captions in another encoding stop the build naming file and line
    records = source.build_records(src, split, skipped, {**options, "encoding": encoding})
    reasons: list[str] = []
    # shards into OUT through io.staged_output (gs://...: written locally, copied once all are
    # complete); dataset_info.json, what makes the split visible, only after that
    created = not out_path.exists()
    with staged_output(out_path, what="OUT") as local:
        local.mkdir(parents=True, exist_ok=True)
        template = naming.ShardedFileTemplate(
            data_dir=local, dataset_name=DATASET_NAME, split=split, filetype_suffix="array_record"
        )
        paths = [template.sharded_filepath(shard_index=i, num_shards=num_shards) for i in range(num_shards)]
        try:
            written, lengths = _write_shards(records, paths, workers, progress, split, skipped, reasons)
        except BaseException:
            _remove_partial(paths, local if created else None)  # nothing half-written is left in OUT
            raise
        if not written:
            _remove_partial(paths, local if created else None)
            raise ValueError(
                f"SRC {src!r}: no usable (image, text) pairs in split {split!r} "
                f"({skipped[0]} skipped; first: {reasons[:1]})"
            )
        num_bytes = sum(os.path.getsize(p) for p in paths)
    origin = f"cn_clip ({options['cn_clip_format']})" if fmt == "cn_clip" else fmt
    out_template = naming.ShardedFileTemplate(
        data_dir=out_path, dataset_name=DATASET_NAME, split=split, filetype_suffix="array_record"
    )
    split_info = splits_lib.SplitInfo(
        name=split, shard_lengths=lengths, num_bytes=num_bytes, filename_template=out_template
    )
    splits = [split_info] + (list(existing.splits.values()) if existing else [])
    info = dataset_info.DatasetInfo(
        builder=dataset_info.DatasetIdentity(
            name=DATASET_NAME, version="1.0.0", data_dir=os.fspath(out_path), module_name=""
        ),
        features=features(),
        description=f"Chinese-CLIP image-text pairs built by chinese_clip_jax.data.build from {origin} {src}",
    )
    info.set_splits(splits_lib.SplitDict(splits))
    info.set_file_format(file_adapters.FileFormat.ARRAY_RECORD)
    info.write_to_directory(out_path)
    return {"split": split, "written": written, "skipped": skipped[0], "shards": num_shards, "out": os.fspath(out_path)}


def _source(src: str, fmt: str | None, split: str | None) -> tuple[str, str, str]:
    """(SRC, format, split) from SRC as given: a data-set spec gives its format (and split); a plain
    path with --format is read as before. One-line ValueErrors name what is missing."""
    from .spec import SPLIT_KINDS, parse, resolve

    spec = parse(src, what="SRC")
    if spec.kind or fmt is None:
        spec = resolve(src, what="SRC", default_split=split)
        if spec.kind not in FORMATS:
            raise ValueError(f"SRC {src}: a {spec.kind} spec cannot be built (data.build reads {', '.join(FORMATS)})")
        if fmt is not None and fmt != spec.kind:
            raise ValueError(f"SRC {src} is a {spec.kind} spec, but --format {fmt}")
        src, fmt = spec.location, spec.kind
        split = spec.split if spec.kind in SPLIT_KINDS else split
    if not split:
        raise ValueError(f"SRC {src}: give --split (the split to write{', and to read' if fmt == 'cn_clip' else ''})")
    return src, fmt, split


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m chinese_clip_jax.data.build", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "src",
        help="cn_clip dataset directory (TSV or LMDB), webdataset shards (paths, globs, braces), "
        "or a files table (.csv/.tsv/.jsonl of image paths and captions)",
    )
    ap.add_argument("out", help="TFDS dataset directory to write (local or gs://...)")
    ap.add_argument("--format", choices=FORMATS, help="what SRC is (default: a spec's kind)")
    ap.add_argument("--split", help="split name, e.g. train / valid / test (default: a spec's @SPLIT)")
    ap.add_argument("--num-shards", type=int, default=1, help="ArrayRecord files for this split")
    ap.add_argument(
        "--cn-clip-format",
        choices=("tsv", "lmdb"),
        default=None,
        help="cn_clip layout: SPLIT_imgs.tsv + SPLIT_texts.jsonl, or lmdb/SPLIT (default: the one SRC holds)",
    )
    ap.add_argument("--image-key", default=None, help="files: the table's image column (default: image)")
    ap.add_argument("--caption-key", default=None, help="files: the table's caption column (default: caption)")
    ap.add_argument(
        "--encoding",
        default="utf-8",
        help="text encoding of the caption files (cn_clip JSONL, webdataset .txt/.json), e.g. gbk (default utf-8)",
    )
    ap.add_argument(
        "--workers",
        type=int,
        default=max(1, min(8, os.cpu_count() or 1)),
        help="processes decoding images to check them",
    )
    args = ap.parse_args(argv)
    from ..console import quiet_libraries

    quiet_libraries()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("chinese_clip_jax").setLevel(logging.INFO)  # e.g. "copying a remote LMDB split"
    try:
        src, fmt, split = _source(args.src, args.format, args.split)
        summary = build(
            src,
            args.out,
            fmt=fmt,
            split=split,
            num_shards=args.num_shards,
            workers=args.workers,
            cn_clip_format=args.cn_clip_format,
            encoding=args.encoding,
            image_key=args.image_key,
            caption_key=args.caption_key,
        )
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, ensure_ascii=False))
    print(
        f"wrote {summary['written']} pairs ({summary['skipped']} skipped) into split {summary['split']!r} of "
        f"{summary['out']} in {summary['shards']} ArrayRecord shard(s)",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
