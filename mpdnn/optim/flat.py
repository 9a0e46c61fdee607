"""The elementwise stages of the update on one vector per group of leaves (ours, for speed).

Weight decay, the authors' clip of θ gradients and the momentum step act element by element,
so they give the same numbers on the leaves of a parameter tree one by one or on the leaves
concatenated into one vector. Leaf by leaf, XLA launches about one kernel per stage per
leaf (ResNet-20 has 139 parameter leaves: ``results/kernel_counts.md``); on one vector it
launches a few, plus the concatenation and the split back. :func:`flat_update` runs a
transform on such vectors, one per group of leaves (the quantizer θ and the rest, which
may have updates of their own), and :func:`clip_flat` is the clip of
:func:`~mpdnn.optim.clip_quantizer_gradients` on a θ vector. :func:`~mpdnn.optim.budget_chain`
uses them with ``flat=True``.

Equality: every element goes through the same operations in the same order, so on CPU the
updates are bit-identical to the leafwise chain (tested). A GPU compiler may contract a
multiply and an add into one fused multiply-add within a kernel, so where the kernels are
cut differently results can differ in the last bit there.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mpdnn.optim._base import require_params
from mpdnn.optim.accounting import dotted_path
from mpdnn.optim.stabilisers import reduce_bound

#: ``(params, paths, signed=True) -> {leaf path: bound}``
#: (:func:`~mpdnn.optim.stabilisers.clip_bounds`): the leaves named are clipped to
#: ``[−|bound|, |bound|]`` (fitted to the leaf by
#: :func:`~mpdnn.optim.stabilisers.reduce_bound`), the others not at all.
BoundsFn = Callable[..., Mapping[str, jax.Array]]


def clip_flat() -> optax.GradientTransformationExtraArgs:
    """Clip a vector of updates elementwise to ``[−clip_bound, clip_bound]``, the bound a
    vector of the same length given as the extra argument ``clip_bound`` (``inf`` where
    nothing is clipped); :func:`flat_update` passes it. Stateless."""

    def update_fn(updates, state, params=None, *, clip_bound=None, **extra):
        del params, extra
        if clip_bound is None:
            raise ValueError("clip_flat needs clip_bound (run it inside flat_update with bounds)")
        return jnp.clip(updates, -clip_bound, clip_bound), state

    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update_fn)


def _groups(flat: list[tuple[Any, jax.Array]], label_fn: Callable[[str], str]) -> dict:
    """``{label: [leaf index, ...]}`` of ``tree_flatten_with_path``'s leaves, in their
    order; one dtype per label."""
    groups: dict[str, list[int]] = {}
    dtypes: dict[str, Any] = {}
    for i, (path, leaf) in enumerate(flat):
        label = label_fn(dotted_path(path))
        dtype = jnp.result_type(leaf)
        if dtypes.setdefault(label, dtype) != dtype:
            raise ValueError(
                f"flat_update needs one dtype per group: {label!r} holds {dtypes[label]} "
                f"and {dtype} ({dotted_path(path)})"
            )
        groups.setdefault(label, []).append(i)
    return groups


def _concat(leaves: list[jax.Array], idx: list[int]) -> jax.Array:
    return jnp.concatenate([jnp.ravel(leaves[i]) for i in idx])


def _bound_vector(bound: jax.Array | None, leaf: jax.Array) -> jax.Array:
    """``bound`` fitted to ``leaf``, broadcast to it and raveled, its sign kept where no
    reduction was needed (the caller takes ``abs`` of the whole vector: one kernel, not one
    per leaf); ``inf`` without a bound."""
    shape, dtype = jnp.shape(leaf), jnp.result_type(leaf)
    if bound is None:
        return jnp.full(math.prod(shape), jnp.inf, dtype)
    if jnp.shape(bound) != shape:
        bound = reduce_bound(jnp.abs(bound), shape)
    return jnp.ravel(jnp.broadcast_to(bound.astype(dtype), shape))


def flat_update(
    transforms: Mapping[str, optax.GradientTransformation],
    label_fn: Callable[[str], str],
    *,
    bounds: BoundsFn | None = None,
    bounded: str | None = None,
) -> optax.GradientTransformation:
    """Run ``transforms[label]`` on one vector per label: the leaves whose dotted path
    ``label_fn`` maps to that label, concatenated in the tree's leaf order (updates and
    params alike), the result split back into leaves of their shapes.

    ``bounds`` (with ``bounded``, the label of the group it applies to): the clip bound of
    each leaf of that group, broadcast to the leaf and concatenated like it (``inf`` for the
    leaves it does not name), passed to that group's transform as the extra argument
    ``clip_bound`` (for :func:`clip_flat`). Every group's transform gets ``params``. The
    state is ``{label: state}`` of the labels present at ``init``; a group holds one dtype.
    """

    def init_fn(params):
        flat, _ = jax.tree_util.tree_flatten_with_path(params)
        leaves = [leaf for _, leaf in flat]
        groups = _groups(flat, label_fn)
        missing = sorted(set(groups) - set(transforms))
        if missing:
            raise ValueError(f"flat_update has no transform for the groups {missing}")
        return {label: transforms[label].init(_concat(leaves, i)) for label, i in groups.items()}

    def update_fn(updates, state, params=None):
        require_params(params)
        flat, treedef = jax.tree_util.tree_flatten_with_path(params)
        p_leaves = [leaf for _, leaf in flat]
        u_leaves = treedef.flatten_up_to(updates)
        groups = _groups(flat, label_fn)
        if set(groups) != set(state):
            raise ValueError(f"flat_update's state holds {sorted(state)}, params {sorted(groups)}")
        out = list(u_leaves)
        new_state = {}
        for label, idx in groups.items():
            extra = {}
            if bounds is not None and label == bounded:
                paths = [dotted_path(flat[i][0]) for i in idx]
                named = bounds(params, paths, signed=True)
                extra["clip_bound"] = jnp.abs(
                    jnp.concatenate(
                        [
                            _bound_vector(named.get(p), p_leaves[i])
                            for p, i in zip(paths, idx, strict=True)
                        ]
                    )
                )
            tx = optax.with_extra_args_support(transforms[label])
            vector, new_state[label] = tx.update(
                _concat(u_leaves, idx), state[label], _concat(p_leaves, idx), **extra
            )
            sizes = [math.prod(jnp.shape(p_leaves[i])) for i in idx]
            pieces = jnp.split(vector, np.cumsum(sizes)[:-1].tolist())
            for i, piece in zip(idx, pieces, strict=True):
                out[i] = piece.reshape(jnp.shape(u_leaves[i])).astype(jnp.result_type(u_leaves[i]))
        return treedef.unflatten(out), new_state

    return optax.GradientTransformation(init_fn, update_fn)
