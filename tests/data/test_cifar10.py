"""load_cifar10: the shared JPEG copy, its lookup order, and failing fast when nothing is there."""

from __future__ import annotations

import io
import tarfile
import time

import numpy as np
import pytest
from PIL import Image

import mpdnn.data.cifar10 as cifar10
from mpdnn.data import DataError, find_cifar10_archive, load_cifar10
from tests.data.images import make_files, pillow_decode, write_tar

# Alphabetical, which is also tfds's and the original CIFAR-10 label order.
NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@pytest.fixture
def no_tfds(tmp_path, monkeypatch):
    """tfds's default data dir is an empty folder, as on these machines."""
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds-empty"))


def test_shared_copy(tmp_path, no_tfds):
    archive = find_cifar10_archive()
    if archive is None:
        pytest.skip("shared CIFAR-10 copy (cifar10-jpeg.tar.gz) not found on this machine")
    ds = load_cifar10(cache_dir=tmp_path, max_per_class=5)
    assert ds.name == "cifar10" and ds.class_names == NAMES and ds.num_classes == 10
    assert (ds.num_train, ds.num_test) == (50, 50)
    assert ds.image_shape == (32, 32, 3)
    np.testing.assert_array_equal(np.bincount(ds.train_labels), [5] * 10)
    assert str(archive) in ds.description and "lossy" in ds.description
    # The first training image is train/airplane/0000.jpg, decoded like Pillow does.
    with tarfile.open(archive, "r|gz") as members:
        first = next(members.extractfile(m).read() for m in members if m.isfile())
    np.testing.assert_array_equal(ds.train_images[0], pillow_decode(first))


def test_lookup_order(tmp_path, monkeypatch):
    explicit = tmp_path / "mine.tar.gz"
    explicit.write_bytes(b"")
    monkeypatch.setenv("MPDNN_CIFAR10", str(explicit))
    assert find_cifar10_archive() == explicit
    monkeypatch.setenv("MPDNN_CIFAR10", str(tmp_path / "missing.tar.gz"))
    found = find_cifar10_archive()
    assert found is None or found.name == "cifar10-jpeg.tar.gz"


def test_nothing_found_fails_fast_with_the_option_to_pass(tmp_path, monkeypatch, no_tfds):
    monkeypatch.setattr(cifar10, "find_cifar10_archive", lambda: None)
    start = time.perf_counter()
    with pytest.raises(DataError) as err:
        load_cifar10(cache_dir=tmp_path)
    assert time.perf_counter() - start < 5
    message = str(err.value)
    assert "\n" not in message
    assert "--config.data.dir=" in message and "cannot download" in message


def test_unprepared_tfds_data_dir_fails_fast(tmp_path):
    (tmp_path / "cifar10" / "3.0.2").mkdir(parents=True)  # looks like a tfds dir, but empty
    start = time.perf_counter()
    with pytest.raises(DataError) as err:
        load_cifar10(tmp_path)
    assert time.perf_counter() - start < 5
    message = str(err.value)
    assert "\n" not in message and "not prepared" in message
    assert "mpdnn[tf]" in message and "--config.data.dir" in message


def test_missing_data_dir(tmp_path):
    with pytest.raises(DataError, match="not found: .*nope") as err:
        load_cifar10(tmp_path / "nope")
    assert "\n" not in str(err.value)


def test_explicit_folder_with_cifar_classes(tmp_path):
    files = make_files({"train": dict.fromkeys(NAMES, 2), "test": dict.fromkeys(NAMES, 1)})
    ds = load_cifar10(write_tar(tmp_path / "c.tar.gz", files), cache_dir=tmp_path / "cache")
    assert ds.name == "cifar10" and ds.class_names == NAMES
    np.testing.assert_array_equal(ds.test_labels, np.arange(10))


def test_explicit_folder_with_other_classes(tmp_path):
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, format="JPEG")
    files = {f"{s}/{c}/0.jpg": buffer.getvalue() for s in ("train", "test") for c in ("a", "b")}
    with pytest.raises(DataError, match="not the 10 CIFAR-10 classes"):
        load_cifar10(write_tar(tmp_path / "c.tar.gz", files), cache_dir=tmp_path / "cache")


def test_online_with_tensorflow_builds_through_tfds(monkeypatch, no_tfds):
    monkeypatch.setattr(cifar10, "find_cifar10_archive", lambda: None)
    calls = []
    monkeypatch.setattr(cifar10, "_can_build_with_tfds", lambda: True)
    monkeypatch.setattr(cifar10, "_build_with_tfds", lambda: calls.append("build"))
    monkeypatch.setattr(cifar10, "_from_tfds", lambda d, m: calls.append(("read", d, m)) or "ds")
    assert load_cifar10(max_per_class=3) == "ds"
    assert calls == ["build", ("read", None, 3)]


def test_without_tensorflow_nothing_touches_the_network(monkeypatch):
    import importlib.util
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("network touched")

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(socket, "create_connection", no_network)
    assert cifar10._can_build_with_tfds() is False


def test_unreachable_network_is_not_online(monkeypatch):
    import importlib.util
    import socket

    def refused(*args, **kwargs):
        raise OSError("unreachable")

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(socket, "create_connection", refused)
    assert cifar10._can_build_with_tfds() is False
