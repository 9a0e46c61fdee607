"""What the transforms of :mod:`mpdnn.optim` share: the params check, leaves by path, and
finding a transform's state inside a chain's."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import jax
from flax import nnx

from mpdnn.optim.accounting import dotted_path

#: ``params -> {size name: KB}``, e.g. an :class:`~mpdnn.optim.accounting.Accounting`.
SizeFn = Callable[[Any], Mapping[str, jax.Array]]

# optax's message for a transform that needs params (optax._src.base.NO_PARAMS_MSG).
NO_PARAMS = (
    "You are using a transformation that requires the current value of parameters, but you "
    "are not passing `params` when calling `update`."
)

State = TypeVar("State", bound=tuple)


class OptionError(ValueError):
    """A bad option of an :mod:`mpdnn.optim` transform: the option's ``name``, its ``value``,
    the ``rule`` it breaks ("> 0 KB", "in [0, 1)", ...) and the budget size it belongs to
    (``subject``, or None). Callers with names of their own (a training config) rename the
    option and keep the rule, so that every rule lives here once."""

    def __init__(self, name: str, value: Any, rule: str, subject: str | None = None):
        self.name, self.value, self.rule, self.subject = name, value, rule, subject
        where = f" for {subject}" if subject else ""
        super().__init__(f"{name} must be {rule}, got {value!r}{where}")


def require_params(params: Any) -> None:
    """Raise optax's error when a transform that needs ``params`` gets none."""
    if params is None:
        raise ValueError(NO_PARAMS)


def map_by_path(fn: Callable[[str, Any], Any], tree: Any) -> Any:
    """``fn(dotted path, leaf)`` on every leaf; None leaves (optax's masked-out) stay None."""
    return jax.tree_util.tree_map_with_path(
        lambda key_path, x: None if x is None else fn(dotted_path(key_path), x),
        tree,
        is_leaf=lambda x: x is None,
    )


def find_state(opt_state: Any, cls: type[State]) -> State | None:
    """The first ``cls`` inside ``opt_state`` (chained, masked, nested), or None; plain arrays
    where an ``nnx.Optimizer`` keeps them in variables."""
    found = jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, cls))
    state = next((s for s in found if isinstance(s, cls)), None)
    if state is None:
        return None
    return cls(*(v[...] if isinstance(v, nnx.Variable) else v for v in state))
