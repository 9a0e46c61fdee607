"""Shared test settings: strict JAX numerics and the parameter grid over quantizer specs."""

from __future__ import annotations

import itertools
import os

import jax
import pytest
from hypothesis import HealthCheck, settings

# Strict settings, as Equinox's tests: implicit rank promotion is a bug in library code.
jax.config.update("jax_numpy_rank_promotion", "raise")

# jit compiles dominate example time; deadlines would only measure the compiler.
settings.register_profile(
    "mpdnn",
    deadline=None,
    max_examples=int(os.environ.get("MPDNN_HYPOTHESIS_EXAMPLES", "60")),
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("mpdnn")


def all_spec_kwargs():
    """Every family × parametrization × signedness × with_zero (pow2) × pow2_step."""
    import mpdnn.quantizers as mq

    out = []
    for family, pars in mq.PARAMETRIZATIONS.items():
        zeros = (False, True) if family == "pow2" else (False,)
        for par, signed, with_zero, p2 in itertools.product(
            pars, (True, False), zeros, (True, False)
        ):
            out.append(
                dict(
                    family=family,
                    parametrization=par,
                    signed=signed,
                    with_zero=with_zero,
                    pow2_step=p2,
                )
            )
    return out


def spec_id(kw) -> str:
    return "-".join(
        [
            kw["family"],
            kw["parametrization"],
            "s" if kw["signed"] else "u",
            *(["z"] if kw.get("with_zero") else []),
            "p2" if kw["pow2_step"] else "free",
        ]
    )


@pytest.fixture(params=[False, True], ids=["eager", "jit"])
def maybe_jit(request):
    """Run each quantizer test under ``jax.jit`` and without."""
    return jax.jit if request.param else (lambda f: f)
