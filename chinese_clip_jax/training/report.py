"""The end-of-run summary: a before/after table of the eval metrics against chance, and where
the checkpoint and metrics are."""

from __future__ import annotations

import os

__all__ = ["format_report", "print_report"]

_ROWS = (
    ("zeroshot/top1", "zero-shot top-1, held-out images"),
    ("zeroshot_unseen/top1", "zero-shot top-1, unseen colour-shape combinations"),
    ("retrieval/t2i_R@1", "text->image R@1"),
    ("retrieval/i2t_R@1", "image->text R@1"),
    ("retrieval/mean_recall", "retrieval mean recall (R@1/5/10, both ways)"),
)


def format_report(result: dict, config, workdir: str) -> str:
    lines = [f"trained to step {result['step']} in {result.get('wall_s', float('nan')):.0f} s "
             f"({result.get('samples_per_sec', float('nan')):.0f} samples/s after compilation)"]
    first, last, chance = result.get("first_eval"), result.get("last_eval"), result.get("chance") or {}
    if first and last:
        lines.append(f"{'metric':52s} {'step ' + str(first['step']):>9s} {'step ' + str(last['step']):>9s} "
                     f"{'chance':>8s}")
        for key, label in _ROWS:
            if key in last:
                c = chance.get(key)
                lines.append(f"{label:52s} {first.get(key, float('nan')):9.3f} {last[key]:9.3f} "
                             f"{'' if c is None else f'{c:8.3f}':>8s}")
    lines.append(f"checkpoint: {result['checkpoint_dir']}/{result['step']}")
    lines.append(f"metrics:    {os.path.join(os.path.abspath(workdir), 'metrics.jsonl')} "
                 f"(TensorBoard: {os.path.join(os.path.abspath(workdir), 'tensorboard')})")
    if result.get("export_dir"):
        lines.append(f"HF export: {result['export_dir']} (ccj.from_pretrained / transformers read it)")
    if result.get("stopped_early"):
        lines.append("stopped early by SIGTERM; rerun the same command to resume")
    return "\n".join(lines)


def print_report(result: dict, config, workdir: str) -> None:
    print(format_report(result, config, workdir), flush=True)
