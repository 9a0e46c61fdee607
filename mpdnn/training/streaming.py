"""Host-streamed input for datasets that do not fit on the device (ImageNet).

The device-resident path of :mod:`mpdnn.training.trainer` keeps a whole dataset on the
accelerators (CIFAR-10 is 150 MB); ImageNet is 140 GB of JPEGs, so its batches are decoded
and augmented on the host by :class:`mpdnn.data.ImageNetBatches` (a grain pipeline:
``data.workers`` decoding threads, ``data.worker_processes`` worker processes, a per-epoch
permutation shared by every process, each process decoding only its share of each global
batch) and fed to the same jitted training chunk, ``train.steps_per_call`` batches per call.

``data.name = "imagenet"`` always streams (``data.dir`` is a prepared tfds data_dir);
``data.stream = True`` streams any in-memory dataset through the same pipeline (its uint8
images as records), which is how the path is tested without ImageNet.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding

from mpdnn import data as mdata


class Records(Sequence):
    """An in-memory split as random-access records ``{"image": uint8 HWC, "label": int}``."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index):
        return {"image": self.images[index], "label": int(self.labels[index])}


class Subset(Sequence):
    """The records of ``source`` at ``indices``, in that order."""

    def __init__(self, source: Sequence[Any], indices: np.ndarray):
        self.source, self.indices = source, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index):
        return self.source[int(self.indices[index])]


@dataclasses.dataclass
class StreamingData:
    """What the trainer needs of a streamed dataset: its splits as records and its shape."""

    name: str
    train: Sequence[Any]
    test: Sequence[Any]
    image_shape: tuple[int, int, int]
    num_classes: int
    image_size: int
    eval_resize: int
    workers: int
    description: str
    worker_processes: int = 0

    @property
    def num_train(self) -> int:
        return len(self.train)

    @property
    def num_test(self) -> int:
        return len(self.test)

    def batches(self, *, train: bool, batch: int, epoch: int, seed: int):
        """One epoch of this process's shares of global batches (see ImageNetBatches)."""
        return self._batches(self.train if train else self.test, batch, train, epoch, seed)

    def _batches(self, source, batch: int, train: bool, epoch: int, seed: int, **kwargs):
        return mdata.ImageNetBatches(
            source,
            batch,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            seed=seed,
            epoch=epoch,
            train=train,
            size=self.image_size,
            resize=self.eval_resize,
            num_workers=self.workers,
            worker_processes=self.worker_processes,
            **kwargs,
        )

    def recalibration_batches(self, *, batch: int, count: int, seed: int):
        """This process's shares of ``count`` un-augmented training batches for BatchNorm
        recalibration: a fixed random subset of the training split (a function of ``seed``, the
        same at every recalibration), with the evaluation preprocessing."""
        count = max(1, min(count, self.num_train // batch))
        order = np.random.default_rng([seed, 0xB2]).permutation(self.num_train)[: count * batch]
        subset = Subset(self.train, order)
        return iter(self._batches(subset, batch, False, 0, seed, drop_remainder=True))


def streaming_data(config: ml_collections.ConfigDict, loaded=None) -> StreamingData:
    """The streamed dataset of ``config``: ImageNet from ``data.dir``, or ``loaded`` (an
    :class:`~mpdnn.data.ArrayDataset`) as records when ``data.stream`` is set."""
    d = config.data
    size = int(d.get("image_size", 224))
    resize = int(d.get("eval_resize", 256))
    workers = int(d.get("workers", 16))
    processes = int(d.get("worker_processes", 0))
    if d.name == "imagenet":
        train = mdata.imagenet_source(d.dir, "train")
        test = mdata.imagenet_source(d.dir, "validation")
        return StreamingData(
            "imagenet",
            train,
            test,
            (size, size, 3),
            1000,
            size,
            resize,
            workers,
            f"imagenet2012 from {d.dir or 'the default tfds data_dir'}",
            processes,
        )
    assert loaded is not None
    channels = loaded.image_shape[-1]
    if channels != 3:
        raise mdata.DataError(
            f"data.stream needs RGB images (the ImageNet preprocessing), {loaded.name} has "
            f"{channels} channels"
        )
    return StreamingData(
        loaded.name,
        Records(loaded.train_images, loaded.train_labels),
        Records(loaded.test_images, loaded.test_labels),
        (size, size, channels),
        loaded.num_classes,
        size,
        resize,
        workers,
        loaded.description + " (streamed, ImageNet preprocessing)",
        processes,
    )


def put_local(sharding: NamedSharding, local: np.ndarray) -> jax.Array:
    """A global array from every process's local rows along the sharded axis."""
    return jax.make_array_from_process_local_data(sharding, local)


def padded(images: np.ndarray, labels: np.ndarray, batch: int):
    """A local eval share padded to ``batch`` rows, with its mask (a short last batch, or an
    absent one on some processes)."""
    n = len(labels)
    pad = batch - n
    if pad:
        images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
        labels = np.concatenate([labels, np.zeros(pad, labels.dtype)])
    return images, labels, np.arange(batch) < n
