"""``load_dataset(name, ...)``: the one entry point configs and the CLI call."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from mpdnn.data.base import ArrayDataset, DataError, take_per_class
from mpdnn.data.cifar10 import load_cifar10
from mpdnn.data.digits import load_digits
from mpdnn.data.synthetic import synthetic

IN_MEMORY = ("digits", "cifar10", "synthetic")
STREAMING = ("imagenet2012",)


def load_dataset(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    max_per_class: int | None = None,
    seed: int = 0,
    **synthetic_kwargs: Any,
) -> ArrayDataset:
    """Load an in-memory dataset by name: ``"digits"``, ``"cifar10"`` or ``"synthetic"``.

    ``data_dir``/``cache_dir`` matter only for cifar10 (see :func:`load_cifar10`) and are
    ignored otherwise, so one config schema serves all. ``max_per_class`` keeps the first N
    training and test examples per class (digits, cifar10). ``seed`` and ``synthetic_kwargs``
    (``image_shape``, ``num_classes``, ``num_train``, ``num_test``) are for synthetic only:
    the digits split is fixed so that runs with different seeds stay comparable.
    """
    if synthetic_kwargs and name != "synthetic":
        raise DataError(
            f"{sorted(synthetic_kwargs)} are options of the synthetic dataset, not {name}"
        )
    if name == "synthetic":
        try:
            return synthetic(seed=seed, **synthetic_kwargs)
        except TypeError as e:
            raise DataError(f"bad synthetic dataset option: {e}") from None
    if name == "cifar10":
        return load_cifar10(data_dir, cache_dir=cache_dir, max_per_class=max_per_class)
    if name == "digits":
        ds = load_digits()
        if max_per_class is None:
            return ds
        (train_x, train_y), (test_x, test_y) = (
            take_per_class(x, y, max_per_class)
            for x, y in ((ds.train_images, ds.train_labels), (ds.test_images, ds.test_labels))
        )
        return dataclasses.replace(
            ds,
            train_images=train_x,
            train_labels=train_y,
            test_images=test_x,
            test_labels=test_y,
            description=f"{ds.description}; first {max_per_class} per class and split",
        )
    if name in STREAMING:
        raise DataError(
            f"{name} is streaming-only: read it with mpdnn.data.imagenet_source and "
            f"ImageNetBatches; in-memory datasets are {', '.join(IN_MEMORY)}"
        )
    raise DataError(
        f"unknown dataset {name!r}; known: {', '.join(IN_MEMORY)} (in memory), "
        f"{', '.join(STREAMING)} (streaming-only, via imagenet_source)"
    )
