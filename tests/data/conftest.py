"""The small image-folder fixture shared by the data tests."""

from __future__ import annotations

import pytest

from tests.data.images import CLASSES, make_files


@pytest.fixture
def small_files() -> dict[str, bytes]:
    """3 classes; 3 train and 2 test images each."""
    return make_files({"train": dict.fromkeys(CLASSES, 3), "test": dict.fromkeys(CLASSES, 2)})
