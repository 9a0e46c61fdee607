"""Quantize a model by rules matched against module paths (in the spirit of qwix).

A rule says which layers get which :class:`~mpdnn.nn.quantizer.QuantConfig`::

    rules = [
        Rule(r"stem", QuantConfig(mode="fixed", bits=8), kind="weight"),
        Rule(r".*", QuantConfig(family="uniform", bits=4), kind="weight"),
        Rule(r".*", QuantConfig(family="uniform", bits=4), kind="activation"),
    ]
    quantize_model(model, rules)

Paths are the NNX attribute paths joined by dots (``stages.0.1.conv1``, ``head``). For every
quantizable site the **first** rule whose ``kind`` fits and whose pattern matches the whole
path (``re.fullmatch``) decides; a site no rule matches stays float.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Literal

from flax import nnx

from mpdnn.nn.layers import ActQuant, QuantizedWeights
from mpdnn.nn.quantizer import QuantConfig


@dataclasses.dataclass(frozen=True)
class Rule:
    """``pattern`` (regex, full match on the dotted path) → ``config`` for sites of ``kind``
    (``"weight"`` for conv/linear kernels and biases, ``"activation"``, or ``None``: both)."""

    pattern: str
    config: QuantConfig
    kind: Literal["weight", "activation"] | None = None

    def __post_init__(self) -> None:
        try:
            re.compile(self.pattern)
        except re.error as err:
            raise ValueError(f"rule pattern {self.pattern!r} is not a regex: {err}") from None
        if self.kind not in (None, "weight", "activation"):
            raise ValueError(f"rule kind must be 'weight', 'activation' or None, not {self.kind!r}")

    def matches(self, path: str, kind: str) -> bool:
        return (self.kind is None or self.kind == kind) and re.fullmatch(self.pattern, path)


def path_str(path: Sequence) -> str:
    return ".".join(str(p) for p in path)


def quantizable_sites(model: nnx.Module) -> list[tuple[str, str, nnx.Module]]:
    """``(path, kind, module)`` of every weight layer and activation site, in forward order
    once :func:`~mpdnn.nn.layers.record_activation_shapes` has traced the model."""
    out = []
    for path, m in nnx.iter_modules(model):
        if isinstance(m, QuantizedWeights):
            out.append((path_str(path), "weight", m))
        elif isinstance(m, ActQuant):
            out.append((path_str(path), "activation", m))
    return sorted(out, key=lambda site: site[2].site_index)


def quantize_model(model: nnx.Module, rules: Sequence[Rule]) -> dict[str, QuantConfig | None]:
    """Give every site of ``model`` the config of its first matching rule, in place.

    Weight quantizers are initialised from the layer's current weights (docs/method.md §4), so call
    this after loading a float network for float-net init. Returns ``{path: config}``
    (``None``: no rule matched, left float) so callers can log what was decided.
    """
    decided: dict[str, QuantConfig | None] = {}
    for path, kind, site in quantizable_sites(model):
        rule = next((r for r in rules if r.matches(path, kind)), None)
        decided[path] = rule.config if rule else None
        if rule is not None:
            site.set_quantizer(rule.config)
    return decided
