"""``ccj-eval`` / ``python -m chinese_clip_jax.evaluation``: a thin command line over
``evaluation.zero_shot``, ``evaluation.retrieval`` and ``evaluation.calibration.calibrate``.

A bad input (a missing file, a label count that does not match the classes, duplicate labels, a
template without ``{}``, text in another encoding, an output that would replace files) is a
one-line ``error: ...`` naming it, exit status 2, before the model is loaded. The results JSON
is printed and written atomically to ``--output`` (docs/evaluation.md has its schema).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from ..data.bad_records import skipped_line
from ..data.sets import DatasetError
from ..io import atomic_write, first_line
from .api import DEFAULT_RESIZE, RESIZE_MODES, OutputError, check_output, retrieval, zero_shot
from .prompts import PromptError
from .runner import TooManyBadImages

__all__ = ["main", "build_parser"]

EPILOG = """examples:
  ccj-eval zeroshot --model build/demo/hf --data folder:build/evalsets/folder \\
      --labels build/evalsets/labels.txt --output zeroshot.json
  ccj-eval retrieval --model build/demo/hf --data build/evalsets/cn_clip --split valid \\
      --predictions pred.jsonl --output retrieval.json
  ccj-eval calibrate --model build/demo/hf --data build/evalsets/cn_clip --split valid \
      --output calibration.json

Both tasks resize like cn_clip's evaluation (squash: bicubic to the square resolution) unless
--resize-mode center. Images that cannot be read are skipped and listed in the results."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ccj-eval",
        description="Zero-shot classification and text-image retrieval benchmarks (cn_clip's protocol).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="task", required=True)

    def common(sp, default_split):
        sp.add_argument("--model", required=True, help="anything ccj.from_pretrained reads")
        sp.add_argument("--split", default=default_split, help=f"for a spec without @SPLIT (default {default_split})")
        sp.add_argument(
            "--resize-mode",
            choices=sorted(RESIZE_MODES),
            default=DEFAULT_RESIZE,
            help="squash: bicubic resize to the square resolution, cn_clip's evaluation (default); "
            "center: shortest edge + centre crop, transformers' processor (crop: its earlier name)",
        )
        sp.add_argument("--batch-size", type=int, default=64, help="rows per device step (rounded to devices)")
        sp.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
        sp.add_argument(
            "--max-bad", type=int, help="unreadable images tolerated before the run fails (default: 1%%, >= 5)"
        )
        sp.add_argument("--encoding", default="utf-8", help="of the labels, templates and captions files")
        sp.add_argument("--output", help="write the results JSON here (also printed)")
        sp.add_argument("--overwrite", action="store_true", help="replace existing output files")

    z = sub.add_parser(
        "zeroshot",
        help="zero-shot classification accuracy",
        epilog="example:\n  ccj-eval zeroshot --model DIR --data folder:images/ --labels labels.txt --output r.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common(z, "test")
    z.add_argument(
        "--data",
        "--dataset",
        dest="data",
        required=True,
        help="a data-set spec (docs/data.md) with classes: folder:PATH, tfds:NAME[@SPLIT], tfds-dir:PATH[@SPLIT]",
    )
    z.add_argument("--data-dir", help="TFDS data directory for tfds:NAME")
    z.add_argument("--labels", help="class names, one per line in class order, or cn_clip:NAME")
    z.add_argument("--templates", help="prompt templates, one per line with one {}, or cn_clip:NAME")
    z.add_argument("--per-class", action="store_true", help="add per-class recall and the confusion matrix")
    r = sub.add_parser(
        "retrieval",
        help="text-image retrieval recall (cn_clip's protocol)",
        epilog="example:\n  ccj-eval retrieval --model DIR --data cn_clip_split_dir --split valid --output r.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common(r, "valid")
    r.add_argument(
        "--data",
        "--dataset",
        dest="data",
        required=True,
        help="a data-set spec (docs/data.md) with captions: cn_clip:ROOT[@SPLIT], files:TABLE, "
        "tfds-dir:PATH[@SPLIT], tfds:NAME[@SPLIT], or a cn_clip / TFDS directory or a .csv/.tsv/.jsonl table",
    )
    r.add_argument("--predictions", help="write top-10 images per text as cn_clip's prediction JSONL")
    r.add_argument("--features-dir", help="write text/image features and ids as .npy")
    c = sub.add_parser(
        "calibrate",
        help="fit match probabilities (Platt scaling) on a held-out retrieval set",
        epilog="example:\n  ccj-eval calibrate --model DIR --data cn_clip_split_dir --split valid "
        "--output calibration.json\n"
        "then: ChineseCLIP.from_pretrained(DIR, calibration='calibration.json').match(images, texts)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common(c, "valid")
    c.add_argument("--data", "--dataset", dest="data", required=True, help="a retrieval set, as for `retrieval`")
    c.add_argument("--negatives", type=int, default=1, help="mismatched pairs sampled per matched pair (default 1)")
    c.add_argument("--seed", type=int, default=0, help="of the mismatched pairs (default 0)")
    c.add_argument("--bins", type=int, default=15, help="equal-width bins of the expected calibration error")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command; returns the exit status (0 ok, 2 bad input)."""
    args = build_parser().parse_args(argv)
    from ..console import quiet_libraries

    quiet_libraries()
    from ..conversion import CheckpointError
    from ..processing import ImageLoadError

    try:
        if args.batch_size < 1:
            raise OutputError(f"--batch-size must be >= 1, got {args.batch_size}")
        if args.max_bad is not None and args.max_bad < 0:
            raise OutputError(f"--max-bad must be >= 0, got {args.max_bad}")
        if args.task == "calibrate":
            if not args.output:
                raise OutputError("calibrate needs --output FILE (the calibration JSON)")
            for flag, v, low in (
                ("--negatives", args.negatives, 1),
                ("--bins", args.bins, 1),
                ("--seed", args.seed, 0),
            ):
                if v < low:
                    raise OutputError(f"{flag} must be >= {low}, got {v}")
        check_output(args.output, "--output", overwrite=args.overwrite)
        common = dict(
            resize=args.resize_mode,
            batch_size=args.batch_size,
            split=args.split,
            max_bad=args.max_bad,
            encoding=args.encoding,
            dtype=args.dtype,
        )
        if args.task == "zeroshot":
            result = zero_shot(
                args.model,
                args.data,
                labels=args.labels,
                templates=args.templates,
                data_dir=args.data_dir,
                per_class=args.per_class,
                **common,
            )
        elif args.task == "calibrate":
            from .calibration import calibrate

            record = calibrate(
                args.model,
                args.data,
                args.output,
                negatives=args.negatives,
                seed=args.seed,
                n_bins=args.bins,
                overwrite=args.overwrite,
                **common,
            )
            print(json.dumps(record, indent=1, ensure_ascii=False))
            return 0
        else:
            result = retrieval(
                args.model,
                args.data,
                predictions=args.predictions,
                features_dir=args.features_dir,
                overwrite=args.overwrite,
                **common,
            )
    except (
        PromptError,
        DatasetError,
        OutputError,
        TooManyBadImages,
        CheckpointError,
        ImageLoadError,
        FileNotFoundError,
        ValueError,  # a model its tokenizer does not fit, a bad value met once the model is read
    ) as e:
        print(f"error: {first_line(e, with_type=False)}", file=sys.stderr)
        return 2
    text = result.to_json()
    print(text)
    if args.output:
        atomic_write(args.output, text + "\n")
    if result.bad_images:  # the one line beside the list in the results (data.bad_records)
        b = result.bad_images[0]
        listed = f"{args.output} (bad_images)" if args.output else "the results' bad_images"
        n = result.counts.get("images", "?")
        print(
            skipped_line(len(result.bad_images), n, f"{b.image}: {b.reason}", what="images", listed=listed),
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
