"""The default experiment (float vs fixed 2-bit vs learned bits under a weight budget on
scikit-learn's digits); the config itself lives in :mod:`mpdnn.configs.digits` so that
``python -m mpdnn.train`` finds it installed. See there for the commands and expectations.

    python -m mpdnn.train --config experiments/digits.py [--workdir runs/digits]
    python -m mpdnn.train --config experiments/digits.py:smoke --workdir /tmp/digits
"""

from mpdnn.configs.digits import get_config

__all__ = ["get_config"]
