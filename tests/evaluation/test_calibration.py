"""Match probabilities: Platt scaling against SciPy's optimiser and the likelihood's gradient, the
ECE by hand, ``ccj-eval calibrate`` end to end, ``ChineseCLIP.match`` with a file, with a
sigmoid model's own bias and without either, and bad calibration files."""

from __future__ import annotations

import json

import jax
import numpy as np
import PIL.Image
import pytest
from _train_helpers import random_params, tiny_config

import chinese_clip_jax as ccj
from chinese_clip_jax.evaluation import cli as evaluate
from chinese_clip_jax.evaluation.calibration import expected_calibration_error, platt_fit, sample_pairs
from chinese_clip_jax.inference.calibration import CalibrationError, read_calibration

SIZES = dict(vocab_size=21128, hidden=32, heads=2, max_positions=64, image_size=32, patch_size=16, projection_dim=16)
CAPTIONS = ["红色的圆", "蓝色的方块", "绿色的三角", "黄色的星星", "白色的猫", "黑色的狗", "一辆汽车", "一棵树"]


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def test_platt_fit_equals_scipy_and_zeroes_the_likelihood_gradient():
    scipy_optimize = pytest.importorskip("scipy.optimize")
    rng = np.random.default_rng(0)
    x = rng.uniform(-0.2, 0.6, 400)
    y = (rng.uniform(size=400) < _sigmoid(12.0 * x - 2.0)).astype(np.int64)
    scale, bias = platt_fit(x, y)

    def nll(w):
        z = w[0] * x + w[1]
        return np.sum(np.logaddexp(0.0, z) - y * z)

    ref = scipy_optimize.minimize(
        nll, np.zeros(2), method="Nelder-Mead", options=dict(xatol=1e-9, fatol=1e-12, maxiter=20000)
    )
    np.testing.assert_allclose([scale, bias], ref.x, rtol=1e-4, atol=1e-4)
    p = _sigmoid(scale * x + bias)  # first-order optimality, written out
    np.testing.assert_allclose([np.sum((p - y) * x), np.sum(p - y)], [0.0, 0.0], atol=1e-6)
    with pytest.raises(ValueError, match="both classes"):
        platt_fit(x, np.ones_like(y))


def test_ece_by_hand():
    probs = [0.05, 0.15, 0.18, 0.55, 0.95, 1.0]
    labels = [0, 1, 0, 1, 1, 1]
    # 5 bins of width 0.2: [0.05 0.15 0.18] -> |1/3 - 0.38/3|; [0.55] -> |1 - 0.55|; [0.95 1.0] -> |1 - 0.975|
    want = 3 / 6 * abs(1 / 3 - 0.38 / 3) + 1 / 6 * 0.45 + 2 / 6 * 0.025
    assert expected_calibration_error(probs, labels, n_bins=5) == pytest.approx(want, abs=1e-12)


def test_sampled_pairs_are_every_match_and_mismatches_outside_the_positives():
    t, i, y = sample_pairs([[0], [1, 2], [], [3]], 5, negatives=2, seed=3)
    assert sorted(zip(t[y == 1].tolist(), i[y == 1].tolist())) == [(0, 0), (1, 1), (1, 2), (3, 3)]
    positives = {0: {0}, 1: {1, 2}, 3: {3}}
    assert (y == 0).sum() == 8 and all(int(j) not in positives[int(k)] for k, j in zip(t[y == 0], i[y == 0]))
    again = sample_pairs([[0], [1, 2], [], [3]], 5, negatives=2, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip((t, i, y), again))


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    d = tmp_path_factory.mktemp("calib")
    rng = np.random.default_rng(0)
    rows = ["image,caption"]
    for k, caption in enumerate(CAPTIONS * 2):  # 16 images, each caption twice
        path = d / f"{k}.png"
        PIL.Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
            path
        )  # the model size: crop = squash
        rows.append(f"{path},{caption}")
    (d / "pairs.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return d / "pairs.csv"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    cfg = tiny_config(**SIZES)
    d = tmp_path_factory.mktemp("model")
    params = jax.tree.map(np.asarray, random_params(cfg, seed=4))
    ccj.save_pretrained(d / "hf", cfg, params)
    from chinese_clip_jax.conversion import save_flax

    save_flax(d / "sigmoid", cfg, {**params, "logit_bias": np.float32(-3.0)})
    return d


def test_calibrate_writes_the_fit_and_match_is_no_worse_calibrated(model_dir, table, tmp_path, capsys):
    out = tmp_path / "calibration.json"
    argv = ["calibrate", "--model", str(model_dir / "hf"), "--data", str(table), "--output", str(out)]
    assert evaluate.main(argv + ["--negatives", "3", "--seed", "1"]) == 0
    record = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == record
    assert record["pairs"] == {"matched": 16, "mismatched": 48, "base_rate": 0.25}
    assert record["temperature"] == pytest.approx(1 / record["scale"])

    # by hand, from the model's own embeddings: the same pairs, the same fit
    clip = ccj.ChineseCLIP.from_pretrained(model_dir / "hf", calibration=out)
    images = [str(table.parent / f"{k}.png") for k in range(16)]
    img, txt = clip.encode_image(images), clip.encode_text(CAPTIONS)
    positives = [[k, k + 8] for k in range(8)]
    t, i, y = sample_pairs(positives, 16, negatives=3, seed=1)
    cosine = np.sum(txt[t].astype(np.float64) * img[i], axis=-1)
    scale, bias = platt_fit(cosine, y)
    assert (record["scale"], record["bias"]) == pytest.approx((scale, bias), rel=1e-4, abs=1e-4)
    before = _sigmoid(clip.logit_scale * cosine)
    assert record["ece_before"] == pytest.approx(expected_calibration_error(before, y), abs=1e-5)

    # match(): one probability per pair, calibrated no worse than the model's own sigmoid
    p = clip.match([images[j] for j in i], [CAPTIONS[k] for k in t])
    assert p.shape == (len(y),) and p.dtype == np.float32
    np.testing.assert_allclose(p, _sigmoid(record["scale"] * cosine + record["bias"]), rtol=1e-5, atol=1e-6)
    assert expected_calibration_error(p, y) <= expected_calibration_error(before, y) + 1e-9
    assert record["ece_after"] <= record["ece_before"]

    # the output is never replaced unless asked
    assert evaluate.main(argv) == 2
    assert "--output" in capsys.readouterr().err and json.loads(out.read_text()) == record


def test_match_uses_a_sigmoid_models_own_bias_and_refuses_a_softmax_model_without_a_file(model_dir, table):
    images = [str(table.parent / f"{k}.png") for k in range(3)]
    clip = ccj.ChineseCLIP.from_pretrained(model_dir / "sigmoid")
    cosine = np.sum(clip.encode_image(images).astype(np.float64) * clip.encode_text(CAPTIONS[:3]), axis=-1)
    np.testing.assert_allclose(clip.match(images, CAPTIONS[:3]), _sigmoid(clip.logit_scale * cosine - 3.0), rtol=1e-5)
    plain = ccj.ChineseCLIP.from_pretrained(model_dir / "hf")
    with pytest.raises(ValueError, match="ccj-eval calibrate --model SRC --data SPEC --output FILE"):
        plain.match(images, CAPTIONS[:3])
    with pytest.raises(ValueError, match="3 images and 2 texts"):
        clip.match(images, CAPTIONS[:2])


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "does not exist"),
        ("{not json", "is not JSON"),
        ('{"scale": 1.0, "bias": 0.0}', "is not a 'ccj-calibration/1' file"),
        ('{"format": "ccj-calibration/1", "scale": "big", "bias": 0.0}', "'scale' must be a finite number"),
        ('{"format": "ccj-calibration/1", "scale": 2.0, "bias": NaN}', "'bias' must be a finite number"),
    ],
)
def test_a_bad_calibration_file_is_one_line_naming_it(tmp_path, content, message, model_dir):
    path = tmp_path / "cal.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(CalibrationError) as e:
        read_calibration(path)
    assert message in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(CalibrationError, match="cal.json"):  # before the weights load
        ccj.ChineseCLIP.from_pretrained(model_dir / "nowhere", calibration=path)
