"""Random but learnable images, for tests and benchmarks that must not touch real data."""

from __future__ import annotations

import numpy as np

from mpdnn.data.base import ArrayDataset, DataError

# Class templates are random on a coarse 4x4 grid, upsampled to the image: each class is a
# blocky colour pattern that a conv net (or a linear model) separates easily under the noise.
_TEMPLATE_GRID = 4
_NOISE_STD = 48.0


def synthetic(
    image_shape: tuple[int, int, int] = (32, 32, 3),
    num_classes: int = 10,
    num_train: int = 256,
    num_test: int = 64,
    *,
    seed: int = 0,
) -> ArrayDataset:
    """Uint8 images ``clip(template[label] + noise)`` with balanced-in-expectation labels.

    Each class has one fixed random template (a coarse ``4×4×C`` pattern of values in
    [48, 208], nearest-upsampled to ``H×W``); an image is its class template plus i.i.d.
    Gaussian pixel noise (std 48), clipped to [0, 255]. Labels are uniform draws, so a model
    that learns the templates drives the loss down: a smoke run can show learning. Everything
    is a function of ``seed``; train and test share the templates. Normalised like CIFAR-10
    (scale 2/255, offset -1).
    """
    height, width, channels = image_shape
    if min(image_shape) < 1 or num_classes < 1 or num_train < 1 or num_test < 1:
        raise DataError(
            f"synthetic needs positive sizes, got image_shape={image_shape}, "
            f"num_classes={num_classes}, num_train={num_train}, num_test={num_test}"
        )
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(48, 208, (num_classes, _TEMPLATE_GRID, _TEMPLATE_GRID, channels))
    rows = np.arange(height) * _TEMPLATE_GRID // height
    cols = np.arange(width) * _TEMPLATE_GRID // width
    templates = coarse[:, rows][:, :, cols]

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, num_classes, n).astype(np.int32)
        noise = rng.normal(0.0, _NOISE_STD, (n, height, width, channels))
        return np.clip(np.rint(templates[labels] + noise), 0, 255).astype(np.uint8), labels

    (train_x, train_y), (test_x, test_y) = draw(num_train), draw(num_test)
    return ArrayDataset(
        name="synthetic",
        train_images=train_x,
        train_labels=train_y,
        test_images=test_x,
        test_labels=test_y,
        num_classes=num_classes,
        pixel_scale=2 / 255,
        pixel_offset=-1.0,
        description=(
            f"synthetic class templates + noise, {image_shape}, {num_classes} classes, "
            f"{num_train} train / {num_test} test, seed {seed}"
        ),
    )
