"""The end-of-run summary: every eval metric the run logged, first eval against last and chance,
and where the checkpoint, metrics and pictures are.

Metric names are shown as logged (``zeroshot/top1``); a data source may give them wording
(``data.demo.METRIC_LABELS``), listed first in its order. A run that had nothing left to do
(rerun on a finished workdir) reports from ``metrics.jsonl`` instead of its own (empty) steps.
"""

from __future__ import annotations

import json
import re

from ..io import as_path

__all__ = ["format_report", "print_report", "metric_labels"]


def metric_labels(config) -> dict[str, str]:
    """Wording for the metric keys of the run's data source ({} when it has none)."""
    if config.data.name == "demo":
        from ..data.demo import METRIC_LABELS

        return dict(METRIC_LABELS)
    return {}


def _is_eval_key(key: str) -> bool:
    return "/" in key and not key.startswith(("train/", "data/"))


def _from_metrics_file(workdir) -> tuple[dict | None, dict | None, float]:
    """(first eval, last eval, last logged samples/s) from workdir/metrics.jsonl."""
    path = as_path(workdir) / "metrics.jsonl"
    first = last = None
    sps = float("nan")
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                rec = json.loads(line)
                evals = {k: v for k, v in rec.items() if _is_eval_key(k)}
                if evals:
                    evals["step"] = rec["step"]
                    first = first or evals
                    last = evals
                sps = rec.get("train/samples_per_sec", sps)
    return first, last, sps


def _natural(key: str) -> list:
    """Sort key with numbers compared as numbers (R@5 before R@10)."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", key)]


def format_report(result: dict, config, workdir: str) -> str:
    first, last, chance = result.get("first_eval"), result.get("last_eval"), result.get("chance") or {}
    sps = result.get("samples_per_sec", float("nan"))
    lines = []
    if result.get("steps_run") == 0:
        # nothing was trained in this call (a finished run, rerun): report what the run logged
        first, last, sps = _from_metrics_file(workdir)
        lines.append(
            f"already trained to step {result['step']} (nothing left to do); figures from metrics.jsonl "
            f"({sps:.0f} samples/s when last logged)"
        )
    else:
        lines.append(
            f"trained to step {result['step']} in {result.get('wall_s', float('nan')):.0f} s "
            f"({sps:.0f} samples/s after compilation)"
        )
    if first and last:
        labels = metric_labels(config)
        keys = [k for k in labels if k in last] + sorted(
            (k for k in last if k != "step" and k not in labels), key=_natural
        )
        width = max([6] + [len(labels.get(k, k)) for k in keys])
        lines.append(
            f"{'metric':{width}s} {'step ' + str(first['step']):>9s} {'step ' + str(last['step']):>9s} {'chance':>8s}"
        )
        for key in keys:
            c = chance.get(key)
            lines.append(
                f"{labels.get(key, key):{width}s} {first.get(key, float('nan')):9.3f} {last[key]:9.3f} "
                f"{'' if c is None else f'{c:8.3f}':>8s}"
            )
    lines.append(f"checkpoint: {result['checkpoint_dir']}/{result['step']}")
    workdir = as_path(workdir)
    lines.append(f"metrics:    {workdir / 'metrics.jsonl'} (TensorBoard: {workdir / 'tensorboard'})")
    for name in ("demo.png", "summary.png"):
        if (workdir / name).exists():
            lines.append(f"picture:    {workdir / name} (curves, held-out predictions)")
    if result.get("export_dir"):
        lines.append(f"HF export: {result['export_dir']} (ccj.from_pretrained / transformers read it)")
    if result.get("stopped_early"):
        lines.append("stopped early by SIGTERM; rerun the same command to resume")
    return "\n".join(lines)


def print_report(result: dict, config, workdir: str) -> None:
    print(format_report(result, config, workdir), flush=True)
