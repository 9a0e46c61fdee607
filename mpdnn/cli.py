"""Shared command-line helpers: bad input is one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import logging
from typing import NoReturn

from absl import logging as absl_logging


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


def terminal_logging() -> None:
    """absl's log on the terminal as the commands show it: WARNING and above, one record per
    message, without tracebacks.

    A failed checkpoint write makes orbax log the same error from each of its threads, each
    with its traceback, and asyncio report each of orbax's tasks whose error orbax had
    already raised; the command then ends with its own one-line error naming the failure.
    So the records keep their message and drop the traceback, and asyncio's logger (mpdnn
    runs no asyncio code of its own) shows CRITICAL only. Exceptions that end a command are
    not log records: Python still prints theirs.
    """
    absl_logging.set_verbosity(absl_logging.WARNING)
    absl_logging.get_absl_handler().setFormatter(_MessageOnly())
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)


class _MessageOnly(absl_logging.PythonFormatter):
    """absl's record format (its ``E1202 12:00:00.000 ...] `` prefix) without the record's
    traceback or stack."""

    def formatException(self, ei) -> str:  # noqa: N802 (logging's name)
        return ""

    def formatStack(self, stack_info) -> str:  # noqa: N802
        return ""
