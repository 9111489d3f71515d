"""The demo set's images: a pure function of (seed, split, index), the drawn shape where the
geometry says (against a whole-image reference), a noisy gradient background, balanced classes."""

import threading

import numpy as np
import pytest

from chinese_clip_jax.data import demo


def _params(split, index, seed=0):
    """(colour, shape, position, render draws) of one image, as DemoSource / EvalImages pick them."""
    if split == "train":
        u = demo._draws(seed, "train", index)
        color, shape = demo.TRAIN_COMBOS[int(u[0] * len(demo.TRAIN_COMBOS))]
        return color, shape, int(u[1] * len(demo.POSITIONS)), u[3:]
    color, shape, position, _, u = demo._eval_draw(split, index, seed)
    return color, shape, position, u


def _reference_mask(size, shape, position, u):
    """The shape's pixels, by evaluating the geometry at every pixel centre of the whole image
    (the pre-cache renderer's way), with the documented quantisation: centre on a 1/4 px grid,
    radius at the middle of one of 16 levels over 0.15-0.21 of the side."""
    fx, fy = demo.POSITIONS[list(demo.POSITIONS)[position]]
    cx = round((fx + 0.1 * u[6] - 0.05) * size * 4) / 4
    cy = round((fy + 0.1 * u[7] - 0.05) * size * 4) / 4
    r = (0.15 + 0.06 * (int(u[8] * 16) + 0.5) / 16) * size
    xs, ys = np.meshgrid(np.arange(size) + 0.5, np.arange(size) + 0.5, indexing="xy")
    return demo._shape_mask(shape, xs - cx, ys - cy, r, angle=-np.pi / 2)


def test_images_are_a_pure_function_of_seed_split_and_index():
    a = demo.DemoSource(image_size=32, num_train=50, seed=0)
    b = demo.DemoSource(image_size=32, num_train=50, seed=0)
    forward = [a[i] for i in range(50)]
    backward = [b[i] for i in reversed(range(50))][::-1]  # another instance, another order
    for x, y in zip(forward, backward):
        np.testing.assert_array_equal(x["image"], y["image"])
        assert x["text"] == y["text"] and x["image"].dtype == np.uint8 and x["image"].shape == (32, 32, 3)
    # drawn from 4 threads at once (as grain's readers do): the same images
    out = {}

    def draw(lo):
        for i in range(lo, 50, 4):
            out[i] = demo.DemoSource(image_size=32, num_train=50, seed=0)[i]["image"]

    threads = [threading.Thread(target=draw, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(50):
        np.testing.assert_array_equal(out[i], forward[i]["image"])
    # every index, seed and split gives another image
    images = [x["image"].tobytes() for x in forward]
    other_seed = demo.DemoSource(image_size=32, num_train=50, seed=1)
    images += [other_seed[i]["image"].tobytes() for i in range(50)]
    for split in ("zeroshot", "zeroshot_unseen", "retrieval"):
        images += [im.tobytes() for im in demo.eval_images(split, image_size=32, count=50)[0]]
    assert len(set(images)) == len(images) == 250


@pytest.mark.parametrize("size", [32, 48, 224])
def test_shape_pixels_are_the_geometry_at_every_pixel_centre(size):
    """Cached, cropped and placed masks = the shape evaluated over the whole image; those pixels and
    only those have the drawn colour."""
    shapes_seen = set()
    cases = [("train", i) for i in range(60)] + [("zeroshot_unseen", i) for i in range(12)]
    for split, i in cases:
        color, shape, position, u = _params(split, i)
        if split == "train":
            image = demo.DemoSource(image_size=size, num_train=100)[i]["image"]
        else:
            image = demo.EvalImages(split, image_size=size, count=100)[i]
        mask = _reference_mask(size, shape, position, u)
        rgb = [min(int(c + 30 * t - 15), 255) for c, t in zip(demo.COLORS[list(demo.COLORS)[color]], u[9:12])]
        np.testing.assert_array_equal((image == rgb).all(axis=-1), mask, err_msg=f"{split}[{i}]")
        assert 0.02 < mask.mean() < 0.15  # radius 0.15-0.21 of the side (a star covers least, a circle most)
        shapes_seen.add(shape)
    assert shapes_seen == set(range(len(demo.SHAPES)))


def test_background_is_a_grey_gradient_with_pixel_noise():
    size = 32
    xs, ys = np.meshgrid(np.arange(size) + 0.5 - size / 2, np.arange(size) + 0.5 - size / 2, indexing="xy")
    residuals = []
    for i in range(20):
        color, shape, position, u = _params("train", i)
        image = demo.DemoSource(image_size=size, num_train=20)[i]["image"].astype(np.float64)
        keep = ~_reference_mask(size, shape, position, u)
        design = np.stack([np.ones(keep.sum()), xs[keep], ys[keep]], axis=1)
        coef, *_ = np.linalg.lstsq(design, image[keep], rcond=None)  # (3 terms, 3 channels)
        level = 60 + 130 * u[0]
        # the fitted plane is the drawn one (up to noise and flooring to integers: -0.5 on average)
        np.testing.assert_allclose(coef[0], [level + 28 * t - 14 - 0.5 for t in u[1:4]], atol=1.0)
        np.testing.assert_allclose(coef[1], (60 * u[4] - 30) / size, atol=0.1)
        np.testing.assert_allclose(coef[2], (60 * u[5] - 30) / size, atol=0.1)
        res = image[keep] - design @ coef
        assert 4.3 < res.std() < 5.5  # N(0, 5^2) noise (clipped at 3 std), floored to integers
        assert np.abs(res).max() < 17
        residuals.append(res[:50])
    assert not np.allclose(residuals[0], residuals[1], atol=1.0)  # each image its own noise


def test_classes_positions_and_draws_are_balanced():
    n = 4800
    source = demo.DemoSource(image_size=16, num_train=n, seed=3)
    colors, shapes, positions = list(demo.COLORS), list(demo.SHAPES), list(demo.POSITIONS)
    combos, places = np.zeros(len(demo.TRAIN_COMBOS)), np.zeros(len(positions))
    for i in range(n):
        text = source[i]["text"]
        (c,) = [k for k, name in enumerate(colors) if name in text]
        (s,) = [k for k, name in enumerate(shapes) if name in text]
        combos[demo.TRAIN_COMBOS.index((c, s))] += 1
        named = [k for k, name in enumerate(positions) if name in text]  # 3 of the 5 phrasings name it
        assert len(named) <= 1, text
        places[named] += 1
    # each of 24 classes ~ Binomial(4800, 1/24): mean 200, std 14
    assert np.abs(combos - n / len(combos)).max() < 5 * 14, combos
    assert np.abs(places / places.sum() - 1 / 9).max() < 0.025, places
    u = np.array([demo._draws(0, "retrieval", i) for i in range(2000)])
    assert u.min() >= 0 and u.max() < 1
    counts = np.stack([np.histogram(col, bins=10, range=(0, 1))[0] for col in u.T])
    assert np.abs(counts - 200).max() < 5 * 14, counts  # each of the 16 draws uniform
    assert np.abs(np.corrcoef(u.T) - np.eye(16)).max() < 0.12  # and uncorrelated
