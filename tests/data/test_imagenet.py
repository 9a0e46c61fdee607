"""ImageNet preprocessing (NumPy/Pillow) and the process-sharded ImageNetBatches iterator."""

from __future__ import annotations

import io

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from mpdnn.data import (
    IMAGENET_MEAN_RGB,
    IMAGENET_STD_RGB,
    DataError,
    ImageNetBatches,
    normalize_imagenet,
    preprocess_imagenet_eval,
    preprocess_imagenet_train,
)
from tests.data.images import jpeg_bytes


def random_image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize(
    "hw, resized, box",
    [
        # torchvision Resize(256): long side int(256·400/300) = 341; CenterCrop(224) starts at
        # round((341-224)/2) = round(58.5) = 58 and (256-224)/2 = 16.
        ((300, 400), (341, 256), (58, 16)),
        ((400, 300), (256, 341), (16, 58)),
        ((256, 256), (256, 256), (16, 16)),
    ],
)
def test_eval_is_resize_then_center_crop(hw, resized, box):
    image = random_image(*hw)
    expected = np.asarray(Image.fromarray(image).resize(resized, Image.BILINEAR))
    left, top = box
    expected = expected[top : top + 224, left : left + 224]
    out = preprocess_imagenet_eval(image)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected)


def test_jpeg_bytes_and_arrays_give_the_same_result():
    image = random_image(40, 50)
    data = jpeg_bytes(image)
    decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    np.testing.assert_array_equal(
        preprocess_imagenet_eval(data, size=16, resize=20),
        preprocess_imagenet_eval(decoded, size=16, resize=20),
    )
    rng = lambda: np.random.default_rng(4)  # noqa: E731
    np.testing.assert_array_equal(
        preprocess_imagenet_train(data, rng(), size=16),
        preprocess_imagenet_train(decoded, rng(), size=16),
    )
    gray = preprocess_imagenet_eval(np.full((20, 20, 1), 9, np.uint8), size=8, resize=10)
    assert gray.shape == (8, 8, 3) and (gray == 9).all()


def test_train_crop_shapes_and_determinism():
    image = random_image(60, 80)
    outs = [preprocess_imagenet_train(image, np.random.default_rng(s), size=32) for s in range(8)]
    assert all(o.shape == (32, 32, 3) and o.dtype == np.uint8 for o in outs)
    again = preprocess_imagenet_train(image, np.random.default_rng(0), size=32)
    np.testing.assert_array_equal(again, outs[0])
    assert len({o.tobytes() for o in outs}) == len(outs), "crops must be random"


def test_train_crop_falls_back_to_center_crop_for_extreme_aspect():
    # 8×200: no crop with area ≥ 8% and aspect ≤ 4/3 fits under height 8, so the fallback
    # takes the 4/3 center crop: width round(8·4/3) = 11 at column (200-11)//2 = 94.
    columns = np.broadcast_to(np.arange(200, dtype=np.uint8)[None, :, None], (8, 200, 3))
    for seed in range(4):
        out = preprocess_imagenet_train(
            np.ascontiguousarray(columns), np.random.default_rng(seed), 16
        )
        assert out.min() >= 94 and out.max() <= 104


def test_train_flips_about_half_the_time():
    # A left-to-right ramp stays a ramp under any crop; its direction shows the flip.
    ramp = np.ascontiguousarray(
        np.broadcast_to(np.arange(64, dtype=np.uint8)[None, :, None] * 4, (64, 64, 3))
    )
    flipped = [
        preprocess_imagenet_train(ramp, np.random.default_rng(s), 8)[0, 0, 0]
        > preprocess_imagenet_train(ramp, np.random.default_rng(s), 8)[0, -1, 0]
        for s in range(64)
    ]
    assert 16 < sum(flipped) < 48


def test_normalize_imagenet_uses_torchvision_statistics():
    np.testing.assert_allclose(IMAGENET_MEAN_RGB / 255, [0.485, 0.456, 0.406], rtol=1e-6)
    np.testing.assert_allclose(IMAGENET_STD_RGB / 255, [0.229, 0.224, 0.225], rtol=1e-6)
    images = np.stack(
        [
            np.broadcast_to(IMAGENET_MEAN_RGB, (2, 2, 3)),
            np.broadcast_to(IMAGENET_MEAN_RGB + IMAGENET_STD_RGB, (2, 2, 3)),
        ]
    )
    out = normalize_imagenet(images)
    np.testing.assert_allclose(out[0], 0, atol=1e-5)
    np.testing.assert_allclose(out[1], 1, atol=1e-5)
    np.testing.assert_allclose(normalize_imagenet(jnp.asarray(images)), out, atol=1e-5)


def fake_source(n, *, as_jpeg):
    """Record i: a constant image of colour (i·9 % 256) and label i."""
    records = []
    for i in range(n):
        image = np.full((12, 10, 3), i * 9 % 256, np.uint8)
        records.append(
            {"image": jpeg_bytes(image, quality=95) if as_jpeg and i % 2 else image, "label": i}
        )
    return records


def run(source, **kwargs):
    kwargs = {"global_batch_size": 8, "size": 6, "resize": 8, "num_workers": 2, **kwargs}
    return list(ImageNetBatches(source, **kwargs))


@pytest.mark.parametrize("train", [True, False])
def test_two_processes_share_each_global_batch(train):
    source = fake_source(24, as_jpeg=True)
    single = run(source, train=train, seed=3, epoch=1)
    parts = [
        run(source, train=train, seed=3, epoch=1, process_index=p, process_count=2) for p in (0, 1)
    ]
    assert len(single) == len(parts[0]) == len(parts[1]) == 3
    seen = []
    for k, (images, labels) in enumerate(single):
        (x0, y0), (x1, y1) = parts[0][k], parts[1][k]
        assert x0.shape == (4, 6, 6, 3) and x0.dtype == np.float32 and y0.dtype == np.int32
        assert not set(y0) & set(y1)
        np.testing.assert_array_equal(np.concatenate([y0, y1]), labels)
        np.testing.assert_array_equal(np.concatenate([x0, x1]), images)
        seen += list(labels)
    assert sorted(seen) == list(range(24))
    if not train:  # evaluation keeps file order
        np.testing.assert_array_equal(parts[1][0][1], [4, 5, 6, 7])
    else:
        assert seen != list(range(24))


def test_pixels_match_their_labels():
    for images, labels in run(fake_source(16, as_jpeg=True), train=True, seed=0):
        pixels = images * IMAGENET_STD_RGB + IMAGENET_MEAN_RGB
        for x, y in zip(pixels, labels, strict=True):
            np.testing.assert_allclose(x, y * 9 % 256, atol=3)  # JPEG q95 of a flat image


def test_order_is_a_function_of_seed_and_epoch():
    source = fake_source(32, as_jpeg=False)
    labels = lambda **kw: np.concatenate([y for _, y in run(source, **kw)])  # noqa: E731
    first = labels(seed=0, epoch=0)
    np.testing.assert_array_equal(labels(seed=0, epoch=0), first)
    assert not np.array_equal(labels(seed=0, epoch=1), first)
    assert not np.array_equal(labels(seed=1, epoch=0), first)
    a = run(source, seed=0, epoch=0)
    b = run(source, seed=0, epoch=0)
    for (xa, _), (xb, _) in zip(a, b, strict=True):
        np.testing.assert_array_equal(xa, xb)


def test_remainder():
    source = fake_source(26, as_jpeg=False)
    assert len(ImageNetBatches(source, 8)) == 3
    kept = [
        run(source, train=False, drop_remainder=False, process_index=p, process_count=2)
        for p in (0, 1)
    ]
    assert [len(y) for _, y in kept[0]] == [4, 4, 4, 2] and [len(y) for _, y in kept[1]] == [
        4,
        4,
        4,
    ]


def test_bad_sharding_arguments():
    with pytest.raises(DataError, match="multiple of the process count"):
        ImageNetBatches([], 10, process_count=4)
    with pytest.raises(DataError, match="process_index"):
        ImageNetBatches([], 8, process_index=2, process_count=2)


def assert_same_batches(got, expected):
    assert len(got) == len(expected)
    for (x, y), (xe, ye) in zip(got, expected, strict=True):
        np.testing.assert_array_equal(y, ye)
        np.testing.assert_array_equal(x, xe)


def test_worker_processes_make_the_same_batches_as_threads():
    # Shuffled, augmented, process 0 of 2, with the short last share: [4, 4, 4, 2].
    kwargs = {"train": True, "seed": 5, "drop_remainder": False, "process_count": 2}
    source = fake_source(26, as_jpeg=True)
    processes = run(source, worker_processes=2, **kwargs)
    assert_same_batches(processes, run(source, **kwargs))
    assert [len(y) for _, y in processes] == [4, 4, 4, 2]


def test_iterate_from_a_batch_equals_restoring_grains_iterator_state():
    source = fake_source(40, as_jpeg=True)
    batches = ImageNetBatches(source, 8, size=6, num_workers=2, seed=2, epoch=3)
    iterator = iter(batches.dataset())
    head = [next(iterator) for _ in range(2)]
    state = iterator.get_state()
    restored = iter(batches.dataset())
    restored.set_state(state)
    tail = list(restored)
    assert_same_batches(head + tail, list(batches))
    assert_same_batches(tail, list(batches.iterate(start=2)))
    assert list(batches.iterate(start=len(batches))) == []


def test_negative_worker_processes_is_refused():
    with pytest.raises(DataError, match="worker_processes=-1"):
        ImageNetBatches([], 8, worker_processes=-1)
