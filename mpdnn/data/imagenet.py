"""ImageNet (``imagenet2012``) streamed from a prepared tfds data source, decoded with grain.

ImageNet does not fit in host memory, so unlike the other datasets it is read record by
record: ``tfds.data_source`` (array_record, no TensorFlow) gives random access, a per-epoch
permutation that every process computes identically gives the order, and each process decodes
only its own slice of each global batch, in a grain pipeline (threads, optionally worker
processes). Preprocessing is the standard one, in NumPy and Pillow (which releases the GIL,
so threads decode in parallel): Inception-style random-resized-crop + flip for training,
resize-256 / center-crop-224 for evaluation, then torchvision's per-channel mean/std.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from mpdnn.data.base import DataError
from mpdnn.data.tfds_source import default_tfds_data_dir, tfds_source

# torchvision's ImageNet statistics, on [0, 255] pixels: (0.485, 0.456, 0.406)·255 and
# (0.229, 0.224, 0.225)·255. Pretrained float nets expect exactly these.
IMAGENET_MEAN_RGB = np.array([123.675, 116.28, 103.53], np.float32)
IMAGENET_STD_RGB = np.array([58.395, 57.12, 57.375], np.float32)

CROP_AREA_RANGE = (0.08, 1.0)
CROP_ASPECT_RANGE = (3 / 4, 4 / 3)
CROP_TRIES = 10


def imagenet_source(data_dir: str | os.PathLike | None, split: str) -> Any:
    """The tfds data source of prepared ``imagenet2012`` (``"train"``/``"validation"``).

    Fails fast with a :class:`DataError` when it is not prepared as array_record: ImageNet is
    a manual download that only ``tfds build`` with TensorFlow can prepare.
    """
    where = os.fspath(data_dir if data_dir is not None else default_tfds_data_dir())
    hint = (
        f"prepare it once with pip install 'mpdnn[tf]' and tfds build imagenet2012 "
        f"--manual_dir=/path/to/ILSVRC2012_tars --data_dir={where} --file_format=array_record"
    )
    return tfds_source("imagenet2012", data_dir, split, how_to_prepare=hint)


def _to_pil(image: bytes | np.ndarray):
    """Encoded bytes or a uint8 HWC/HW array → an RGB Pillow image."""
    from PIL import Image

    if isinstance(image, (bytes, bytearray, memoryview)):
        with Image.open(io.BytesIO(image)) as im:
            return im.convert("RGB")
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    return Image.fromarray(array.astype(np.uint8, copy=False)).convert("RGB")


def preprocess_imagenet_train(
    image: bytes | np.ndarray, rng: np.random.Generator, size: int = 224
) -> np.ndarray:
    """Inception-style random-resized crop and horizontal flip → uint8 ``(size, size, 3)``.

    Up to 10 tries draw an area fraction in [0.08, 1] and a log-uniform aspect ratio in
    [3/4, 4/3]; the first crop that fits is taken at a uniform position. If none fits, the
    largest center crop with an aspect in [3/4, 4/3] is used (as torchvision). The crop is
    resized bilinearly to ``size×size`` and flipped with probability 1/2.
    """
    from PIL import Image

    pil = _to_pil(image)
    width, height = pil.size
    area = width * height
    log_aspect = (math.log(CROP_ASPECT_RANGE[0]), math.log(CROP_ASPECT_RANGE[1]))
    for _ in range(CROP_TRIES):
        target = area * rng.uniform(*CROP_AREA_RANGE)
        aspect = math.exp(rng.uniform(*log_aspect))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            break
    else:
        ratio = width / height
        if ratio < CROP_ASPECT_RANGE[0]:
            w, h = width, round(width / CROP_ASPECT_RANGE[0])
        elif ratio > CROP_ASPECT_RANGE[1]:
            w, h = round(height * CROP_ASPECT_RANGE[1]), height
        else:
            w, h = width, height
        top, left = (height - h) // 2, (width - w) // 2
    out = pil.resize((size, size), Image.BILINEAR, box=(left, top, left + w, top + h))
    array = np.asarray(out)
    if rng.random() < 0.5:
        array = array[:, ::-1]
    return np.ascontiguousarray(array)


def preprocess_imagenet_eval(
    image: bytes | np.ndarray, size: int = 224, resize: int = 256
) -> np.ndarray:
    """Resize the shorter side to ``resize`` (bilinear), center-crop ``size`` → uint8 HWC.

    The longer side becomes ``int(resize · long / short)`` and the crop starts at
    ``round((side - size) / 2)``, as torchvision's ``Resize(256)`` + ``CenterCrop(224)``.
    """
    from PIL import Image

    pil = _to_pil(image)
    width, height = pil.size
    if width <= height:
        new = (resize, int(resize * height / width))
    else:
        new = (int(resize * width / height), resize)
    if min(new) < size:
        raise DataError(f"resize={resize} is smaller than the crop size={size}")
    top = int(round((new[1] - size) / 2))
    left = int(round((new[0] - size) / 2))
    resized = pil.resize(new, Image.BILINEAR)
    return np.asarray(resized.crop((left, top, left + size, top + size)))


def normalize_imagenet(images_float: np.ndarray) -> np.ndarray:
    """``(x - mean) / std`` per RGB channel, on pixels in [0, 255], last axis = channels.

    Works on NumPy and JAX arrays of any rank (the constants are reshaped to the input's rank
    rather than broadcast by rank promotion).
    """
    shape = (1,) * (images_float.ndim - 1) + (3,)
    return (images_float - IMAGENET_MEAN_RGB.reshape(shape)) / IMAGENET_STD_RGB.reshape(shape)


class ImageNetBatches:
    """One epoch of process-local batches ``(images float32 NHWC normalised, labels int32)``,
    decoded by a grain pipeline.

    The order is a permutation of the whole split drawn from ``(seed, epoch)``, identical on
    every process; global batch ``k`` is positions ``[k·B, (k+1)·B)`` of it, and process ``p``
    of ``P`` takes the ``p``-th contiguous ``B/P`` of that, so the processes' batches
    concatenated in process order are exactly the global batch. Training crops draw from a
    generator seeded by ``(seed, epoch, example index)``: a given example is augmented the same
    way whatever the process count, thread or worker timing.

    The pipeline (:meth:`dataset`) is ``grain.MapDataset.source`` over this process's example
    indices from the first batch asked for, a ``map`` that decodes and augments one example,
    and a ``batch`` of the local share, read ahead by ``num_workers`` threads that each make
    whole batches (``grain.ReadOptions``; up to ``max(num_workers, prefetch)`` batches are in
    flight); with ``worker_processes > 0`` the batches are made in that many worker processes
    (``mp_prefetch``; grain keeps their order). Resuming needs no
    iterator state: the position in the epoch is a function of the training step, and
    ``iterate(start)`` builds the pipeline from global batch ``start`` on, decoding nothing it
    skips; it yields exactly what an uninterrupted epoch yields from there (the same result
    as restoring grain's own ``get_state()``, which the tests check).

    Args:
      source: random-access records ``{"image": jpeg bytes or uint8 HWC, "label": int}``
        (a tfds data source, or any sequence of such dicts; picklable when
        ``worker_processes > 0``, as tfds data sources are).
      global_batch_size: examples per step over all processes; divisible by ``process_count``.
      process_index, process_count: this process and how many share the batch
        (``jax.process_index()``, ``jax.process_count()``).
      seed, epoch: the permutation and augmentation are functions of these.
      train: random-resized-crop + flip and shuffling; else eval crop in file order.
      drop_remainder: drop the last partial global batch (default for training). When False,
        the last batch is split the same way and may be short or, on some processes, absent.
      size, resize: output size and eval resize (224, 256).
      num_workers: decoding threads in all, each making whole batches; with worker processes
        they are shared out among them (at least one each).
      prefetch: batches decoded ahead, at least (per worker process, when there are some).
      worker_processes: 0 (default): decode in threads of this process, enough when Pillow's
        decoding (which releases the GIL) is most of the work; > 0: in that many processes,
        for when Python-level work per example limits the threads. They are spawned for each
        epoch (a few seconds of start-up: they import mpdnn), so a script that makes them
        needs the usual ``if __name__ == "__main__":`` guard; ``python -m mpdnn.train`` has
        it. Python's resource tracker may warn at exit of "leaked shared_memory objects" that
        grain's workers created: it has freed them (CPython's bpo-38119).
    """

    def __init__(
        self,
        source: Sequence[Any],
        global_batch_size: int,
        *,
        process_index: int = 0,
        process_count: int = 1,
        seed: int = 0,
        epoch: int = 0,
        train: bool = True,
        drop_remainder: bool | None = None,
        size: int = 224,
        resize: int = 256,
        num_workers: int = 16,
        prefetch: int = 2,
        worker_processes: int = 0,
    ):
        if process_count < 1 or not 0 <= process_index < process_count:
            raise DataError(
                f"process_index={process_index} must lie in [0, process_count={process_count})"
            )
        if global_batch_size < 1 or global_batch_size % process_count:
            raise DataError(
                f"global batch size {global_batch_size} must be a positive multiple of the "
                f"process count {process_count}"
            )
        if worker_processes < 0:
            raise DataError(f"worker_processes={worker_processes} must be 0 or more")
        self.source = source
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // process_count
        self.process_index, self.process_count = process_index, process_count
        self.seed, self.epoch, self.train = seed, epoch, train
        self.drop_remainder = train if drop_remainder is None else drop_remainder
        self.size, self.resize = size, resize
        self.num_workers, self.prefetch = max(1, num_workers), max(1, prefetch)
        self.worker_processes = worker_processes

    def __len__(self) -> int:
        """Global batches in the epoch."""
        n, b = len(self.source), self.global_batch_size
        return n // b if self.drop_remainder else -(-n // b)

    def order(self) -> np.ndarray:
        """The epoch's example order (the same on every process)."""
        n = len(self.source)
        if not self.train:
            return np.arange(n)
        return np.random.default_rng([self.seed, self.epoch]).permutation(n)

    def local_indices(self, batch: int, order: np.ndarray | None = None) -> np.ndarray:
        """Source indices of this process's share of global batch ``batch``."""
        order = self.order() if order is None else order
        start = batch * self.global_batch_size + self.process_index * self.local_batch_size
        end = min(start + self.local_batch_size, (batch + 1) * self.global_batch_size)
        return order[start:end]

    def example(self, index: int) -> tuple[np.ndarray, int]:
        """Source record ``index`` decoded and (for training) augmented: uint8 HWC, label."""
        record = self.source[int(index)]
        if self.train:
            rng = np.random.default_rng([self.seed, self.epoch, int(index)])
            image = preprocess_imagenet_train(record["image"], rng, self.size)
        else:
            image = preprocess_imagenet_eval(record["image"], self.size, self.resize)
        return image, int(record["label"])

    @staticmethod
    def collate(examples: Sequence[tuple[np.ndarray, int]]) -> tuple[np.ndarray, np.ndarray]:
        """Decoded examples → ``(normalised float32 images, int32 labels)``."""
        images = np.stack([e[0] for e in examples]).astype(np.float32)
        labels = np.array([e[1] for e in examples], np.int32)
        return normalize_imagenet(images).astype(np.float32), labels

    def dataset(self, start: int = 0):
        """The epoch's local batches from global batch ``start`` on, as a ``grain.IterDataset``.

        This process's shares of batches ``start, start+1, …`` are contiguous runs of
        ``local_batch_size`` indices (only the very last may be shorter), so batching their
        concatenation in runs of that size gives exactly the shares.
        """
        return self._pipeline(self._indices(start))

    def _indices(self, start: int) -> np.ndarray:
        """This process's shares of global batches ``start, start+1, …``, concatenated."""
        order = self.order()
        shares = [self.local_indices(b, order) for b in range(start, len(self))]
        return np.concatenate([np.zeros(0, np.int64), *shares]).astype(np.int64)

    def _pipeline(self, indices: np.ndarray):
        grain = _grain()
        examples = grain.MapDataset.source(indices).map(self.example)
        # Threads make whole batches: per-example dispatch through grain costs more than the
        # decoding of a small record (scripts/bench_input.py, docs/scaling.md).
        threads = max(1, self.num_workers // max(1, self.worker_processes))
        read = grain.ReadOptions(
            num_threads=threads, prefetch_buffer_size=max(threads, self.prefetch)
        )
        batches = examples.batch(self.local_batch_size, batch_fn=self.collate)
        batches = batches.to_iter_dataset(read)
        if not self.worker_processes:
            return batches
        _let_grain_read_its_flags()
        options = grain.MultiprocessingOptions(
            num_workers=self.worker_processes, per_worker_buffer_size=self.prefetch
        )
        return batches.mp_prefetch(options)

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        return self.iterate()

    def iterate(self, start: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The epoch's batches from global batch ``start`` on (a run resumed mid-epoch
        decodes nothing it skips). Threads and worker processes stop when the generator is
        closed or garbage-collected, also mid-epoch."""
        indices = self._indices(start)
        if not len(indices):  # nothing left for this process (a short last batch)
            return
        iterator = iter(self._pipeline(indices))
        try:
            yield from iterator
        finally:
            iterator.close()


def _grain():
    try:
        import grain
    except ImportError as error:  # pragma: no cover - grain is in the train extra
        raise DataError("streamed input needs grain: pip install 'mpdnn[train]'") from error
    return grain


def _let_grain_read_its_flags() -> None:
    """grain's worker processes read grain's absl flags, which fail unparsed outside an absl
    app: mark them parsed (at their defaults) when no one has parsed them."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
