"""Shared test settings: strict JAX numerics and the parameter grid over quantizer specs."""

from __future__ import annotations

import os
import tempfile

import jax
import pytest
from hypothesis import HealthCheck, settings

# Strict settings, as Equinox's tests: implicit rank or dtype promotion is a bug in library
# code (a bfloat16 activation silently widened, a bool mask multiplied into a float sum).
# Schedules the tests pass in cast optax's int32 count themselves (tests/optim/cases.py).
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")

# Training tests compile the same steps several times (a run, its resumption, the same config
# on another workdir); XLA's persistent cache turns the repeats into lookups. Keyed by the
# HLO, the JAX version and the flags, so a stale entry can never be used.
jax.config.update(
    "jax_compilation_cache_dir",
    os.environ.get(
        "MPDNN_TEST_JAX_CACHE",
        os.path.join(tempfile.gettempdir(), f"mpdnn-test-jax-cache-{os.getuid()}"),
    ),
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

# jit compiles dominate example time; deadlines would only measure the compiler.
settings.register_profile(
    "mpdnn",
    deadline=None,
    max_examples=int(os.environ.get("MPDNN_HYPOTHESIS_EXAMPLES", "60")),
    suppress_health_check=[HealthCheck.too_slow],
    # CI replays the same examples every run (no flaky surprises on a submission); local
    # runs keep exploring new ones.
    derandomize=bool(os.environ.get("CI")),
)
settings.load_profile("mpdnn")


@pytest.fixture(params=[False, True], ids=["eager", "jit"])
def maybe_jit(request):
    """Run each quantizer test under ``jax.jit`` and without."""
    return jax.jit if request.param else (lambda f: f)
