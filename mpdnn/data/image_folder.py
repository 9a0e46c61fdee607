"""Image-folder datasets (``{train,test}/<class>/*.jpg``) from a directory or a tar archive.

This is the layout of the shared CIFAR-10 copy (docs/method.md §11) and of
``tfds.folder_dataset.ImageFolder``; labels are the indices of the sorted class names. A tar
is read in streaming mode, member by member, and never extracted: the shared copy lives on a
read-only mount and 60,000 small files would cost more to write than to decode.

Decoding 60k JPEGs takes seconds to tens of seconds, so the decoded arrays are cached as one
``.npz`` under ``cache_dir``, keyed by the source's resolved path, size and mtime (for a
directory: every image file's relative path, size and mtime) and ``max_per_class``. The cache
is written atomically (temporary file + ``os.replace``), so concurrent runs never read half a
file, and an unreadable cache is decoded again rather than trusted. Pillow is imported lazily.
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
import tarfile
import tempfile
import time
import zlib
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

import numpy as np

from mpdnn.data.base import ArrayDataset, DataError

SPLITS = ("train", "test")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
LAYOUT = "{train,test}/<class>/*.jpg"
# Bump when the cached arrays change meaning; old caches then miss instead of lying.
CACHE_FORMAT = 1
_CACHED = {f"{s}_{k}" for s in SPLITS for k in ("images", "labels")} | {"class_names"}

# split -> class -> [(file name, bytes or a callable that reads them)]
_Tree = dict[str, dict[str, list[tuple[str, bytes | Callable[[], bytes]]]]]


def default_cache_dir() -> Path:
    """``$MPDNN_CACHE_DIR``, else ``~/.cache/mpdnn``."""
    return Path(os.environ.get("MPDNN_CACHE_DIR") or Path.home() / ".cache" / "mpdnn")


def note(message: str) -> None:
    """One progress line on stderr: decoding is slow enough that silence looks like a hang."""
    print(f"mpdnn.data: {message}", file=sys.stderr, flush=True)


def decode_image(data: bytes) -> np.ndarray:
    """Encoded image bytes → RGB uint8 ``(H, W, 3)`` (grayscale and palette images converted)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0]


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES)


def _wrapper(paths: list[tuple[str, ...]]) -> str | None:
    """The one top-level folder that wraps ``train/`` and ``test/`` (``cifar10/train/...``)."""
    tops = {p[0] for p in paths}
    if len(tops) == 1 and not tops & set(SPLITS):
        return tops.pop()
    return None


def _list_directory(root: Path) -> tuple[_Tree, dict[str, set[str]], str]:
    """The tree of image files under ``root``, the class folders per split, and a fingerprint."""
    if not any((root / s).is_dir() for s in SPLITS):
        subdirs = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
        if len(subdirs) == 1:
            root = subdirs[0]
    tree: _Tree = {}
    classes: dict[str, set[str]] = {}
    fingerprint = hashlib.sha256()
    for split in SPLITS:
        if not (root / split).is_dir():
            continue
        tree[split], classes[split] = {}, set()
        for class_dir in sorted((root / split).iterdir()):
            if not class_dir.is_dir() or class_dir.name.startswith("."):
                continue
            classes[split].add(class_dir.name)
            files = tree[split].setdefault(class_dir.name, [])
            for f in sorted(class_dir.iterdir()):
                if f.is_file() and _is_image(f.name):
                    st = f.stat()
                    fingerprint.update(f"{split}/{class_dir.name}/{f.name}|{st.st_size}|".encode())
                    fingerprint.update(f"{st.st_mtime_ns}\n".encode())
                    files.append((f.name, f.read_bytes))
    return tree, classes, fingerprint.hexdigest()


def _list_tar(source: Path) -> tuple[_Tree, dict[str, set[str]]]:
    """Read every image member of the archive in one streaming pass (no extraction)."""
    dirs: list[tuple[str, ...]] = []
    files: list[tuple[tuple[str, ...], bytes]] = []
    try:
        with tarfile.open(source, mode="r|*") as archive:
            for member in archive:
                parts = tuple(p for p in PurePosixPath(member.name).parts if p not in ("", "."))
                if not parts:
                    continue
                if member.isdir():
                    dirs.append(parts)
                elif member.isfile() and len(parts) >= 3 and _is_image(parts[-1]):
                    files.append((parts, archive.extractfile(member).read()))
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise DataError(
            f"cannot read {source} as a tar archive ({type(e).__name__}: {_first_line(e)}); "
            f"pass a directory or a .tar.gz with the layout {LAYOUT}"
        ) from None
    # Class folders come from directory members and from the files' parents alike: archives
    # made without directory entries are common.
    wrapper = _wrapper(dirs + [p for p, _ in files])
    if wrapper is not None:
        dirs = [p[1:] for p in dirs if len(p) > 1]
        files = [(p[1:], data) for p, data in files]
    tree: _Tree = {}
    classes: dict[str, set[str]] = {}
    for parts in dirs + [p[:-1] for p, _ in files]:
        if parts[0] in SPLITS:
            tree.setdefault(parts[0], {})
            classes.setdefault(parts[0], set())
            if len(parts) >= 2 and not parts[1].startswith("."):
                classes[parts[0]].add(parts[1])
                tree[parts[0]].setdefault(parts[1], [])
    for parts, data in files:
        if len(parts) == 3 and parts[0] in SPLITS and parts[1] in tree[parts[0]]:
            tree[parts[0]][parts[1]].append((parts[2], data))
    for split_tree in tree.values():
        for entries in split_tree.values():
            entries.sort(key=lambda e: e[0])
    return tree, classes


def _check_layout(source: Path, classes: Mapping[str, set[str]], tree: _Tree) -> list[str]:
    """The sorted class names, or a DataError that says which part of the layout is wrong."""
    for split in SPLITS:
        if split not in classes:
            raise DataError(f"{source} has no {split}/ folder; expected the layout {LAYOUT}")
        if not classes[split]:
            raise DataError(f"{source}: {split}/ has no class folders; expected {LAYOUT}")
    if classes["train"] != classes["test"]:
        only_train = sorted(classes["train"] - classes["test"])
        only_test = sorted(classes["test"] - classes["train"])
        raise DataError(
            f"{source}: train/ and test/ have different class folders (only in train: "
            f"{only_train}, only in test: {only_test}); both splits need the same classes"
        )
    for split in SPLITS:
        for name in sorted(classes[split]):
            if not tree[split].get(name):
                raise DataError(
                    f"{source}: {split}/{name}/ has no images ({', '.join(IMAGE_SUFFIXES)})"
                )
    return sorted(classes["train"])


def _decode_tree(
    source: Path, tree: _Tree, class_names: list[str], max_per_class: int | None
) -> dict[str, np.ndarray]:
    """Decode the selected files of both splits on a thread pool.

    Pillow's decoder releases the GIL but its header parsing is Python, so threads give a
    modest speed-up for tiny images; the cache makes this a one-time cost anyway.
    """
    jobs: list[tuple[str, int, str, bytes | Callable[[], bytes]]] = []
    for split in SPLITS:
        for label, name in enumerate(class_names):
            for file_name, data in tree[split][name][:max_per_class]:
                jobs.append((split, label, f"{split}/{name}/{file_name}", data))

    def decode(job):
        _, _, where, data = job
        try:
            return decode_image(data() if callable(data) else data)
        except DataError:
            raise
        except Exception as e:  # Pillow raises several types for bad files
            raise DataError(
                f"cannot decode {where} in {source} ({type(e).__name__}: {_first_line(e)})"
            ) from None

    with ThreadPoolExecutor(max_workers=min(32, os.cpu_count() or 1)) as pool:
        images = list(pool.map(decode, jobs))
    shape = images[0].shape
    for (_, _, where, _), image in zip(jobs, images, strict=True):
        if image.shape != shape:
            raise DataError(
                f"{source}: {where} is {image.shape[1]}x{image.shape[0]} but the first image is "
                f"{shape[1]}x{shape[0]}; resize the images to one size first"
            )
    arrays: dict[str, np.ndarray] = {}
    for split in SPLITS:
        index = [i for i, job in enumerate(jobs) if job[0] == split]
        arrays[f"{split}_images"] = np.stack([images[i] for i in index])
        arrays[f"{split}_labels"] = np.array([jobs[i][1] for i in index], np.int32)
    return arrays


def _read_cache(path: Path, key: str) -> dict[str, np.ndarray] | None:
    """The cached arrays, or None (with a note) when the file is unreadable or for another key."""
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
        if str(arrays.pop("key")) != key:
            raise ValueError("written for another source")
        if missing := sorted(_CACHED - arrays.keys()):
            raise KeyError(f"missing {missing}")
        return arrays
    except Exception as e:  # any unreadable cache means: decode again
        note(f"ignoring unreadable cache {path} ({type(e).__name__}: {e}); decoding again")
        return None


def _write_cache(path: Path, key: str, arrays: Mapping[str, np.ndarray]) -> None:
    """Atomically write the cache; failure to write is a note, never an error."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, key=np.array(key), **arrays)
        os.replace(tmp, path)
    except OSError as e:
        note(f"could not write cache {path} ({e}); continuing without it")
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def _dataset_name(source: Path) -> str:
    name = source.name
    for suffix in (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def load_image_folder(
    path: str | os.PathLike,
    *,
    cache_dir: str | os.PathLike | None = None,
    max_per_class: int | None = None,
) -> ArrayDataset:
    """Load ``{train,test}/<class>/*.jpg`` from a directory or a tar archive into host arrays.

    Args:
      path: a directory, or a (gzipped) tar archive; one wrapping top-level folder is allowed.
      cache_dir: where the decoded ``.npz`` goes (default :func:`default_cache_dir`).
      max_per_class: keep only the first N files (sorted by name) per class and split, for
        fast smoke runs.

    Images are decoded to RGB uint8 and must all have one size. The network input is
    ``(x/255 - 0.5)·2`` (docs/method.md §8), i.e. ``pixel_scale = 2/255``, ``pixel_offset = -1``.
    """
    source = Path(path).expanduser()
    if not source.exists():
        raise DataError(
            f"image folder not found: {source}; "
            f"pass a directory or .tar.gz with the layout {LAYOUT}"
        )
    if max_per_class is not None and max_per_class < 1:
        raise DataError(f"max_per_class must be >= 1 or None, got {max_per_class}")
    source = source.resolve()
    tree = None
    if source.is_dir():
        tree, classes, fingerprint = _list_directory(source)
        key = f"dir|{source}|{fingerprint}"
    else:
        st = source.stat()
        key = f"tar|{source}|{st.st_size}|{st.st_mtime_ns}"
    key = f"v{CACHE_FORMAT}|{key}|max_per_class={max_per_class}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    cache = Path(cache_dir if cache_dir is not None else default_cache_dir()).expanduser()
    cache_file = cache / f"{_dataset_name(source)}-{digest}.npz"

    if cache_file.exists() and (arrays := _read_cache(cache_file, key)) is not None:
        try:
            return _dataset(source, arrays, max_per_class)
        except DataError as e:
            note(f"ignoring inconsistent cache {cache_file} ({e}); decoding again")
    start = time.perf_counter()
    note(f"decoding {source} (slow, once: cached in {cache_file})")
    if tree is None:
        tree, classes = _list_tar(source)
    class_names = _check_layout(source, classes, tree)
    arrays = _decode_tree(source, tree, class_names, max_per_class)
    count = len(arrays["train_labels"]) + len(arrays["test_labels"])
    note(f"decoded {count:,} images from {source} in {time.perf_counter() - start:.1f}s")
    arrays["class_names"] = np.array(class_names)
    _write_cache(cache_file, key, arrays)
    return _dataset(source, arrays, max_per_class)


def _dataset(
    source: Path, arrays: Mapping[str, np.ndarray], max_per_class: int | None
) -> ArrayDataset:
    """The ArrayDataset of freshly decoded or cached arrays (validated either way)."""
    class_names = tuple(str(c) for c in arrays["class_names"])
    subset = f", first {max_per_class} per class and split" if max_per_class else ""
    return ArrayDataset(
        name=_dataset_name(source),
        train_images=arrays["train_images"],
        train_labels=arrays["train_labels"],
        test_images=arrays["test_images"],
        test_labels=arrays["test_labels"],
        num_classes=len(class_names),
        pixel_scale=2 / 255,
        pixel_offset=-1.0,
        description=f"image folder {source} ({LAYOUT}, labels = sorted class names{subset})",
        class_names=class_names,
    )
