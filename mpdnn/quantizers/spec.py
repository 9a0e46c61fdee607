"""``QuantSpec``: the static description of one quantizer (docs/method.md §10).

A spec is a frozen dataclass of Python values, hashable, so it can be a static argument of
``jax.jit``; it is also registered as a pytree with no leaves, so passing it as an ordinary
argument through ``jit``/``vmap`` works too.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax

Family = Literal["uniform", "pow2"]

#: Learnable raw values of each parametrization, per family (docs/method.md §2).
PARAMETRIZATIONS: dict[str, dict[str, tuple[str, ...]]] = {
    "uniform": {
        "b_d": ("b", "d"),  # U1
        "b_qmax": ("b", "qmax"),  # U2
        "d_qmax": ("d", "qmax"),  # U3
    },
    "pow2": {
        "b_qmax": ("b", "qmax"),
        "b_qmin": ("b", "qmin"),
        "qmin_qmax": ("qmin", "qmax"),  # P3
    },
}

#: Paper labels for the parametrizations, for tables and plots.
PAPER_NAMES: dict[tuple[str, str], str] = {
    ("uniform", "b_d"): "U1 (b, d)",
    ("uniform", "b_qmax"): "U2 (b, qmax)",
    ("uniform", "d_qmax"): "U3 (d, qmax)",
    ("pow2", "b_qmax"): "pow2 (b, qmax)",
    ("pow2", "b_qmin"): "pow2 (b, qmin)",
    ("pow2", "qmin_qmax"): "P3 (qmin, qmax)",
}

#: Short labels: the paper's U1–U3/P3 where it names them; the b-based pow2 cases by θ (the
#: paper's P1/P2 are inconsistent between its text and Table 1, docs/method.md §2).
SHORT_NAMES: dict[tuple[str, str], str] = {
    ("uniform", "b_d"): "U1",
    ("uniform", "b_qmax"): "U2",
    ("uniform", "d_qmax"): "U3",
    ("pow2", "b_qmax"): "pow2 b,qmax",
    ("pow2", "b_qmin"): "pow2 b,qmin",
    ("pow2", "qmin_qmax"): "P3",
}

# Widest bitwidth box we accept: 2**(b-1) levels must stay exact in float32.
MAX_BITS = 24


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized: family, parametrization, signedness and boxes.

    Attributes:
      family: ``"uniform"`` (fixed point, docs/method.md §1.1) or ``"pow2"`` (docs/method.md §1.2).
      parametrization: which raw values θ are learned (docs/method.md §2). Uniform: ``"b_d"`` (U1),
        ``"b_qmax"`` (U2), ``"d_qmax"`` (U3). Pow2: ``"b_qmax"``, ``"b_qmin"``,
        ``"qmin_qmax"`` (P3).
      signed: symmetric signed grid (weights) or unsigned grid that replaces a ReLU.
      with_zero: pow2 only: magnitudes below ``qmin/√2`` map to 0 and one code is spent on
        zero. Ignored by the uniform family, whose grid always contains zero.
      pow2_step: snap the step ``d`` (uniform) or ``qmin``/``qmax`` (pow2) to powers of two
        (docs/method.md §2, hardware constraint 3).
      b_range, d_range, qmax_range, qmin_range: boxes ``[lo, hi]`` that each raw θ is
        clipped to in the forward pass (docs/method.md §2, constraint 1). ``b_range[0]`` is also the
        minimum inferred bitwidth ``b_min`` (docs/method.md §3; the authors' ``*_bitwidth_min``).

    Defaults are the authors' weight boxes; :func:`activation_spec` gives activation ones.
    """

    family: Family = "uniform"
    parametrization: str = "d_qmax"
    signed: bool = True
    with_zero: bool = False
    pow2_step: bool = True
    b_range: tuple[float, float] = (2, 8)
    d_range: tuple[float, float] = (2**-8, 1.0)
    qmax_range: tuple[float, float] = (2**-8, 127.0)
    qmin_range: tuple[float, float] = (2**-16, 127.0)

    def __post_init__(self) -> None:
        if self.family not in PARAMETRIZATIONS:
            raise ValueError(f"unknown family {self.family!r}; expected 'uniform' or 'pow2'")
        options = PARAMETRIZATIONS[self.family]
        if self.parametrization not in options:
            raise ValueError(
                f"unknown {self.family} parametrization {self.parametrization!r}; "
                f"expected one of {sorted(options)}"
            )
        for name in ("b_range", "d_range", "qmax_range", "qmin_range"):
            value = getattr(self, name)
            try:
                lo, hi = (float(v) for v in value)
            except (TypeError, ValueError):
                raise ValueError(f"{name} must be a pair (lo, hi), got {value!r}") from None
            if not lo <= hi:
                raise ValueError(f"{name} is inverted: lo={lo} > hi={hi}")
            if name != "b_range" and not lo > 0:
                raise ValueError(f"{name} must be positive, got lo={lo}")
            # Normalise to a tuple of floats so equal specs hash equally.
            object.__setattr__(self, name, (lo, hi))
        b_lo, b_hi = self.b_range
        if b_lo < 1 or b_hi > MAX_BITS:
            raise ValueError(f"b_range must lie within [1, {MAX_BITS}], got {self.b_range}")
        needed = self._min_magnitude_bits + b_lo - self.magnitude_bits(b_lo)
        if self.learns_bits and b_lo < needed:
            raise ValueError(
                f"b_range lower bound {b_lo:g} is too small: a {self.describe()} quantizer "
                f"needs at least {needed:g} bits"
            )

    @property
    def theta_names(self) -> tuple[str, ...]:
        """Keys of the raw learnable θ this spec reads."""
        return PARAMETRIZATIONS[self.family][self.parametrization]

    @property
    def learns_bits(self) -> bool:
        """True for U1, U2 and the two b-based pow2 cases (b is a raw θ)."""
        return "b" in self.theta_names

    @property
    def paper_name(self) -> str:
        return PAPER_NAMES[(self.family, self.parametrization)]

    def describe(self) -> str:
        """E.g. ``"signed uniform d_qmax"``, for messages."""
        zero = " with zero" if self.family == "pow2" and self.with_zero else ""
        sign = "signed" if self.signed else "unsigned"
        return f"{sign} {self.family}{zero} {self.parametrization}"

    @property
    def _min_magnitude_bits(self) -> int:
        # Uniform needs 2**k - 1 >= 1 level per side; pow2 needs 2**k >= 1 magnitude.
        return 1 if self.family == "uniform" else 0

    def magnitude_bits(self, bits):
        """k of docs/method.md §2: uniform ``b - signed``; pow2 ``b - signed - with_zero``."""
        k = bits - int(self.signed)
        if self.family == "pow2":
            k = k - int(self.with_zero)
        return k

    def box(self, name: str) -> tuple[float, float]:
        """The box of raw value ``name`` (one of ``b``, ``d``, ``qmax``, ``qmin``)."""
        return getattr(self, f"{name}_range")


def weight_spec(
    family: Family = "uniform", parametrization: str | None = None, **overrides
) -> QuantSpec:
    """A signed weight quantizer with the authors' weight boxes (pow2: ``with_zero=False``).

    ``parametrization`` defaults to the paper's choice: U3 (``d_qmax``) or P3
    (``qmin_qmax``).
    """
    parametrization = parametrization or ("d_qmax" if family == "uniform" else "qmin_qmax")
    fields = dict(family=family, parametrization=parametrization, signed=True, with_zero=False)
    return QuantSpec(**{**fields, **overrides})


def activation_spec(
    family: Family = "uniform", parametrization: str | None = None, **overrides
) -> QuantSpec:
    """An unsigned activation quantizer (replaces a ReLU) with the authors' activation boxes.

    Boxes (authors' code): d ∈ [2^-8, 1], qmax ∈ [2^-8, 255], qmin ∈ [2^-14, 255],
    b ∈ [1, 8]. Pow2 activations use ``with_zero=True`` (docs/method.md §1.2).
    """
    parametrization = parametrization or ("d_qmax" if family == "uniform" else "qmin_qmax")
    fields = dict(
        family=family,
        parametrization=parametrization,
        signed=False,
        with_zero=family == "pow2",
        b_range=(1, 8),
        d_range=(2**-8, 1.0),
        qmax_range=(2**-8, 255.0),
        qmin_range=(2**-14, 255.0),
    )
    return QuantSpec(**{**fields, **overrides})
