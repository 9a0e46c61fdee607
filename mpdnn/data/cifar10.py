"""CIFAR-10 from whatever this machine has: a prepared tfds dataset or the shared JPEG copy.

In this order: a prepared tfds ``cifar10`` (array_record) on disk; the shared lossy-JPEG copy
``cifar10-jpeg.tar.gz`` (decoded once, then cached; see :mod:`mpdnn.data.image_folder`); tfds
building it (only where TensorFlow, the ``tf`` extra, is installed *and* the download host
answers within 2 s: tfds offline would retry for minutes); else a one-line
:class:`DataError` that says which option to pass. No machine here reaches the internet
(docs/method.md §11), so the last two never apply here.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from mpdnn.data.base import ArrayDataset, DataError, take_per_class
from mpdnn.data.image_folder import load_image_folder
from mpdnn.data.tfds_source import default_tfds_data_dir, find_prepared, tfds_arrays

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
ARCHIVE_NAME = "cifar10-jpeg.tar.gz"
NOT_FOUND = (
    "CIFAR-10 not found locally and this machine cannot download it; pass "
    f"--config.data.dir=/path/to/{ARCHIVE_NAME} (layout {{train,test}}/<class>/*.jpg) "
    "or a prepared tfds data_dir"
)


def find_cifar10_archive() -> Path | None:
    """The shared local copy: ``$MPDNN_CIFAR10``, then ``<repo>/../shared/data/``, then
    ``/work/shared/data/``; the first path that exists, else None."""
    repo_root = Path(__file__).resolve().parents[2]
    candidates = [
        os.environ.get("MPDNN_CIFAR10"),
        repo_root.parent / "shared" / "data" / ARCHIVE_NAME,
        Path("/work/shared/data") / ARCHIVE_NAME,
    ]
    for candidate in candidates:
        if candidate and Path(candidate).expanduser().exists():
            return Path(candidate).expanduser()
    return None


def _can_build_with_tfds(host: str = "storage.googleapis.com", timeout_s: float = 2.0) -> bool:
    """Whether tfds can build cifar10 here: TensorFlow installed (the ``tf`` extra; checked
    first, without importing it) and the download host reachable within ``timeout_s``."""
    import importlib.util
    import socket

    if importlib.util.find_spec("tensorflow") is None:
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
    except OSError:
        return False
    return True


def _build_with_tfds() -> None:
    """Download and prepare tfds ``cifar10`` as array_record in tfds's default data_dir."""
    import tensorflow_datasets as tfds

    builder = tfds.builder("cifar10", file_format="array_record")
    builder.download_and_prepare()


def _from_tfds(data_dir: str | os.PathLike | None, max_per_class: int | None) -> ArrayDataset:
    where = Path(data_dir if data_dir is not None else default_tfds_data_dir()).expanduser()
    hint = (
        f"building tfds cifar10 needs pip install 'mpdnn[tf]' and network (tfds build cifar10 "
        f"--data_dir={where} --file_format=array_record); or pass "
        f"--config.data.dir=/path/to/{ARCHIVE_NAME}"
    )
    arrays = tfds_arrays("cifar10", data_dir, how_to_prepare=hint)
    (train_x, train_y), (test_x, test_y) = (
        take_per_class(*arrays[s], max_per_class) for s in ("train", "test")
    )
    folder, _ = find_prepared("cifar10", data_dir)
    subset = f", first {max_per_class} per class and split" if max_per_class else ""
    return ArrayDataset(
        name="cifar10",
        train_images=train_x,
        train_labels=train_y,
        test_images=test_x,
        test_labels=test_y,
        num_classes=10,
        pixel_scale=2 / 255,
        pixel_offset=-1.0,
        description=f"CIFAR-10 from the prepared tfds dataset {folder}{subset}",
        class_names=CIFAR10_CLASSES,
    )


def load_cifar10(
    data_dir: str | os.PathLike | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    max_per_class: int | None = None,
) -> ArrayDataset:
    """CIFAR-10 as uint8 host arrays, normalised by ``(x/255 - 0.5)·2`` (docs/method.md §8).

    Args:
      data_dir: a ``.tar.gz`` or directory with ``{train,test}/<class>/*.jpg``, or a tfds
        data_dir holding a prepared ``cifar10/`` (array_record). None: the prepared tfds
        dataset in tfds's default data_dir if present, else :func:`find_cifar10_archive`.
      cache_dir: where decoded JPEGs are cached (see :func:`load_image_folder`).
      max_per_class: first N images per class and split, for smoke runs.

    The chosen source is named in ``description``. The shared copy is lossy JPEG (docs/method.md
    §11): compare methods on it side by side, never with the paper's absolute numbers.
    """
    if data_dir is not None:
        path = Path(data_dir).expanduser()
        if path.is_dir() and (path / "cifar10").is_dir():
            return _from_tfds(path, max_per_class)
        if not path.exists():
            raise DataError(
                f"CIFAR-10 data dir not found: {path}; pass --config.data.dir=/path/to/"
                f"{ARCHIVE_NAME} (layout {{train,test}}/<class>/*.jpg) or a prepared tfds data_dir"
            )
        ds = load_image_folder(path, cache_dir=cache_dir, max_per_class=max_per_class)
        origin = f"CIFAR-10 from {ds.description}"
    elif find_prepared("cifar10", None)[0] is not None:
        return _from_tfds(None, max_per_class)
    elif (archive := find_cifar10_archive()) is not None:
        ds = load_image_folder(archive, cache_dir=cache_dir, max_per_class=max_per_class)
        origin = (
            f"CIFAR-10, shared local copy (lossy JPEG q75, docs/method.md §11): {ds.description}"
        )
    elif _can_build_with_tfds():
        _build_with_tfds()
        return _from_tfds(None, max_per_class)
    else:
        raise DataError(NOT_FOUND)
    if ds.class_names != CIFAR10_CLASSES:
        raise DataError(
            f"{path if data_dir is not None else archive} has classes {list(ds.class_names)}, "
            f"not the 10 CIFAR-10 classes; pass the CIFAR-10 copy ({ARCHIVE_NAME})"
        )
    return dataclasses.replace(ds, name="cifar10", description=origin)
