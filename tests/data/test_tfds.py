"""tfds data sources: fail fast on unprepared data, read prepared array_record via data_source."""

from __future__ import annotations

import sys
import time

import numpy as np
import pytest

import mpdnn.data.cifar10 as cifar10
from mpdnn.data import DataError, imagenet_source, load_cifar10, tfds_arrays


def one_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_empty_data_dir_fails_fast(tmp_path):
    start = time.perf_counter()
    with pytest.raises(DataError) as err:
        tfds_arrays("cifar10", tmp_path)
    assert time.perf_counter() - start < 5
    message = one_line(err)
    assert str(tmp_path) in message and "mpdnn[tf]" in message and "network" in message


def test_tfrecord_only_dataset_is_rejected(tmp_path):
    folder = tmp_path / "cifar10" / "3.0.2"
    folder.mkdir(parents=True)
    (folder / "dataset_info.json").write_text("{}")
    (folder / "cifar10-train.tfrecord-00000-of-00001").write_bytes(b"")
    with pytest.raises(DataError) as err:
        tfds_arrays("cifar10", tmp_path)
    assert "array_record" in one_line(err)


def test_imagenet_unprepared_says_how_to_build(tmp_path):
    start = time.perf_counter()
    with pytest.raises(DataError) as err:
        imagenet_source(tmp_path, "train")
    assert time.perf_counter() - start < 5
    message = one_line(err)
    assert "tfds build imagenet2012 --manual_dir=" in message and "mpdnn[tf]" in message


def fake_prepared(root, name="cifar10", versions=("3.0.1", "3.0.2")):
    for version in versions:
        folder = root / name / version
        folder.mkdir(parents=True)
        (folder / "dataset_info.json").write_text("{}")
        (folder / f"{name}-train.array_record-00000-of-00001").write_bytes(b"")


class FakeSource:
    """A random-access source like tfds's ArrayRecordDataSource."""

    def __init__(self, records):
        self.records = records

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        return self.records[i]

    def __getitems__(self, keys):
        return [self.records[k] for k in keys]


def test_prepared_dataset_is_read_through_data_source(tmp_path, monkeypatch):
    import tensorflow_datasets as tfds

    fake_prepared(tmp_path)
    calls = []
    rng = np.random.default_rng(0)
    records = {
        s: [
            {"image": rng.integers(0, 256, (32, 32, 3), np.uint8), "label": i % 10}
            for i in range(n)
        ]
        for s, n in (("train", 30), ("test", 20))
    }

    def data_source(spec, **kwargs):
        calls.append((spec, kwargs))
        return FakeSource(records[kwargs["split"]])

    monkeypatch.setattr(tfds, "data_source", data_source)
    arrays = tfds_arrays("cifar10", tmp_path)
    for split, recs in records.items():
        images, labels = arrays[split]
        assert images.dtype == np.uint8 and labels.dtype == np.int32
        np.testing.assert_array_equal(images, np.stack([r["image"] for r in recs]))
        np.testing.assert_array_equal(labels, [r["label"] for r in recs])
    spec, kwargs = calls[0]
    assert spec == "cifar10:3.0.2"  # the newest version on disk
    assert kwargs["download"] is False and kwargs["data_dir"] == str(tmp_path)

    ds = load_cifar10(tmp_path, max_per_class=2)  # a tfds data_dir holding cifar10/
    assert ds.num_train == 20 and ds.num_test == 20 and "tfds" in ds.description
    assert ds.class_names == cifar10.CIFAR10_CLASSES


def test_default_tfds_dir_is_preferred_when_prepared(tmp_path, monkeypatch):
    import tensorflow_datasets as tfds

    fake_prepared(tmp_path)
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
    image = {"image": np.zeros((32, 32, 3), np.uint8), "label": 3}
    monkeypatch.setattr(tfds, "data_source", lambda spec, **kw: FakeSource([image] * 4))
    ds = load_cifar10()
    assert ds.num_train == 4 and "tfds" in ds.description


def test_tfds_errors_become_one_line_data_errors(tmp_path, monkeypatch):
    import tensorflow_datasets as tfds

    fake_prepared(tmp_path)

    def broken(spec, **kwargs):
        raise NotImplementedError("first line\nsecond line")

    monkeypatch.setattr(tfds, "data_source", broken)
    with pytest.raises(DataError) as err:
        tfds_arrays("cifar10", tmp_path)
    assert "first line" in one_line(err)


def test_missing_tfds_says_which_extra(tmp_path, monkeypatch):
    fake_prepared(tmp_path)
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import now fails
    with pytest.raises(DataError) as err:
        tfds_arrays("cifar10", tmp_path)
    assert "pip install 'mpdnn[train]'" in one_line(err)
