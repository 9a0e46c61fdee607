"""Helpers that write tiny JPEG image folders and tars with Pillow (into ``tmp_path``)."""

from __future__ import annotations

import io
import tarfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

# Created in this order on purpose: labels must follow the *sorted* names (ant, mole, zebra).
CLASSES = ("zebra", "ant", "mole")


def jpeg_bytes(array: np.ndarray, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def pillow_decode(data: bytes) -> np.ndarray:
    """The reference decoder, independent of mpdnn.data."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def make_files(
    counts: dict[str, dict[str, int]], size: tuple[int, int] = (8, 8)
) -> dict[str, bytes]:
    """``{"train/ant/003.jpg": jpeg bytes}``; file names are zero-padded, content random."""
    files = {}
    for split, per_class in counts.items():
        for name, n in per_class.items():
            for i in range(n):
                seed = zlib.crc32(f"{split}/{name}/{i}".encode())
                image = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
                files[f"{split}/{name}/{i:03d}.jpg"] = jpeg_bytes(image)
    return files


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def write_tar(
    path: Path, files: dict[str, bytes], *, prefix: str = "", dirs: tuple[str, ...] = ()
) -> Path:
    """A gzipped tar, files shuffled; directory members only for ``dirs`` (many tools omit
    them)."""
    names = list(files)
    np.random.default_rng(0).shuffle(names)
    with tarfile.open(path, "w:gz") as archive:
        for rel in dirs:
            info = tarfile.TarInfo(prefix + rel)
            info.type = tarfile.DIRTYPE
            archive.addfile(info)
        for rel in names:
            info = tarfile.TarInfo(prefix + rel)
            info.size = len(files[rel])
            archive.addfile(info, io.BytesIO(files[rel]))
    return path
