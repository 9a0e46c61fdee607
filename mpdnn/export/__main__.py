"""``python -m mpdnn.export``: see :mod:`mpdnn.export.cli`."""

import sys

from mpdnn.export.cli import main

sys.exit(main())
