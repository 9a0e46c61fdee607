"""digits, synthetic, ArrayDataset checks, load_dataset, and what importing mpdnn.data loads."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from mpdnn.data import ArrayDataset, DataError, load_dataset, load_digits, synthetic


def rows(images, labels):
    """Each example as one sortable row: flattened pixels then label."""
    flat = np.concatenate([images.reshape(len(images), -1).astype(int), labels[:, None]], axis=1)
    return flat[np.lexsort(flat.T[::-1])]


def test_digits_is_sklearns_data_split_stratified():
    from sklearn.datasets import load_digits as sklearn_digits

    ds = load_digits()
    assert (ds.num_train, ds.num_test) == (1437, 360)
    assert ds.image_shape == (8, 8, 1) and ds.num_classes == 10
    assert ds.train_images.dtype == np.uint8 and ds.train_labels.dtype == np.int32
    assert ds.train_images.max() == 16 and ds.train_images.min() == 0
    assert (ds.pixel_scale * 16 + ds.pixel_offset, ds.pixel_offset) == (1.0, -1.0)
    # The union of the splits is exactly scikit-learn's data, each example once.
    bunch = sklearn_digits()
    images = np.concatenate([ds.train_images, ds.test_images])[..., 0]
    labels = np.concatenate([ds.train_labels, ds.test_labels])
    np.testing.assert_array_equal(rows(images, labels), rows(bunch.images, bunch.target))
    # Stratified: every class in both splits, test share within one example of 360/1797.
    counts = np.bincount(bunch.target)
    test_counts = np.bincount(ds.test_labels, minlength=10)
    assert (test_counts > 0).all() and (np.bincount(ds.train_labels, minlength=10) > 0).all()
    assert (np.abs(test_counts - counts * 360 / 1797) < 1).all()


def test_digits_split_is_deterministic():
    a, b = load_digits(), load_digits()
    np.testing.assert_array_equal(a.test_images, b.test_images)
    np.testing.assert_array_equal(a.train_labels, b.train_labels)
    assert not np.array_equal(load_digits(seed=1).test_images, a.test_images)


def test_synthetic_shapes_and_determinism():
    a = synthetic((12, 10, 1), num_classes=4, num_train=40, num_test=8, seed=3)
    assert a.train_images.shape == (40, 12, 10, 1) and a.test_images.shape == (8, 12, 10, 1)
    assert a.train_images.dtype == np.uint8 and set(a.train_labels) <= set(range(4))
    b = synthetic((12, 10, 1), num_classes=4, num_train=40, num_test=8, seed=3)
    np.testing.assert_array_equal(a.train_images, b.train_images)
    np.testing.assert_array_equal(a.test_labels, b.test_labels)
    c = synthetic((12, 10, 1), num_classes=4, num_train=40, num_test=8, seed=4)
    assert not np.array_equal(a.train_images, c.train_images)


def test_synthetic_labels_are_learnable():
    # A nearest-class-mean classifier fit on the training split must beat chance by far.
    ds = synthetic(num_train=512, num_test=256)
    x = ds.train_images.reshape(ds.num_train, -1).astype(float)
    means = np.stack([x[ds.train_labels == c].mean(0) for c in range(10)])
    t = ds.test_images.reshape(ds.num_test, -1).astype(float)
    predictions = np.argmin(((t[:, None] - means[None]) ** 2).sum(-1), axis=1)
    assert (predictions == ds.test_labels).mean() > 0.9
    assert len(np.unique(ds.train_labels)) == 10


def make(**overrides):
    fields = dict(
        name="t",
        train_images=np.zeros((4, 2, 2, 1), np.uint8),
        train_labels=np.zeros(4, np.int32),
        test_images=np.zeros((2, 2, 2, 1), np.uint8),
        test_labels=np.ones(2, np.int32),
        num_classes=2,
        pixel_scale=1.0,
        pixel_offset=0.0,
        description="test",
    )
    return ArrayDataset(**{**fields, **overrides})


@pytest.mark.parametrize(
    "overrides, needle",
    [
        ({"train_images": np.zeros((4, 2, 2, 1), np.float32)}, "uint8"),
        ({"test_images": np.zeros((2, 2, 2), np.uint8)}, "uint8 NHWC"),
        ({"train_labels": np.zeros(4, np.int64)}, "int32"),
        ({"train_labels": np.zeros(3, np.int32)}, "4 train images but 3 labels"),
        ({"test_labels": np.full(2, 2, np.int32)}, "outside [0, 2)"),
        ({"test_images": np.zeros((2, 3, 2, 1), np.uint8)}, "one image shape"),
        ({"class_names": ("a",)}, "1 class names for 2 classes"),
    ],
)
def test_array_dataset_validation(overrides, needle):
    with pytest.raises(DataError, match=None) as err:
        make(**overrides)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_array_dataset_properties():
    ds = make()
    assert ds.image_shape == (2, 2, 1) and (ds.num_train, ds.num_test) == (4, 2)


def test_load_dataset_dispatch():
    np.testing.assert_array_equal(load_dataset("digits").test_labels, load_digits().test_labels)
    ds = load_dataset("synthetic", seed=2, image_shape=(4, 4, 3), num_train=8, num_test=4)
    assert ds.train_images.shape == (8, 4, 4, 3)
    np.testing.assert_array_equal(
        ds.train_images, synthetic((4, 4, 3), 10, 8, 4, seed=2).train_images
    )
    small = load_dataset("digits", max_per_class=3)
    assert (small.num_train, small.num_test) == (30, 30)
    np.testing.assert_array_equal(np.bincount(small.train_labels), [3] * 10)


@pytest.mark.parametrize(
    "name, kwargs, needle",
    [
        ("mnist", {}, "digits, cifar10, synthetic"),
        ("mnist", {}, "imagenet2012"),
        ("imagenet2012", {}, "imagenet_source"),
        ("digits", {"num_train": 5}, "synthetic"),
        ("synthetic", {"bogus": 1}, "bogus"),
    ],
)
def test_load_dataset_errors(name, kwargs, needle):
    with pytest.raises(DataError) as err:
        load_dataset(name, **kwargs)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_import_loads_no_heavy_dependencies():
    code = (
        "import sys, mpdnn.data; "
        "print(sorted(m for m in ('tensorflow', 'tensorflow_datasets', 'PIL', 'sklearn') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
