"""Shared command-line helpers: bad input is one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
from typing import NoReturn


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr (no usage block), exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def define_config_flag(values, argv: list[str], *, default: str | None, help_string: str):
    """``--config FILE[:arg]`` (with ``--config.key=value`` overrides read from ``argv``) in a
    fresh absl ``FlagValues``: what ``mpdnn.train`` and ``mpdnn.report`` both parse.

    ml_collections loads every config file as the module ``config_config`` and reuses a
    loaded module of that name, so a second call in one process would see the first file's
    ``get_config``: the module is dropped first, and each call loads its file afresh."""
    import sys

    from ml_collections import config_flags

    sys.modules.pop("config_config", None)
    return config_flags.DEFINE_config_file(
        "config",
        default=default,
        help_string=help_string,
        flag_values=values,
        lock_config=True,
        sys_argv=argv,
    )
