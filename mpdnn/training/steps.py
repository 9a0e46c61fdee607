"""The jitted steps of a run: the update, the evaluation, BatchNorm recalibration.

One pure update step ``(state, x, y) -> (state, metrics)`` and one helper,
:func:`chunked`, that runs any step over the leading axis of its inputs, as one
``lax.scan`` on accelerators or as a Python loop of jitted steps on CPU (XLA:CPU runs
convolutions inside a while loop far slower than outside one: measured here, a ResNet-20
gradient at batch 64 takes 0.71 s plain and 10.5 s per step scanned).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mpdnn import data as mdata
from mpdnn import optim
from mpdnn.training.streaming import StreamingData, padded, put_local


def chunked(step: Callable, scan: bool, sharding: NamedSharding, *, donate: bool = True):
    """``step(carry, xs_i, *consts) -> (carry, out_i)`` made into one call
    ``(carry, xs, *consts) -> (carry, outs)`` over the leading axis of the pytree ``xs``:
    a jitted ``lax.scan`` when ``scan``, else a loop of the jitted step (outputs stacked).
    ``carry`` is donated when ``donate``; results are placed with ``sharding``."""
    donate_argnums = (0,) if donate else ()
    if scan:

        @partial(jax.jit, donate_argnums=donate_argnums, out_shardings=sharding)
        def scanned(carry, xs, *consts):
            return jax.lax.scan(lambda c, x: step(c, x, *consts), carry, xs)

        return scanned
    one = jax.jit(step, donate_argnums=donate_argnums, out_shardings=sharding)

    def looped(carry, xs, *consts):
        outs = []
        for i in range(len(jax.tree.leaves(xs)[0])):
            carry, out = one(carry, jax.tree.map(lambda a, i=i: a[i], xs), *consts)
            outs.append(out)
        return carry, jax.tree.map(lambda *v: jnp.stack(v), *outs)

    return looped


def scans(config: ml_collections.ConfigDict, mesh: Mesh) -> bool:
    """``train.scan``, or by default: scan on accelerators, loop on CPU."""
    scan = config.train.scan
    return mesh.devices.flat[0].platform != "cpu" if scan is None else bool(scan)


class Steps(NamedTuple):
    """A run's jitted calls. ``train(state, xs) -> (state, metrics [k])``: ``xs`` is
    ``[k, B]`` indices into the device-resident training images, or ``(images [k, B, …],
    labels [k, B])`` of host-prepared (streamed) batches. ``evaluate(params, rest, split)
    -> (wrong, summed cross-entropy)``. ``recalibrate`` is a :class:`Recalibrator` or None."""

    train: Callable
    evaluate: Callable
    recalibrate: Recalibrator | None


def make_steps(
    graphdef,
    eval_graphdef,
    tx: optax.GradientTransformation,
    accounting: optim.Accounting,
    dataset: mdata.ArrayDataset | StreamingData,
    config: ml_collections.ConfigDict,
    mesh: Mesh,
    recal_graphdef=None,
    images=None,
    labels=None,
) -> Steps:
    """The jitted calls of a run (see :class:`Steps`). Device-resident data (``images``,
    ``labels`` on the mesh) is gathered, normalised and augmented on device; streamed
    batches arrive normalised and augmented from the host. Every step's metrics hold the
    loss, the accuracy, the sizes and, when some bits are learned, every tensor's bits."""
    batch = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())
    stream = isinstance(dataset, StreamingData)
    track_bits = any(q.learns_bits for q in accounting.quantizers)
    scale, offset = (1.0, 0.0) if stream else (dataset.pixel_scale, dataset.pixel_offset)
    augment = config.data.augment
    aug_key = jax.random.fold_in(jax.random.key(config.seed), 1)
    scan = scans(config, mesh)

    def loss_fn(params, rest, x, y):
        model = nnx.merge(graphdef, params, rest, copy=True)
        logits = model(x)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        _, _, new_rest = nnx.split(model, nnx.Param, ...)
        return loss, (logits, new_rest)

    def update(state, x, y):
        """One optimizer step on the batch ``(x, y)``: the pure update of a run."""
        x = jax.lax.with_sharding_constraint(x, batch)
        y = jax.lax.with_sharding_constraint(y, batch)
        params = state["params"]
        (loss, (logits, rest)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, state["rest"], x, y
        )
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        bits = accounting.tensor_bits(params)
        metrics = {
            "loss": loss,
            "accuracy": jnp.mean(jnp.argmax(logits, -1) == y),
            **accounting.sizes_of_bits(bits)._asdict(),
        }
        if track_bits:  # per-tensor bits of every step: the bit changes of the diagnostics
            metrics["bits"] = bits
        new_state = {
            "step": state["step"] + 1,
            "params": optax.apply_updates(params, updates),
            "rest": rest,
            "opt_state": opt_state,
        }
        return new_state, metrics

    def indexed_update(state, idx, images, labels):
        x = mdata.normalize(images[idx], scale, offset)
        if augment:
            key = jax.random.fold_in(aug_key, state["step"])
            x = mdata.random_crop_flip(key, x, pad=config.data.pad, flip=config.data.flip)
        return update(state, x, labels[idx])

    if stream:
        train = chunked(lambda s, b: update(s, *b), scan, replicated)
    else:
        run_indexed = chunked(indexed_update, scan, replicated)

        def train(state, idx):
            return run_indexed(state, idx, images, labels)

    def eval_batch(params, rest, x, y, m):
        """Wrong predictions and summed cross-entropy of one masked test batch."""
        x = jax.lax.with_sharding_constraint(mdata.normalize(x, scale, offset), batch)
        logits = nnx.merge(eval_graphdef, params, rest, copy=True)(x)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        return jnp.sum((jnp.argmax(logits, -1) != y) & m), jnp.sum(jnp.where(m, ce, 0.0))

    def accumulate(total, split_i, params, rest):
        wrong, ce = eval_batch(params, rest, *split_i)
        return (total[0] + wrong, total[1] + ce), None

    if stream:
        evaluate = partial(_streamed_eval, jax.jit(eval_batch, out_shardings=replicated), dataset)
        evaluate = partial(evaluate, config, mesh)
    else:
        over_split = chunked(accumulate, scan, replicated, donate=False)

        def evaluate(params, rest, images, labels, mask):
            zero = (jnp.int32(0), jnp.float32(0.0))
            return over_split(zero, (images, labels, mask), params, rest)[0]

    recalibrate = None
    if recal_graphdef is not None:
        recalibrate = Recalibrator(graphdef, recal_graphdef, scale, offset, batch, scan)
    return Steps(train, evaluate, recalibrate)


def recalibration_graphdef(model: nnx.Module):
    """The graph of ``model`` with every BatchNorm's momentum at 0 (for
    :class:`Recalibrator`); ``model`` itself is left as it was."""
    bns = [m for _, m in nnx.iter_modules(model) if isinstance(m, nnx.BatchNorm)]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.momentum = 0.0
    graphdef = nnx.split(model, nnx.Param, ...)[0]
    for bn, momentum in zip(bns, momenta, strict=True):
        bn.momentum = momentum
    return graphdef


class Recalibrator:
    """BatchNorm's running statistics re-estimated on un-augmented training batches, in
    train mode: ``(params, rest, ...) -> (rest, stat_error)``.

    Each batch runs with every BatchNorm's momentum at 0 (``recal_graphdef``), so its
    running statistics become exactly that batch's (mean and biased variance over batch and
    space, what BatchNorm normalises with); the new running statistics are their average
    over the batches, and every other leaf of ``rest`` is returned unchanged. ``stat_error``
    says how far the old statistics were from the new ones: the mean over BatchNorms of the
    mean over channels of ``|μ_old − μ| / sqrt(σ² + ε)`` and of
    ``|log((σ²_old + ε) / (σ² + ε))|``.

    :meth:`indexed` takes device-resident images and ``[n, B]`` indices (scanned on
    accelerators); :meth:`over` takes already normalised device batches (streamed data).
    """

    def __init__(self, graphdef, recal_graphdef, scale, offset, batch: NamedSharding, scan):
        self.scan = scan

        def batch_stats(params, rest, x):
            x = jax.lax.with_sharding_constraint(mdata.normalize(x, scale, offset), batch)
            model = nnx.merge(recal_graphdef, params, rest, copy=True)
            model(x)
            return nnx.state(model, nnx.BatchStat)

        def finish(params, rest, total, n: int):
            model = nnx.merge(graphdef, params, rest, copy=True)
            bns = [m for _, m in nnx.iter_modules(model) if isinstance(m, nnx.BatchNorm)]
            old = [(bn.mean[...], bn.var[...]) for bn in bns]
            nnx.update(model, jax.tree.map(lambda t: t / n, total))
            errors = [jnp.zeros([2])]
            for bn, (mu_old, var_old) in zip(bns, old, strict=True):
                eps = bn.epsilon
                mu, var = bn.mean[...], bn.var[...]
                shift = jnp.mean(jnp.abs(mu_old - mu) / jnp.sqrt(var + eps))
                ratio = jnp.mean(jnp.abs(jnp.log((var_old + eps) / (var + eps))))
                errors.append(jnp.stack([shift, ratio]))
            error = jnp.sum(jnp.stack(errors), axis=0) / max(len(bns), 1)
            return nnx.split(model, nnx.Param, ...)[2], error

        @jax.jit
        def scanned(params, rest, idx, images):
            def one(total, i):
                return jax.tree.map(jnp.add, total, batch_stats(params, rest, images[i])), None

            first = batch_stats(params, rest, images[idx[0]])
            total = jax.lax.scan(one, first, idx[1:])[0]
            return finish(params, rest, total, idx.shape[0])

        self._scanned = scanned
        self._stats = jax.jit(batch_stats)
        self._indexed_stats = jax.jit(lambda p, r, i, images: batch_stats(p, r, images[i]))
        self._finish = jax.jit(finish, static_argnums=3)

    def _accumulate(self, params, rest, stats):
        total, n = None, 0
        for one in stats:
            total = one if total is None else jax.tree.map(jnp.add, total, one)
            n += 1
        return self._finish(params, rest, total, n)

    def indexed(self, params, rest, idx, images):
        if self.scan:
            return self._scanned(params, rest, idx, images)
        stats = (self._indexed_stats(params, rest, i, images) for i in idx)
        return self._accumulate(params, rest, stats)

    def over(self, params, rest, batches):
        return self._accumulate(params, rest, (self._stats(params, rest, x) for x in batches))


def recalibration_indices(seed: int, num_train: int, batch: int, batches: int) -> np.ndarray:
    """``[n, batch]`` training-image indices for BatchNorm recalibration: the same ones at
    every recalibration of a run (a fixed function of the seed, so resumes agree), at most
    the whole training set (``n ≤ num_train // batch``)."""
    n = max(1, min(batches, num_train // batch))
    order = np.random.default_rng([seed, 0xB2]).permutation(num_train)
    return order[: n * batch].reshape(n, batch).astype(np.int32)


def _streamed_eval(one_eval, data: StreamingData, config, mesh: Mesh, params, rest):
    """Wrong predictions and summed cross-entropy over the streamed test split. Every process
    runs the same number of global batches (a short or absent last share is padded and
    masked), so the collectives line up."""
    sharding = NamedSharding(mesh, P("data"))
    global_batch = math.ceil(config.train.eval_batch_size / mesh.size) * mesh.size
    batches = data.batches(train=False, batch=global_batch, epoch=0, seed=config.seed)
    local = batches.local_batch_size
    shares = iter(batches)
    wrong, ce = 0, 0.0
    for _ in range(len(batches)):
        share = next(shares, None)
        if share is None:
            share = (np.zeros((0, *data.image_shape), np.float32), np.zeros(0, np.int32))
        x, y, m = padded(*share, local)
        w, c = one_eval(params, rest, *(put_local(sharding, a) for a in (x, y, m)))
        wrong, ce = wrong + w, ce + c
    return wrong, ce


@functools.lru_cache(maxsize=2)
def epoch_indices(seed: int, epoch: int, num_train: int, steps: int, batch: int) -> np.ndarray:
    """The shuffled ``[steps, batch]`` example indices of one epoch: a function of (seed,
    epoch) only, identical on every process, so a resumed run sees the same batches.
    Cached: every jitted call of the epoch slices the same permutation (read-only)."""
    order = np.random.default_rng([seed, epoch]).permutation(num_train)
    out = order[: steps * batch].reshape(steps, batch).astype(np.int32)
    out.flags.writeable = False
    return out


def eval_arrays(images: np.ndarray, labels: np.ndarray, eval_batch: int):
    """An evaluation split padded to whole batches, shaped ``[batches, batch, ...]``, and
    its mask."""
    n = len(labels)
    batches = math.ceil(n / eval_batch)
    pad = batches * eval_batch - n
    shape = images.shape[1:]
    images = np.concatenate([images, np.zeros((pad, *shape), np.uint8)])
    labels = np.concatenate([labels, np.zeros(pad, np.int32)])
    mask = np.arange(batches * eval_batch) < n
    batched = (batches, eval_batch)
    return images.reshape(*batched, *shape), labels.reshape(batched), mask.reshape(batched)
