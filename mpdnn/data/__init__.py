"""Input pipelines: digits, CIFAR-10 (tfds or the shared JPEG copy), synthetic, ImageNet.

Small datasets load into host memory as uint8 :class:`ArrayDataset`\\ s and are normalised and
augmented on the device (:func:`normalize`, :func:`random_crop_flip`); ImageNet streams from a
prepared tfds data source (:func:`imagenet_source`, :class:`ImageNetBatches`).

Importing this package loads only NumPy and JAX: scikit-learn, Pillow and tensorflow_datasets
are imported inside the functions that need them, and TensorFlow never (tfds reads array_record
without it). Every user-facing failure is a one-line :class:`DataError`.
"""

from mpdnn.data.augment import normalize, random_crop_flip
from mpdnn.data.base import HOLDOUT_SEED, ArrayDataset, DataError, holdout
from mpdnn.data.cifar10 import CIFAR10_CLASSES, find_cifar10_archive, load_cifar10
from mpdnn.data.digits import load_digits
from mpdnn.data.image_folder import default_cache_dir, load_image_folder
from mpdnn.data.imagenet import (
    IMAGENET_MEAN_RGB,
    IMAGENET_STD_RGB,
    ImageNetBatches,
    imagenet_source,
    normalize_imagenet,
    preprocess_imagenet_eval,
    preprocess_imagenet_train,
)
from mpdnn.data.registry import load_dataset
from mpdnn.data.synthetic import synthetic
from mpdnn.data.tfds_source import default_tfds_data_dir, tfds_arrays

__all__ = [
    "CIFAR10_CLASSES",
    "HOLDOUT_SEED",
    "IMAGENET_MEAN_RGB",
    "IMAGENET_STD_RGB",
    "ArrayDataset",
    "DataError",
    "ImageNetBatches",
    "default_cache_dir",
    "default_tfds_data_dir",
    "find_cifar10_archive",
    "holdout",
    "imagenet_source",
    "load_cifar10",
    "load_dataset",
    "load_digits",
    "load_image_folder",
    "normalize",
    "normalize_imagenet",
    "preprocess_imagenet_eval",
    "preprocess_imagenet_train",
    "random_crop_flip",
    "synthetic",
    "tfds_arrays",
]
