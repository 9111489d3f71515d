"""The end-of-run report (any run's metrics; a finished run rerun) and the run's picture."""

import json

import ml_collections
import numpy as np
import PIL.Image

from chinese_clip_jax.data import default_data_config, demo
from chinese_clip_jax.training import figures
from chinese_clip_jax.training.report import format_report


def _config(name):
    return ml_collections.ConfigDict({"data": default_data_config(name)})


def _metrics_file(workdir):
    rows = [
        {"step": 0, "zeroshot/top1": 0.03, "retrieval/t2i_R@10": 0.2, "retrieval/t2i_R@5": 0.1},
        {"step": 10, "train/loss": 3.0, "train/samples_per_sec": 250.0},
        {"step": 20, "train/loss": 2.0, "train/samples_per_sec": 300.0},
        {"step": 20, "zeroshot/top1": 0.5, "retrieval/t2i_R@10": 0.9, "retrieval/t2i_R@5": 0.7},
    ]
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def test_a_finished_run_rerun_reports_its_logged_table(tmp_path):
    _metrics_file(tmp_path)
    result = {
        "step": 20,
        "steps_run": 0,
        "samples_per_sec": float("nan"),
        "first_eval": None,
        "last_eval": None,
        "chance": {"zeroshot/top1": 1 / 30},
        "checkpoint_dir": str(tmp_path / "ck"),
    }
    text = format_report(result, _config("demo"), str(tmp_path))
    assert "nan" not in text
    lines = text.splitlines()
    assert lines[0].startswith("already trained to step 20") and "300 samples/s" in lines[0]
    assert lines[1].split() == ["metric", "step", "0", "step", "20", "chance"]
    row = next(line for line in lines if line.startswith(demo.METRIC_LABELS["zeroshot/top1"]))
    assert row.split()[-3:] == ["0.030", "0.500", "0.033"]
    # keys without wording are shown as logged, numbers in numeric order (R@5 before R@10)
    names = [line.split()[0] for line in lines if line.startswith("retrieval/")]
    assert names == ["retrieval/t2i_R@5", "retrieval/t2i_R@10"]


def test_the_generic_report_prints_every_logged_metric(tmp_path):
    result = {
        "step": 20,
        "steps_run": 20,
        "wall_s": 12.0,
        "samples_per_sec": 300.0,
        "first_eval": {"step": 0, "retrieval/mean_recall": 0.1, "mine/acc": 0.2},
        "last_eval": {"step": 20, "retrieval/mean_recall": 0.4, "mine/acc": 0.6},
        "chance": {},
        "checkpoint_dir": "ck",
    }
    text = format_report(result, _config("cn_clip"), str(tmp_path))
    assert text.splitlines()[0] == "trained to step 20 in 12 s (300 samples/s after compilation)"
    rows = {line.split()[0]: line.split()[1:] for line in text.splitlines()[2:4]}
    assert rows == {"mine/acc": ["0.200", "0.600"], "retrieval/mean_recall": ["0.100", "0.400"]}


def test_figure_marks_right_and_wrong_and_never_draws_boxes(tmp_path):
    c = ml_collections.ConfigDict({"demo_seed": 0, "eval_per_class": 1, "num_retrieval": 4})
    sets = demo.eval_sets(c, image_size=16)
    labels = np.asarray(sets["zeroshot"]["labels"])
    pred = labels.copy()
    pred[1] = (pred[1] + 1) % 30  # image 1 wrong, image 0 right
    rows = _metrics_file(tmp_path)
    image = figures.run_figure(rows, sets, {"zeroshot": pred}, count=len(labels))
    assert image.mode == "RGB" and image.width > 600
    grid = figures.grid_image([sets["zeroshot"]["images"][i] for i in (0, 1)], ["a", "b"], ["a", "c"])
    px = np.asarray(grid)
    assert tuple(px[9, 9]) == figures.GREEN and tuple(px[9, 9 + (grid.width - 8) // 6]) == figures.RED
    # class names: CJK when the font draws them, else the English names (never missing-glyph boxes)
    font = figures.find_font(13, cjk=True)
    names = figures._names(sets["zeroshot"], font)
    assert all(figures.can_draw(font, n) for n in names)
    assert names == list(demo.CLASS_NAMES) or names == list(demo.CLASS_NAMES_EN)
    latin = figures.find_font(13, cjk=False)
    assert figures.can_draw(latin, "red circle")
    image.save(tmp_path / "x.png")
    assert PIL.Image.open(tmp_path / "x.png").size == image.size


def test_retrieval_chance_is_the_hypergeometric_miss_probability():
    """R@k by chance = 1 - C(n - p, k) / C(n, k) for a query with p positives among n, also when
    k >= n (every candidate picked: a sure hit, and no division by zero)."""
    import warnings
    from math import comb

    import numpy as np

    from chinese_clip_jax.training.evaluator import _none_hit

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for n in (3, 5, 12):
            positives = np.array([p for p in (1, 2, 3) if p <= n])
            for k in (1, 5, 10):
                want = [comb(n - p, min(k, n)) / comb(n, min(k, n)) for p in positives]
                np.testing.assert_allclose(_none_hit(n, positives, k), want)
