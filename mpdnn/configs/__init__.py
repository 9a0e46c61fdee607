"""Configs that ship with the package: the default experiment of ``python -m mpdnn.train``.

The experiment files under ``experiments/`` are the rest; they import from here, never the
other way round.
"""
