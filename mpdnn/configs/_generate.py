"""Writing a registry's rows out as thin experiment files (``experiments/<table>/<row>.py``).

The registries (:mod:`mpdnn.configs.cifar10`, :mod:`mpdnn.configs.imagenet`) are the single
source of truth; each row file only calls the registry's ``row_config``, and tests compare
the files on disk with what :func:`write_row_files` would write.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable
from pathlib import Path


def write_row_files(
    directory: Path, names: Iterable[str], text: Callable[[str], str]
) -> list[Path]:
    """Write ``text(name)`` to ``directory/<name>.py`` for every row name."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name in names:
        path = directory / f"{name}.py"
        path.write_text(text(name))
        written.append(path)
    return written


def main(table: str, names: Iterable[str], text: Callable[[str], str]) -> None:
    """``python -m mpdnn.configs.<table> --write DIR``."""
    parser = argparse.ArgumentParser(description=f"Write experiments/{table}/<row>.py files.")
    parser.add_argument("--write", type=Path, required=True, help="the directory to write")
    paths = write_row_files(parser.parse_args().write, names, text)
    print(f"wrote {len(paths)} row files to {paths[0].parent}")
