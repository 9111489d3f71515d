"""Recall and zero-shot accuracy against hand-computed cases and a cn_clip-style brute force."""

import json

import numpy as np
import pytest

from chinese_clip_jax.evaluation.metrics import load_retrieval_jsonl, retrieval_metrics, zero_shot_accuracy


def _onehot(idx, dim):
    e = np.zeros((len(idx), dim), np.float32)
    e[np.arange(len(idx)), idx] = 1
    return e


def test_hand_computed_recall_with_ties_and_several_positives():
    # 1-D embeddings: score = text * image. Images: values [3, 2, 2, 1] (indices 0..3).
    images = np.array([[3.0], [2.0], [2.0], [1.0]], np.float32)
    # text 0 (positive value): ranking 0, 1, 2, 3 (the tie 1/2 broken by lower index first)
    # text 1 (negative value): ranking 3, 1, 2, 0
    texts = np.array([[1.0], [-1.0], [1.0]], np.float32)
    text_to_images = [
        [2],  # rank 2 -> miss @1, hit @5 (tie with image 1, which ranks first)
        [1, 0],  # ranks 1 and 3 -> best rank 1: miss @1, hit @5
        [0, 3],  # rank 0 -> hit @1
    ]
    m = retrieval_metrics(texts, images, text_to_images, block_size=2)
    assert m["t2i_R@1"] == pytest.approx(1 / 3)
    assert m["t2i_R@5"] == 1.0 and m["t2i_R@10"] == 1.0
    # image -> text. Texts [1, -1, 1]; images with a text: 0, 1, 2, 3 (all).
    # image 0 (3): scores [3, -3, 3] -> ranking t0, t2, t1; positives {1, 2}: best rank 1 -> miss @1
    # image 1 (2): ranking t0, t2, t1; positives {1} -> rank 2 -> miss @1
    # image 2 (2): ranking t0, t2, t1; positives {0} -> rank 0 -> hit @1
    # image 3 (1): ranking t0, t2, t1; positives {2} -> rank 1 -> miss @1
    assert m["i2t_R@1"] == pytest.approx(1 / 4)
    assert m["i2t_R@5"] == 1.0 and m["i2t_R@10"] == 1.0
    assert m["mean_recall"] == pytest.approx((1 / 3 + 1 + 1 + 1 / 4 + 1 + 1) / 6)


def test_recall_at_5_and_10_boundaries():
    # 12 images, one text scoring image j as -j: ranking is 0, 1, ..., 11.
    images = np.arange(12, dtype=np.float32)[:, None]
    texts = -np.ones((4, 1), np.float32)
    pos = [[4], [5], [9], [10, 11]]  # ranks 4 (hit@5), 5 (hit@10 only), 9 (hit@10), 10 (miss)
    m = retrieval_metrics(texts, images, pos, block_size=5)
    assert (m["t2i_R@1"], m["t2i_R@5"], m["t2i_R@10"]) == (0.0, 0.25, 0.75)
    # only images 4, 5, 9, 10, 11 are queries; all texts tie -> text order decides
    # image 4 -> t0 rank 0, image 5 -> t1 rank 1, image 9 -> t2 rank 2, 10/11 -> t3 rank 3
    assert (m["i2t_R@1"], m["i2t_R@5"], m["i2t_R@10"]) == (0.2, 1.0, 1.0)


def test_text_without_positive_is_a_miss_and_bad_index_is_named():
    images = _onehot([0, 1], 2)
    texts = _onehot([0, 1], 2)
    m = retrieval_metrics(texts, images, [[0], []])
    assert m["t2i_R@10"] == 0.5
    assert m["i2t_R@1"] == 1.0  # only image 0 has a text
    with pytest.raises(ValueError, match="text 1: image index 7"):
        retrieval_metrics(texts, images, [[0], [7]])
    with pytest.raises(ValueError, match="2 entries for 3 texts"):
        retrieval_metrics(_onehot([0, 1, 1], 2), images, [[0], [1]])


def _brute_force(texts, images, text_to_images):
    """cn_clip's algorithm: per query, Python's stable sorted() over all candidates."""

    def recall(queries, cands, positives):
        hits = np.zeros(3)
        for q, pos in zip(queries, positives):
            scores = [(j, float(np.dot(q, c))) for j, c in enumerate(cands)]
            top = [j for j, _ in sorted(scores, key=lambda x: x[1], reverse=True)[:10]]
            hits += [any(p in top[:k] for p in pos) for k in (1, 5, 10)]
        return hits / len(queries)

    i2t = {}
    for t, imgs in enumerate(text_to_images):
        for j in imgs:
            i2t.setdefault(j, []).append(t)
    img_q = sorted(i2t)
    return (recall(texts, images, text_to_images), recall(images[img_q], texts, [i2t[j] for j in img_q]))


@pytest.mark.parametrize("block_size", [1, 3, 7, 2048])
def test_matches_brute_force_with_many_ties(block_size):
    rng = np.random.default_rng(0)
    # small integer embeddings: exact float dot products and lots of tied scores
    texts = rng.integers(-2, 3, (37, 4)).astype(np.float32)
    images = rng.integers(-2, 3, (23, 4)).astype(np.float32)
    text_to_images = [list(rng.choice(23, size=rng.integers(1, 4), replace=False)) for _ in range(37)]
    m = retrieval_metrics(texts, images, text_to_images, block_size=block_size)
    t2i, i2t = _brute_force(texts, images, text_to_images)
    np.testing.assert_allclose([m["t2i_R@1"], m["t2i_R@5"], m["t2i_R@10"]], t2i)
    np.testing.assert_allclose([m["i2t_R@1"], m["i2t_R@5"], m["i2t_R@10"]], i2t)


def test_zero_shot_accuracy_hand_computed():
    classes = np.array([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]], np.float32)
    images = np.array(
        [
            [1.0, 0.0],  # scores 1, 0, .7 -> ranking 0, 2, 1
            [0.0, 1.0],  # ranking 1, 2, 0
            [1.0, 1.0],  # scores 1, 1, 1.4 -> ranking 2, 0, 1 (tie 0/1: lower index first)
            [-1.0, 0.0],  # scores -1, 0, -.7 -> ranking 1, 2, 0
        ],
        np.float32,
    )
    labels = [0, 2, 1, 0]
    acc = zero_shot_accuracy(images, classes, labels, topk=(1, 2, 3, 5))
    assert acc == {"top1": 0.25, "top2": 0.5, "top3": 1.0, "top5": 1.0}
    # a tie decided by index: image [1, 1] vs classes 0 and 1 only -> class 0 first
    assert zero_shot_accuracy([[1.0, 1.0]], classes[:2], [0], topk=(1,))["top1"] == 1.0
    assert zero_shot_accuracy([[1.0, 1.0]], classes[:2], [1], topk=(1,))["top1"] == 0.0
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\)"):
        zero_shot_accuracy(images, classes, [0, 1, 2, 3])


def test_load_retrieval_jsonl(tmp_path):
    path = tmp_path / "valid_texts.jsonl"
    rows = [{"text_id": 10, "text": "一只猫", "image_ids": [7, 3]}, {"text_id": 11, "text": "两只狗", "image_ids": [5]}]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    ann = load_retrieval_jsonl(path)
    assert ann.image_ids == [3, 5, 7]
    assert ann.text_to_images == [[2, 0], [1]]
    assert ann.texts == ["一只猫", "两只狗"] and ann.text_ids == [10, 11]
    ann = load_retrieval_jsonl(path, image_ids=[5, 7, 3, 99])
    assert ann.text_to_images == [[1, 2], [0]]
    with pytest.raises(ValueError, match="image id 3 is not in the image pool"):
        load_retrieval_jsonl(path, image_ids=[5, 7])
    path.write_text('{"text_id": 1}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="valid_texts.jsonl:1"):
        load_retrieval_jsonl(path)


def _exact_scores(a, b):
    """float64 products summed pair by pair (not a matrix product, which can itself score a copy
    apart from its original): exact copies get exactly equal scores."""
    b = b.astype(np.float64)
    return np.stack([(b * row).sum(axis=-1) for row in a.astype(np.float64)])


@pytest.mark.parametrize("block_size", [7, 64, 2048])
def test_exact_duplicates_score_identically_and_the_lower_index_wins(block_size):
    """768-d vectors with exact copies scattered among the candidates and the queries. Blocked
    float32 matrix products score such copies 1-2 ulp apart here (scoring every block directly
    misranks 7 of these 200 queries at block_size 7, 4 at 64); every copy must tie its original,
    so the lower index ranks first, as cn_clip's stable sort does."""
    from chinese_clip_jax.evaluation.metrics import topk_indices

    n, d = 394, 768
    rng = np.random.default_rng(1)
    images = rng.standard_normal((n, d)).astype(np.float32)
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    images[rng.integers(0, n, 30)] = images[rng.integers(0, n, 30)]
    texts = images[rng.integers(0, n, 200)]
    texts[100:] = rng.standard_normal((100, d)).astype(np.float32)
    texts[150:160] = texts[0]  # duplicate queries
    top = topk_indices(texts, images, 10, block_size)
    ref = np.argsort(-_exact_scores(texts, images), axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(top, ref)
    np.testing.assert_array_equal(top[150:160], np.repeat(top[:1], 10, axis=0))
    text_to_images = [[int(j)] for j in rng.integers(0, n, len(texts))]
    m = retrieval_metrics(texts, images, text_to_images, block_size=block_size)
    for k in (1, 5, 10):
        assert m[f"t2i_R@{k}"] == pytest.approx(
            np.mean([ref[q, :k].tolist().count(p[0]) > 0 for q, p in enumerate(text_to_images)])
        )


def test_evaluation_package_exports_the_metric_functions():
    from chinese_clip_jax import evaluation
    from chinese_clip_jax.evaluation.metrics import (
        load_retrieval_jsonl,
        retrieval_metrics,
        topk_indices,
        zero_shot_accuracy,
    )

    assert evaluation.retrieval_metrics is retrieval_metrics
    assert evaluation.zero_shot_accuracy is zero_shot_accuracy
    assert evaluation.topk_indices is topk_indices
    assert evaluation.load_retrieval_jsonl is load_retrieval_jsonl


def test_mean_per_class_recall_hand_computed():
    """An imbalanced set: class 0 has 4 images (3 right), class 1 one (right), class 2 two (one
    right), class 3 none. Per-class recall 3/4, 1, 1/2 (class 3: no image, left out); mean 0.75,
    while top-1 is 5/7."""
    from chinese_clip_jax.evaluation import confusion_matrix, mean_per_class_recall, per_class_recall

    labels = np.array([0, 0, 0, 0, 1, 2, 2])
    predicted = np.array([0, 0, 1, 0, 1, 0, 2])
    r = per_class_recall(predicted, labels, 4)
    np.testing.assert_array_equal(r[:3], [0.75, 1.0, 0.5])
    assert np.isnan(r[3])
    assert mean_per_class_recall(predicted, labels, 4) == 0.75
    assert confusion_matrix(predicted, labels, 4).tolist() == [[3, 1, 0, 0], [0, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    with pytest.raises(ValueError, match=r"labels must be integers in \[0, 2\)"):
        per_class_recall(predicted[:2], np.array([0, 5]), 2)


def test_the_runner_reports_per_class_recall_and_top1_from_embeddings():
    """zero_shot_scores over a stub encoder whose embeddings are one-hot: the hand-computed case above."""
    from chinese_clip_jax.evaluation.runner import zero_shot_scores

    labels = np.array([0, 0, 0, 0, 1, 2, 2])
    predicted = np.array([0, 0, 1, 0, 1, 0, 2])

    class Encoder:  # the two calls the runner makes, with one-hot embeddings
        model = type("M", (), {"config": type("C", (), {"vision_config": type("V", (), {"image_size": 4})})})

        def class_embeddings(self, prompts, tokenize, **_):
            return np.eye(4, dtype=np.float32)[: len(prompts)]

        def encode_images(self, items, preprocess, **_):
            preprocess([items[i] for i in range(len(items))], 0)
            return np.eye(4, dtype=np.float32)[predicted]

    scores = zero_shot_scores(
        Encoder(),
        list(range(7)),
        labels,
        [["a"], ["b"], ["c"], ["d"]],
        tokenize=None,
        preprocess=lambda chunk, start: np.zeros((len(chunk), 3, 4, 4), np.float32),
    )
    assert scores.metrics["top1"] == pytest.approx(5 / 7) and scores.metrics["mean_per_class_recall"] == 0.75
    assert scores.support.tolist() == [4, 1, 2, 0] and scores.bad_images == []
