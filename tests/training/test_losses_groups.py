"""Multi-positive contrastive losses (``groups`` / ``loss_positives``) and ``data.distinct_captions``.

References: a float64 NumPy loss written from the definition (targets uniform over each row's
and column's positives; SigLIP labels +1 on every positive), today's loss (groups=None) for
all-distinct groups, the full-batch gradient for GradCache, the all-gather loss for the ring (8
simulated CPU devices, in a subprocess: ``_losses_groups_check.py``), the table's own label column
for the files source, and a fresh iterator for the resumed one.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _makers import run_script, write_csv, write_images
from _train_helpers import (
    KINDS,
    fake_batches,
    max_rel_err,
    opt_config,
    reference_loss,
    tiny_config,
    with_repeated_captions,
)
from _train_run import tiny_train_config

import chinese_clip_jax as ccj
from chinese_clip_jax import sharding as shd
from chinese_clip_jax.data import default_data_config, train_iterator
from chinese_clip_jax.data.pipeline import label_id
from chinese_clip_jax.training import create_train_state, make_optimizer, ring_losses
from chinese_clip_jax.training.loop import train
from chinese_clip_jax.training.losses import (
    SIGLIP_INIT_LOGIT_BIAS,
    caption_groups,
    contrastive_loss,
    positive_counts,
)
from chinese_clip_jax.training.step import make_grad_fn
from chinese_clip_jax.training.validate import ConfigError, validate_config


def embeds(n=12, d=8, seed=0):
    rng = np.random.default_rng(seed)
    t, v = rng.standard_normal((2, n, d))
    v[: n // 2] = t[: n // 2] + 0.3 * v[: n // 2]  # some strong pairs, so targets matter
    norm = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)  # noqa: E731
    return norm(t), norm(v)


REPEATED = np.array([3, 7, 3, 1, 7, 7, 9, 0, 3, 12, 5, 5], np.int32)  # groups of 3, 3, 2 and singletons
DISTINCT = np.array([40, 2, 17, 9, 0, 33, 5, 21, 8, 11, 6, 1], np.int32)  # all different, any order


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
@pytest.mark.parametrize("groups", [REPEATED, DISTINCT], ids=["repeated", "distinct"])
def test_loss_with_groups_equals_the_numpy_reference(kind, groups):
    t, v = embeds()
    scale, bias = KINDS[kind]
    got = float(contrastive_loss(kind, t, v, scale, bias, groups=jnp.asarray(groups)))
    assert got == pytest.approx(reference_loss(kind, t, v, scale, bias, groups), rel=2e-6)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_all_distinct_groups_are_todays_loss_and_repeats_change_it(kind):
    t, v = embeds(seed=1)
    scale, bias = KINDS[kind]
    today = jax.value_and_grad(lambda t, v: contrastive_loss(kind, t, v, scale, bias), argnums=(0, 1))(t, v)
    distinct = jax.value_and_grad(lambda t, v: contrastive_loss(kind, t, v, scale, bias, DISTINCT), argnums=(0, 1))(
        t, v
    )
    assert float(distinct[0]) == pytest.approx(float(today[0]), rel=1e-6)
    for a, b in zip(distinct[1], today[1]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    repeated = float(contrastive_loss(kind, t, v, scale, bias, REPEATED))
    assert abs(repeated - float(today[0])) > 1e-2  # the groups are not ignored


def test_positive_counts_and_caption_groups():
    np.testing.assert_array_equal(positive_counts(jnp.asarray(REPEATED)), [(REPEATED == g).sum() for g in REPEATED])
    ids = np.random.default_rng(0).integers(1, 21128, (64, 10)).astype(np.int32)
    ids[5], ids[40], ids[7] = ids[3], ids[3], ids[9]  # three copies of one caption, two of another
    ids[11, -1] = 0  # a caption that differs in its last token only
    ids[12, :-1] = ids[11, :-1]
    got = np.asarray(caption_groups(jnp.asarray(ids)))
    same = np.equal.outer(got, got)
    np.testing.assert_array_equal(same, (ids[:, None, :] == ids[None, :, :]).all(-1))
    assert got.dtype == np.int32


def test_the_ring_losses_earlier_names_still_work():
    mesh = shd.make_mesh(-1, 1, 1)
    t, v = embeds()
    new = ring_losses.ring_softmax_loss(t, v, 2.0, mesh, groups=REPEATED)
    assert float(ring_losses.chunked_softmax_loss(t, v, 2.0, mesh, groups=REPEATED)) == float(new)
    old = ring_losses.sharded_contrastive_loss("softmax", t, v, 2.0, None, REPEATED, impl="ring", mesh=mesh)
    assert float(old) == float(new)


def test_group_errors():
    t, v = embeds()
    with pytest.raises(ValueError, match=r"groups must be one int per pair, shape \(12,\), got \(5,\)"):
        contrastive_loss("softmax", t, v, 1.0, groups=jnp.arange(5))


@pytest.mark.slow
@pytest.mark.parametrize("loss, positives", [("sigmoid", "caption"), ("softmax", "label"), ("softmax", "caption")])
def test_gradcache_with_groups_equals_the_full_batch_gradient(loss, positives):
    """accum_steps=4 (micro-batches of rows k::4, embeddings cached) against one full batch,
    the groups spanning micro-batches; and the groups change the gradient (not ignored)."""
    mesh = shd.make_mesh(-1, 1, 1)
    model = ccj.ChineseCLIPModel(tiny_config(), logit_bias_init=SIGLIP_INIT_LOGIT_BIAS)
    tx, _ = make_optimizer(opt_config(), 10)
    state, _ = create_train_state(model, tx, mesh, 0, loss="sigmoid")
    host = with_repeated_captions(fake_batches(1, 16, seed=5)[0])
    batch = shd.shard_batch(host, mesh)
    rng = jax.random.PRNGKey(1)
    out = {}
    with shd.use_mesh_and_rules(mesh):
        for pos, accum in ((positives, 1), (positives, 4), ("pair", 1)):
            fn = make_grad_fn(model, mesh, loss=loss, accum_steps=accum, positives=pos, deterministic=True)
            out[pos, accum] = jax.jit(fn)(state.params, batch, rng)
    (lf, gf), (la, ga), (lp, gp) = out[positives, 1], out[positives, 4], out["pair", 1]
    rel, key_abs = max_rel_err(ga, gf)
    assert abs(float(la) - float(lf)) <= 1e-5 * abs(float(lf))
    assert rel <= 1e-5 and key_abs <= 1e-6 * float(optax.tree.norm(gf)), (rel, key_abs)
    if (loss, positives) == ("softmax", "caption"):
        # equal captions embed equally (no dropout): InfoNCE's value and gradients are then the
        # plain loss's (docs/training.md); the sigmoid loss's labels, or other captions of a label, do change it
        assert float(lf) == pytest.approx(float(lp), rel=1e-5)
        assert max_rel_err(gf, gp)[0] <= 1e-5
    else:
        assert abs(float(lf) - float(lp)) > 1e-3


@pytest.fixture(scope="module")
def groups_ring_run():
    return run_script("_losses_groups_check.py", timeout=900)


@pytest.mark.slow
def test_ring_with_groups_equals_gather_on_8_devices(groups_ring_run):
    cases = groups_ring_run["losses"]
    assert len(cases) == 4
    for name, r in cases.items():
        assert r["loss_rel_err"] <= 1e-5 and r["ref_rel_err"] <= 1e-5, (name, r)
        assert max(r["grad_rel_err"].values()) <= 1e-5, (name, r)
        assert r["vs_pair"] > 1e-3, (name, r)  # the groups matter in this batch
    for name, r in groups_ring_run["accum"].items():  # GradCache with the ring against the gather, full batch
        assert r["loss_rel_err"] <= 1e-5 and r["grad_rel_err"] <= 1e-5, (name, r)


def test_config_keys_are_validated():
    with pytest.raises(
        ConfigError, match=r"config.loss_positives = 'class': must be one of 'pair', 'caption', 'label'"
    ):
        validate_config(tiny_train_config(loss_positives="class"))
    with pytest.raises(ConfigError, match=r"config.loss_positives = 'label': must be 'pair' or 'caption' with"):
        validate_config(tiny_train_config(**{"loss_positives": "label", "data.name": "tfds"}))
    validate_config(tiny_train_config(**{"loss_positives": "caption", "data.distinct_captions": True}))


def _labelled_table(root, n=10):
    """n images, two captions each on its own row; label column = i % 3 as words."""
    names = write_images(root, n, bad=False)
    words = ("猫", "狗", "鸟")
    rows = [(name, f"第{i}张图的说明{k}", words[i % 3]) for i, name in enumerate(names) for k in range(2)]
    write_csv(root / "labelled.csv", rows, header=("image", "caption", "label"))
    return root / "labelled.csv", {caption: label for _, caption, label in rows}


def test_files_labels_reach_the_batches(tmp_path):
    table, label_of = _labelled_table(tmp_path)
    cfg = default_data_config("files")
    cfg.files.table, cfg.num_threads = str(table), 1
    it = train_iterator(cfg, global_batch_size=8, seed=0, image_size=16, labels=True, process_index=0, process_count=1)
    texts = it._encode_text  # the batch's captions, read back from the token ids
    vocab = {tuple(texts([c])["input_ids"][0]): c for c in label_of}
    for _ in range(3):
        batch = next(it)
        captions = [vocab[tuple(row)] for row in batch["input_ids"]]
        np.testing.assert_array_equal(batch["label"], [label_id(label_of[c]) for c in captions])
    assert len({label_id(w) for w in ("猫", "狗", "鸟")}) == 3 and label_id(7) == 7
    cfg.files.label_key = "class"  # a column the table lacks: one line, before any work
    with pytest.raises(ValueError, match=r"loss_positives='label' needs a label per record, and this source gives"):
        train_iterator(cfg, global_batch_size=8, seed=0, image_size=16, labels=True, process_index=0, process_count=1)


@pytest.mark.slow
def test_label_positives_train_from_a_files_table(tmp_path):
    table, _ = _labelled_table(tmp_path / "data")
    config = tiny_train_config(3, **{"data.name": "files", "data.files.table": str(table), "loss_positives": "label"})
    config.checkpoint_every = 3
    train(config, str(tmp_path / "run"), progress=False)
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        losses = [r["train/loss"] for r in map(json.loads, f) if "train/loss" in r]
    assert len(losses) == 3 and all(np.isfinite(losses))


def _demo_iterator(distinct, batch=32):
    cfg = default_data_config("demo")
    cfg.demo.num_train, cfg.num_threads, cfg.distinct_captions = 3000, 1, distinct
    return train_iterator(cfg, global_batch_size=batch, seed=0, image_size=16, process_index=0, process_count=1)


def _rows(batch):
    return [tuple(r) for r in batch["input_ids"]]


def test_distinct_captions_keeps_repeats_out_of_a_batch_and_resumes_exactly():
    plain = [_rows(next(_demo_iterator(False))) for _ in range(1)][0]
    assert len(set(plain)) < len(plain)  # the demo's short captions repeat within a batch
    it = _demo_iterator(True)
    for _ in range(4):
        rows = _rows(next(it))
        assert len(set(rows)) == len(rows)
    state = json.loads(json.dumps(it.get_state()))
    assert state["distinct"]["waiting"]  # samples are waiting: the resume below has something to restore
    expected = [next(it) for _ in range(4)]
    resumed = _demo_iterator(True)
    resumed.set_state(state)
    for a, b in zip(expected, (next(resumed) for _ in range(4))):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    assert it.stats == resumed.stats
    with pytest.raises(ValueError, match="data.distinct_captions is False but the checkpoint's data state"):
        _demo_iterator(False).set_state(state)
