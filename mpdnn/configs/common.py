"""What the config registries share: ``key=value`` arguments, quantizer settings, two steps."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

import ml_collections

from mpdnn.training.config import ConfigError


def parse_options(
    arg: str | None,
    what: str,
    choices: Mapping[str, Collection[str]],
    defaults: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """``"key=value,key=value"`` (a config file's ``:arg``) as a dict over ``defaults``.

    Every key of ``choices`` must end up with a value; an unknown key, an unknown value or a
    missing key is a one-line :class:`ConfigError` that lists what is valid.
    """
    out = dict(defaults or {})
    usage = ",".join(f"{k}=<{k}>" for k in choices)
    for word in (w.strip() for w in (arg or "").split(",")):
        if not word:
            continue
        key, sep, value = word.partition("=")
        if not sep or key not in choices:
            raise ConfigError(
                f"{what}: unknown argument {word!r}; expected {usage}, keys: {', '.join(choices)}"
            )
        if value not in choices[key]:
            raise ConfigError(f"{what}: unknown {key} {value!r}; known: {', '.join(choices[key])}")
        out[key] = value
    missing = [k for k in choices if k not in out]
    if missing:
        key = missing[0]
        raise ConfigError(
            f"{what}: say {key}=<{key}> ({usage}); known {key}s: {', '.join(choices[key])}"
        )
    return out


def set_quantizers(
    c: ml_collections.ConfigDict,
    *,
    weights: Mapping[str, Any] | None = None,
    activations: Mapping[str, Any] | None = None,
    budgets: Mapping[str, float] | None = None,
    recipe: str = "paper",
) -> None:
    """A row's ``quant.weights`` / ``quant.activations`` overrides, its budgets (KB) and
    ``budget.recipe``."""
    c.quant.weights.update(dict(weights or {}))
    c.quant.activations.update(dict(activations or {}))
    for size, limit in (budgets or {}).items():
        setattr(c.budget, size, limit)
    c.budget.recipe = recipe


def two_steps(
    c: ml_collections.ConfigDict,
    *,
    batch_size: int | None = None,
    eval_batch_size: int | None = None,
    steps_per_call: int = 1,
) -> None:
    """Shrink a run to one epoch cut at two steps: a smoke check of the whole pipeline."""
    c.train.epochs = 1
    c.train.max_steps = 2
    c.train.steps_per_call = steps_per_call
    c.optim.decay_epochs = ()
    if batch_size is not None:
        c.train.batch_size = batch_size
    if eval_batch_size is not None:
        c.train.eval_batch_size = eval_batch_size
