"""The in-memory dataset record every loader returns, and the one error type of ``mpdnn.data``.

Small datasets (digits, CIFAR-10, synthetic) fit in host memory as uint8 arrays; they are
normalised and augmented on the device inside the jitted step (:mod:`mpdnn.data.augment`), so
the host only slices batches. ImageNet streams instead (:mod:`mpdnn.data.imagenet`).
"""

from __future__ import annotations

import dataclasses

import numpy as np


class DataError(ValueError):
    """A user-facing data problem; the message is one line and says what to do.

    The CLI prints it as a one-line error and exits non-zero, so it never carries a traceback's
    worth of context: name the path or option and the fix.
    """


@dataclasses.dataclass(frozen=True, eq=False)
class ArrayDataset:
    """Train and test splits as host arrays, plus how to normalise them.

    Attributes:
      name: short dataset name (``"digits"``, ``"cifar10"``, ...).
      train_images, test_images: uint8, NHWC, the same H×W×C in both splits.
      train_labels, test_labels: int32 in ``[0, num_classes)``, one per image.
      num_classes: number of classes.
      pixel_scale, pixel_offset: the network input is ``image * pixel_scale + pixel_offset``
        (e.g. CIFAR-10: ``2/255`` and ``-1``, i.e. ``(x/255 - 0.5)·2`` of docs/method.md §8).
      description: where the data came from (path, split rule), for run reports.
      class_names: label ``i`` is ``class_names[i]``; empty when the source has no names.
      validation_images, validation_labels: images held out of the training set (see
        :func:`holdout`), or None when the dataset has no validation split.
    """

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int
    pixel_scale: float
    pixel_offset: float
    description: str
    class_names: tuple[str, ...] = ()
    validation_images: np.ndarray | None = None
    validation_labels: np.ndarray | None = None

    def __post_init__(self):
        if (self.validation_images is None) != (self.validation_labels is None):
            raise DataError(f"{self.name}: validation images and labels come together")
        splits = ("train", "test") + (() if self.validation_labels is None else ("validation",))
        for split in splits:
            images, labels = getattr(self, f"{split}_images"), getattr(self, f"{split}_labels")
            if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4:
                raise DataError(
                    f"{self.name}: {split}_images must be a uint8 NHWC numpy array, got "
                    f"{getattr(images, 'dtype', type(images).__name__)} "
                    f"shape {getattr(images, 'shape', '?')}"
                )
            if not isinstance(labels, np.ndarray) or labels.dtype != np.int32 or labels.ndim != 1:
                raise DataError(
                    f"{self.name}: {split}_labels must be a 1-D int32 numpy array, got "
                    f"{getattr(labels, 'dtype', type(labels).__name__)} "
                    f"shape {getattr(labels, 'shape', '?')}"
                )
            if len(images) != len(labels):
                raise DataError(
                    f"{self.name}: {len(images)} {split} images but {len(labels)} labels"
                )
            if len(labels) and (labels.min() < 0 or labels.max() >= self.num_classes):
                raise DataError(
                    f"{self.name}: {split} labels span [{labels.min()}, {labels.max()}], "
                    f"outside [0, {self.num_classes})"
                )
        if self.validation_images is not None and (
            self.validation_images.shape[1:] != self.train_images.shape[1:]
        ):
            raise DataError(f"{self.name}: validation images differ in shape from train images")
        if self.train_images.shape[1:] != self.test_images.shape[1:]:
            raise DataError(
                f"{self.name}: train images are {self.train_images.shape[1:]} but test images "
                f"are {self.test_images.shape[1:]}; both splits need one image shape"
            )
        if self.num_classes < 1:
            raise DataError(f"{self.name}: num_classes must be >= 1, got {self.num_classes}")
        if self.class_names and len(self.class_names) != self.num_classes:
            raise DataError(
                f"{self.name}: {len(self.class_names)} class names for {self.num_classes} classes"
            )

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(H, W, C)`` of every image."""
        return tuple(self.train_images.shape[1:])

    @property
    def num_train(self) -> int:
        return len(self.train_labels)

    @property
    def num_test(self) -> int:
        return len(self.test_labels)

    @property
    def num_validation(self) -> int:
        return 0 if self.validation_labels is None else len(self.validation_labels)


def take_per_class(
    images: np.ndarray, labels: np.ndarray, max_per_class: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """The first ``max_per_class`` examples of each class, in their original order."""
    if max_per_class is None:
        return images, labels
    if max_per_class < 1:
        raise DataError(f"max_per_class must be >= 1 or None, got {max_per_class}")
    keep = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        keep[np.flatnonzero(labels == c)[:max_per_class]] = True
    return images[keep], labels[keep]


#: The seed of every validation split: fixed, so that runs of any ``seed`` (and every arm of
#: a study) hold out the same images and their validation errors compare.
HOLDOUT_SEED = 20200501


def _stratified_counts(labels: np.ndarray, total: int) -> dict[int, int]:
    """``total`` split over the classes in proportion to their sizes (largest remainder)."""
    classes, sizes = np.unique(labels, return_counts=True)
    exact = total * sizes / sizes.sum()
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: total - counts.sum()]:
        counts[i] += 1
    return {int(c): int(n) for c, n in zip(classes, counts, strict=True)}


def holdout(dataset: ArrayDataset, validation_size: int, *, train_size: int = 0) -> ArrayDataset:
    """Hold ``validation_size`` training images out as a validation split; keep
    ``train_size`` of the rest for training (0: all of them).

    Both are stratified (every class in proportion to its share of the training set) and
    drawn with the fixed :data:`HOLDOUT_SEED`, whatever the run's seed, so every run of a
    study sees the same three splits. The test split is untouched. Raises a one-line
    :class:`DataError` when the sizes do not fit the training set.
    """
    n = dataset.num_train
    if validation_size < 0 or train_size < 0:
        raise DataError(
            f"validation_size={validation_size} and train_size={train_size} must be >= 0"
        )
    if validation_size + train_size > n or validation_size >= n:
        raise DataError(
            f"{dataset.name}: cannot hold out {validation_size} validation images"
            + (f" and train on {train_size}" if train_size else "")
            + f" from {n} training images"
        )
    if not validation_size and not train_size:
        return dataset
    labels = dataset.train_labels
    rng = np.random.default_rng(HOLDOUT_SEED)
    order = rng.permutation(n)  # one permutation; classes are read off it in order
    held = _stratified_counts(labels, validation_size)
    val_idx, rest_idx = [], []
    for c, v in held.items():
        members = order[labels[order] == c]
        val_idx.append(members[:v])
        rest_idx.append(members[v:])
    rest = np.concatenate(rest_idx)
    if train_size:
        keep = _stratified_counts(labels[rest], train_size)
        rest = np.concatenate([rest[labels[rest] == c][:k] for c, k in keep.items()])
    val = np.sort(np.concatenate(val_idx))
    rest = np.sort(rest)
    what = f"{len(val)} training images held out for validation (stratified, seed {HOLDOUT_SEED})"
    if train_size:
        what += f", {len(rest)} of the rest trained on"
    return dataclasses.replace(
        dataset,
        train_images=dataset.train_images[rest],
        train_labels=labels[rest],
        validation_images=dataset.train_images[val] if validation_size else None,
        validation_labels=labels[val] if validation_size else None,
        description=f"{dataset.description}; {what}",
    )
