"""scikit-learn's 8×8 handwritten digits: 1,797 real images, small enough for a CPU minute.

The default experiment trains on it, so the split must never move: it is a stratified
1,437 / 360 split drawn once with a fixed seed (each class gives the test split its share of
360 by largest remainder, the test images of a class chosen by a seeded permutation). Both
splits keep the original order of scikit-learn's array. sklearn is imported lazily.
"""

from __future__ import annotations

import numpy as np

from mpdnn.data.base import ArrayDataset, DataError

DIGITS_NUM_TEST = 360  # ≈ 20% of 1,797, the size used by most digits benchmarks
DIGITS_SPLIT_SEED = 0


def stratified_split(
    labels: np.ndarray, num_test: int, *, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted train and test indices; each class contributes its share of ``num_test``.

    Shares are ``num_test · n_c / n`` rounded by largest remainder (ties to the lower class),
    so the total is exactly ``num_test`` and every class with ≥ 2 examples lands in both splits.
    """
    classes, counts = np.unique(labels, return_counts=True)
    exact = num_test * counts / counts.sum()
    share = np.floor(exact).astype(int)
    order = np.argsort(-(exact - share), kind="stable")
    share[order[: num_test - share.sum()]] += 1
    rng = np.random.default_rng(seed)
    test = np.concatenate(
        [
            rng.permutation(np.flatnonzero(labels == c))[:k]
            for c, k in zip(classes, share, strict=True)
        ]
    )
    is_test = np.zeros(len(labels), bool)
    is_test[test] = True
    return np.flatnonzero(~is_test), np.flatnonzero(is_test)


def load_digits(*, seed: int = DIGITS_SPLIT_SEED) -> ArrayDataset:
    """The digits as ``(N, 8, 8, 1)`` uint8 in 0..16, normalised to [-1, 1] (scale 2/16, offset -1).

    ``seed`` only exists to study split variance; keep the default so results stay comparable.
    """
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError:
        raise DataError(
            "the digits dataset needs scikit-learn: pip install 'mpdnn[train]'"
        ) from None
    bunch = sk_load_digits()
    images = bunch.images.astype(np.uint8)[..., None]
    labels = bunch.target.astype(np.int32)
    train, test = stratified_split(labels, DIGITS_NUM_TEST, seed=seed)
    return ArrayDataset(
        name="digits",
        train_images=images[train],
        train_labels=labels[train],
        test_images=images[test],
        test_labels=labels[test],
        num_classes=10,
        pixel_scale=2 / 16,
        pixel_offset=-1.0,
        description=(
            f"scikit-learn load_digits (1,797 8x8 images, values 0..16); stratified split "
            f"{len(train)} train / {len(test)} test, seed {seed}"
        ),
        class_names=tuple(str(d) for d in range(10)),
    )
