"""load_image_folder on tiny directory and tar.gz trees: labels, decoding, cache, bad layouts."""

from __future__ import annotations

import os

import numpy as np
import pytest

import mpdnn.data.image_folder as image_folder
from mpdnn.data import DataError, load_image_folder
from tests.data.images import make_files, pillow_decode, write_tar, write_tree

SORTED = ("ant", "mole", "zebra")


@pytest.fixture(params=["dir", "tar"])
def source(request, tmp_path, small_files):
    if request.param == "dir":
        return write_tree(tmp_path / "tree", small_files)
    return write_tar(tmp_path / "tree.tar.gz", small_files)


def expected(files, split, max_per_class=None):
    """Images and labels in the documented order: sorted class, then sorted file name."""
    images, labels = [], []
    for label, name in enumerate(SORTED):
        rels = sorted(r for r in files if r.startswith(f"{split}/{name}/"))[:max_per_class]
        images += [pillow_decode(files[r]) for r in rels]
        labels += [label] * len(rels)
    return np.stack(images), np.array(labels, np.int32)


def test_loads_sorted_labels_and_decodes_like_pillow(source, small_files, tmp_path):
    ds = load_image_folder(source, cache_dir=tmp_path / "cache")
    assert ds.class_names == SORTED and ds.num_classes == 3
    assert ds.image_shape == (8, 8, 3)
    assert (ds.pixel_scale, ds.pixel_offset) == (2 / 255, -1.0)
    for split in ("train", "test"):
        images, labels = expected(small_files, split)
        np.testing.assert_array_equal(getattr(ds, f"{split}_labels"), labels)
        np.testing.assert_array_equal(getattr(ds, f"{split}_images"), images)
        assert getattr(ds, f"{split}_images").dtype == np.uint8
    assert str(source) in ds.description


def test_cache_is_written_and_reused(source, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = load_image_folder(source, cache_dir=cache)
    assert len(list(cache.glob("*.npz"))) == 1
    assert not [p for p in cache.iterdir() if p.suffix != ".npz"]  # no temp files left over

    def boom(data):
        raise AssertionError("decoded although the cache is valid")

    monkeypatch.setattr(image_folder, "decode_image", boom)
    second = load_image_folder(source, cache_dir=cache)
    np.testing.assert_array_equal(second.train_images, first.train_images)
    np.testing.assert_array_equal(second.test_labels, first.test_labels)
    assert second.class_names == first.class_names


def test_cache_dir_from_environment(source, tmp_path, monkeypatch):
    monkeypatch.setenv("MPDNN_CACHE_DIR", str(tmp_path / "env-cache"))
    load_image_folder(source)
    assert len(list((tmp_path / "env-cache").glob("*.npz"))) == 1


def test_corrupt_cache_falls_back_to_decoding(source, tmp_path, capsys):
    cache = tmp_path / "cache"
    first = load_image_folder(source, cache_dir=cache)
    (cache_file,) = cache.glob("*.npz")
    cache_file.write_bytes(b"not a zip file")
    again = load_image_folder(source, cache_dir=cache)
    np.testing.assert_array_equal(again.train_images, first.train_images)
    assert "unreadable cache" in capsys.readouterr().err
    with np.load(cache_file) as f:  # rewritten, readable again
        np.testing.assert_array_equal(f["test_images"], first.test_images)


def test_changed_source_misses_the_cache(source, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    load_image_folder(source, cache_dir=cache)
    calls = []
    real = image_folder.decode_image
    monkeypatch.setattr(image_folder, "decode_image", lambda d: calls.append(1) or real(d))
    touched = source if source.is_file() else next(source.glob("train/ant/*.jpg"))
    st = touched.stat()
    os.utime(touched, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    load_image_folder(source, cache_dir=cache)
    assert calls, "a modified source must be decoded again"


def test_max_per_class_takes_first_sorted_files(source, small_files, tmp_path):
    ds = load_image_folder(source, cache_dir=tmp_path / "cache", max_per_class=1)
    for split in ("train", "test"):
        images, labels = expected(small_files, split, max_per_class=1)
        np.testing.assert_array_equal(getattr(ds, f"{split}_labels"), [0, 1, 2])
        np.testing.assert_array_equal(getattr(ds, f"{split}_images"), images)
    full = load_image_folder(source, cache_dir=tmp_path / "cache")
    assert full.num_train == 9, "max_per_class must be part of the cache key"
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2


def test_wrapping_top_level_folder_is_allowed(tmp_path, small_files):
    tar = write_tar(tmp_path / "wrapped.tar.gz", small_files, prefix="cifar/")
    tree = write_tree(tmp_path / "outer" / "inner", small_files)
    for src in (tar, tree.parent):
        ds = load_image_folder(src, cache_dir=tmp_path / "cache")
        assert ds.class_names == SORTED and ds.num_train == 9 and ds.num_test == 6


def test_grayscale_images_become_rgb(tmp_path):
    from PIL import Image

    path = tmp_path / "gray"
    for split in ("train", "test"):
        (path / split / "a").mkdir(parents=True)
        Image.new("L", (5, 4), 77).save(path / split / "a" / "x.png")
    ds = load_image_folder(path, cache_dir=tmp_path / "cache")
    assert ds.image_shape == (4, 5, 3)
    assert (ds.train_images == 77).all()


def bad_layouts(small_files):
    """Each case: the files, and a phrase the one-line error must contain."""
    odd_size = make_files({"train": {"ant": 1}}, size=(9, 9))
    return {
        "no test/": ({k: v for k, v in small_files.items() if k.startswith("train/")}, "no test/"),
        "class only in train": ({**small_files, **make_files({"train": {"owl": 1}})}, "owl"),
        "class without images": (
            {k: v for k, v in small_files.items() if not k.startswith("test/ant/")},
            "test/ant/ has no images",
        ),
        "mixed sizes": ({**small_files, **odd_size}, "one size"),
        "corrupt image": ({**small_files, "test/mole/000.jpg": b"not a jpeg"}, "test/mole/000.jpg"),
        "no images": ({}, "no train/ folder"),
    }


@pytest.mark.parametrize(
    "case",
    ["no test/", "class only in train", "class without images", "mixed sizes", "corrupt image",
     "no images"],
)  # fmt: skip
@pytest.mark.parametrize("kind", ["dir", "tar"])
def test_bad_layouts_raise_one_line_data_errors(case, kind, tmp_path, small_files):
    files, needle = bad_layouts(small_files)[case]
    if kind == "dir":
        src = write_tree(tmp_path / "tree", files)
        src.mkdir(exist_ok=True)
        (src / "test" / "ant").mkdir(parents=True, exist_ok=True)  # empty class folder
        if case == "no test/":
            (src / "test" / "ant").rmdir()
            (src / "test").rmdir()
    else:
        src = write_tar(tmp_path / "tree.tar.gz", files, dirs=("test/ant",) * (case != "no test/"))
    with pytest.raises(DataError) as err:
        load_image_folder(src, cache_dir=tmp_path / "cache")
    message = str(err.value)
    assert "\n" not in message
    assert needle in message


def test_no_class_folders(tmp_path):
    for split in ("train", "test"):
        (tmp_path / "tree" / split).mkdir(parents=True)
    with pytest.raises(DataError, match="no class folders"):
        load_image_folder(tmp_path / "tree", cache_dir=tmp_path / "cache")


def test_missing_path_and_non_archive(tmp_path):
    with pytest.raises(DataError, match="not found: .*nowhere") as err:
        load_image_folder(tmp_path / "nowhere", cache_dir=tmp_path / "cache")
    assert "\n" not in str(err.value)
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(DataError, match="cannot read .*junk.tar.gz as a tar archive") as err:
        load_image_folder(junk, cache_dir=tmp_path / "cache")
    assert "\n" not in str(err.value)
    with pytest.raises(DataError, match="max_per_class"):
        load_image_folder(junk, cache_dir=tmp_path / "cache", max_per_class=0)


def test_unwritable_cache_still_loads(source, tmp_path, capsys):
    blocker = tmp_path / "file-not-dir"
    blocker.write_text("x")
    ds = load_image_folder(source, cache_dir=blocker / "cache")
    assert ds.num_train == 9
    assert "could not write cache" in capsys.readouterr().err


def test_cache_with_missing_arrays_falls_back(source, tmp_path):
    cache = tmp_path / "cache"
    first = load_image_folder(source, cache_dir=cache)
    (cache_file,) = cache.glob("*.npz")
    with np.load(cache_file) as f:
        kept = {k: f[k] for k in f.files if k != "test_labels"}
    np.savez(cache_file, **kept)
    again = load_image_folder(source, cache_dir=cache)
    np.testing.assert_array_equal(again.test_labels, first.test_labels)
