"""Prepared tfds datasets read as array_record data sources, without TensorFlow.

``tfds.data_source`` gives random access to a dataset that was already built in the
array_record format and needs no TensorFlow. Building one does (``pip install 'mpdnn[tf]'``,
plus network for stock datasets), and nothing here may ever start a build or a download: with
no network tfds retries for minutes before failing. So every entry point first looks for the
prepared files on disk, fails fast with a :class:`DataError` that says how to get them, and
only then calls tfds with ``download=False``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mpdnn.data.base import DataError

TFDS_INFO_FILE = "dataset_info.json"


def default_tfds_data_dir() -> Path:
    """tfds's own default: ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``."""
    return Path(os.environ.get("TFDS_DATA_DIR") or Path.home() / "tensorflow_datasets")


def _root(data_dir: str | os.PathLike | None) -> Path:
    return Path(data_dir if data_dir is not None else default_tfds_data_dir()).expanduser()


def _version_key(path: Path) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", path.name))


def find_prepared(name: str, data_dir: str | os.PathLike | None) -> tuple[Path | None, str]:
    """The newest prepared array_record version folder of ``name``, and why there is none.

    Looks for ``<data_dir>/<name>/[<config>/]<version>/dataset_info.json`` next to
    ``*.array_record*`` shards. Returns ``(folder, "")`` or ``(None, reason)``; touches only
    the file system.
    """
    root = _root(data_dir)
    base = root / name
    if not base.is_dir():
        return None, f"no {name}/ folder in {root}"
    found = [*base.glob(f"*/{TFDS_INFO_FILE}"), *base.glob(f"*/*/{TFDS_INFO_FILE}")]
    infos = sorted(
        (p.parent for p in found if not p.parent.name.startswith("incomplete")), key=_version_key
    )
    if not infos:
        return None, f"{base} holds no prepared version ({TFDS_INFO_FILE} missing)"
    ready = [p for p in infos if any(".array_record" in f.name for f in p.iterdir())]
    if not ready:
        return None, (
            f"{infos[-1]} is not in the array_record format (TFRecord needs TensorFlow), "
            f"rebuild it with --file_format=array_record"
        )
    return ready[-1], ""


def _import_tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise DataError(
            "tensorflow_datasets is not installed; pip install 'mpdnn[train]'"
        ) from None
    return tfds


def tfds_source(
    name: str, data_dir: str | os.PathLike | None, split: str, *, how_to_prepare: str
) -> Any:
    """``tfds.data_source`` of one split of a prepared dataset, failing fast when it is absent.

    ``how_to_prepare`` ends the error message (the build command that fits this dataset).
    """
    folder, reason = find_prepared(name, data_dir)
    if folder is None:
        raise DataError(f"tfds dataset {name} is not prepared: {reason}; {how_to_prepare}")
    tfds = _import_tfds()
    # name[/config]:version pins the version that is on disk, not tfds's newest.
    root = _root(data_dir)
    *config, version = folder.relative_to(root / name).parts
    spec = f"{'/'.join([name, *config])}:{version}"
    try:
        return tfds.data_source(
            spec, split=split, data_dir=os.fspath(root), download=False, try_gcs=False
        )
    except Exception as e:  # tfds raises a zoo of types; the CLI needs one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise DataError(
            f"tfds could not open {spec} split {split!r} in {folder} "
            f"({type(e).__name__}: {first}); {how_to_prepare}"
        ) from None


def stock_build_hint(name: str, data_dir: str | os.PathLike | None) -> str:
    """How to get a stock tfds dataset on disk in the format this module reads."""
    return (
        f"building a stock tfds dataset needs pip install 'mpdnn[tf]' and network "
        f"(tfds build {name} --data_dir={_root(data_dir)} --file_format=array_record), "
        f"or use a local copy instead"
    )


def _read_all(source: Any, chunk: int = 1024) -> list[dict]:
    """Every record of a data source, fetched in chunks when the source supports it."""
    n = len(source)
    getitems = getattr(source, "__getitems__", None)
    if getitems is None:
        return [source[i] for i in range(n)]
    out: list[dict] = []
    for start in range(0, n, chunk):
        out.extend(getitems(list(range(start, min(n, start + chunk)))))
    return out


def tfds_arrays(
    name: str,
    data_dir: str | os.PathLike | None,
    *,
    splits: Sequence[str] = ("train", "test"),
    how_to_prepare: str | None = None,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{split: (images uint8 NHWC, labels int32)}`` of a prepared in-memory-sized dataset.

    For small datasets only (CIFAR-10): every record is decoded into one array. Fails fast
    with a :class:`DataError` (no tfds call, no network) when the data are not on disk.
    """
    hint = how_to_prepare or stock_build_hint(name, data_dir)
    out = {}
    for split in splits:
        records = _read_all(tfds_source(name, data_dir, split, how_to_prepare=hint))
        if not records:
            raise DataError(f"tfds dataset {name} split {split!r} is empty; {hint}")
        images = np.stack([np.asarray(r["image"], np.uint8) for r in records])
        if images.ndim == 3:
            images = images[..., None]
        labels = np.array([int(r["label"]) for r in records], np.int32)
        out[split] = (images, labels)
    return out
