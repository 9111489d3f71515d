"""Convert a Chinese-CLIP checkpoint between PyTorch layouts and Flax (``python -m convert`` and
the ``ccj-convert`` script).

  python -m convert SRC OUT [--arch NAME] [--to flax|hf|pt] [--dtype float32|bfloat16] [--scan-layers]

SRC: a HF checkpoint dir, a hub id (online), a cn_clip .pt file, or a dir written by this command.
--to flax (default) writes an Orbax checkpoint (OUT/params) + config.json + vocab.txt;
--to hf writes config.json + model.safetensors + vocab.txt that transformers loads (ViT models;
a ResNet (RN50) model has no HF layout and is refused), and a model card (README.md: source,
command, parity measured against transformers at conversion, architecture, licence) unless
OUT already holds a README.md (kept as it is);
--to pt writes OUT/cn_clip.pt in cn_clip's own checkpoint layout (cn_clip and this tool read it).
--export writes the serving export instead (chinese_clip_jax.export): OUT/text_features.jaxexport,
OUT/image_features.jaxexport, OUT/params.safetensors and the processor files, for --platforms.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import sys
import time

from chinese_clip_jax.io import first_line
from chinese_clip_jax.processing import DEFAULT_CONTEXT_LENGTH

PT_NAME = "cn_clip.pt"  # the file --to pt writes inside OUT


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def _output_names(args) -> tuple[str, ...]:
    """Every name this conversion may create in OUT: all checked before any work (never overwrite)."""
    from chinese_clip_jax import conversion

    if args.export:
        from chinese_clip_jax.conversion.export import output_names as export_names

        return export_names()
    if args.to == "pt":
        return (PT_NAME,)
    return conversion.output_names(args.to)


def _remove_outputs(out: str, names: tuple[str, ...], out_existed: bool) -> None:
    """After a failed write: removes what this run created (nothing there was the user's, checked first)."""
    import shutil

    for name in names:
        path = os.path.join(out, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.lexists(path):
            os.remove(path)
    if os.path.isdir(out):
        for name in os.listdir(out):  # Orbax temp dirs of an interrupted save
            if ".orbax-checkpoint-tmp" in name:
                shutil.rmtree(os.path.join(out, name), ignore_errors=True)
        if not out_existed and not os.listdir(out):
            os.rmdir(out)


def _write_card(args, out, remote_out, cfg, params, kind, directory, argv) -> bool:
    """The model card of a --to hf conversion (``conversion.card``); False when OUT holds one already."""
    import shlex

    from chinese_clip_jax.conversion import card

    if (remote_out / card.CARD_NAME).exists() if remote_out else os.path.lexists(os.path.join(out, card.CARD_NAME)):
        return False
    if args.skip_parity:
        parity = "not measured (converted with --skip-parity)"
    else:
        try:
            parity = card.measure_parity(out, cfg, params)
        except Exception as e:  # noqa: BLE001 - the weights are written; the card says why parity is missing
            parity = f"not measured: {first_line(e)}"
    words = sys.argv[1:] if argv is None else list(argv)
    command = "ccj-convert " + " ".join(shlex.quote(w) for w in words)
    text = card.model_card(
        cfg, src=args.src, kind=kind, command=command, parity=parity, dtype=args.dtype, source_dir=directory
    )
    return card.write_model_card(out, text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="HF dir, hub id, cn_clip .pt file, or a dir written by this command")
    parser.add_argument("out", help="output directory (must not already hold a checkpoint)")
    parser.add_argument(
        "--arch",
        help="cn_clip architecture, e.g. ViT-B-16@RoBERTa-wwm-ext-base-chinese (inferred from shapes when omitted)",
    )
    parser.add_argument("--to", choices=("flax", "hf", "pt"), default="flax")
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="storage dtype of the written params (models compute from fp32 params)",
    )
    parser.add_argument(
        "--scan-layers", action="store_true", help="--to flax: store stacked layers (for scan_layers=True models)"
    )
    parser.add_argument(
        "--export",
        action="store_true",
        help="write the jax.export serving artefacts (load with chinese_clip_jax.export.load_exported)",
    )
    parser.add_argument(
        "--platforms",
        default="cpu,cuda,tpu",
        help="--export: comma list of platforms the artefacts run on (default cpu,cuda,tpu)",
    )
    parser.add_argument(
        "--context-length",
        type=int,
        default=DEFAULT_CONTEXT_LENGTH,
        help=f"--export: fixed text length (default {DEFAULT_CONTEXT_LENGTH})",
    )
    parser.add_argument(
        "--skip-parity", action="store_true", help="--to hf: do not measure parity against transformers for the card"
    )
    parser.add_argument(
        "--clean-leftovers",
        action="store_true",
        help="first delete the unfinished temporaries an interrupted earlier run left in OUT (*.tmp, Orbax tmp dirs)",
    )
    args = parser.parse_args(argv)
    from chinese_clip_jax.console import quiet_libraries

    quiet_libraries()
    platforms = tuple(p.strip() for p in args.platforms.split(",") if p.strip())
    bad = [p for p in platforms if p not in ("cpu", "cuda", "tpu", "rocm")]
    if args.export and (bad or not platforms):
        parser.error(
            f"--platforms: unknown platform(s) {', '.join(bad) or '(none given)'}; choose from cpu, cuda, tpu, rocm"
        )

    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # convert in host memory, whatever accelerators exist
    from chinese_clip_jax import conversion
    from chinese_clip_jax.conversion import mapping
    from chinese_clip_jax.io import as_path, is_local, staged_input, staged_output

    start = time.perf_counter()
    try:  # gs://... SRC / OUT (epath): a bad scheme or a missing backend fails here, first
        remote_src = None if is_local(args.src) else as_path(args.src, what="SRC")
        remote_out = None if is_local(args.out) else as_path(args.out, what="OUT")
    except (ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # Never overwrite: every name this conversion may write is checked before any work.
    names = _output_names(args)
    if remote_out:
        existing = [n for n in names if (remote_out / n).exists()]
    else:
        existing = [n for n in names if os.path.lexists(os.path.join(args.out, n))]
        if os.path.exists(args.out) and not os.path.isdir(args.out):
            existing = [""]
        elif os.path.isdir(args.out):
            from chinese_clip_jax.conversion.write import is_leftover, leftovers_message

            leftovers = sorted(n for n in os.listdir(args.out) if is_leftover(n))
            finals = [n for n in existing if not is_leftover(n)]
            if leftovers and not finals:  # an interrupted earlier run: say so, and the way out
                if not args.clean_leftovers:
                    print(f"error: {leftovers_message(args.out, leftovers, '--clean-leftovers')}", file=sys.stderr)
                    return 2
                _remove_outputs(args.out, tuple(leftovers), out_existed=True)
                print(f"removed {', '.join(leftovers)}: left in {args.out} by an interrupted run", file=sys.stderr)
                existing = []
    if existing == [""]:
        print(f"error: OUT {args.out}: is a file, not a directory; choose a new or empty directory", file=sys.stderr)
        return 2
    if existing:
        print(
            f"error: {os.path.join(args.out, existing[0])} already exists; convert never overwrites: choose a "
            "new or empty output directory",
            file=sys.stderr,
        )
        return 2
    out_existed = remote_out is None and os.path.isdir(args.out)
    # SRC and OUT through io.staged_input / staged_output: a remote SRC is read from a local copy, a
    # remote OUT written locally and copied once complete (nothing is copied after a failure)
    try:
        with contextlib.ExitStack() as staged:
            src = str(staged.enter_context(staged_input(remote_src, what="SRC"))) if remote_src else args.src
            out = str(staged.enter_context(staged_output(remote_out or args.out, what="OUT")))
            if os.path.isdir(src):  # its image settings are copied: a bad file fails before any work
                from chinese_clip_jax.processing.image_settings import read_image_settings

                read_image_settings(src)
            cfg, params, kind, directory = conversion.load_params(src, arch=args.arch)
            params = mapping.stack_layers(params) if args.scan_layers else mapping.unstack_layers(params)
            if args.export:
                from chinese_clip_jax.conversion.export import save_exported

                save_exported(
                    out, cfg, params, platforms=platforms, context_length=args.context_length, processor_from=directory
                )
            elif args.to == "pt":
                if args.dtype != "float32":
                    raise ValueError("--to pt writes float32 tensors (as cn_clip's checkpoints); drop --dtype")
                os.makedirs(out, exist_ok=True)
                conversion.save_cn_clip(os.path.join(out, PT_NAME), cfg, params)
            else:
                save = conversion.save_pretrained if args.to == "hf" else conversion.save_flax
                save(out, cfg, params, dtype=args.dtype, processor_from=directory)
                if args.to == "hf":
                    card_written = _write_card(args, out, remote_out, cfg, params, kind, directory, argv)
    except (OSError, ValueError, ImportError) as e:  # CheckpointError is a ValueError: no traceback
        if not remote_out:
            _remove_outputs(args.out, names, out_existed)
        print(f"error: {first_line(e, with_type=False)}", file=sys.stderr)
        return 2
    if args.to == "hf" and not args.export:
        print(f"model card: {'README.md written' if card_written else 'an existing README.md kept as it is'}")
    n_params = sum(x.size for x in mapping.flatten(params).values())
    target = f"export ({','.join(platforms)})" if args.export else args.to
    print(
        f"converted {kind} checkpoint {args.src} -> {target} {args.out}\n"
        f"  parameters: {n_params:,} ({n_params / 1e6:.1f} M), stored as {args.dtype}\n"
        f"  time: {time.perf_counter() - start:.1f} s, peak memory (RSS): {_peak_rss_gib():.2f} GiB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
