"""Where arrays live: the device mesh, and placement that works on one process or many.

Data parallel over a ``Mesh`` of every device (of every host after
``jax.distributed.initialize``): batches are sharded on the ``data`` axis, parameters and
optimizer state are replicated; the same code runs on one device or many.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from mpdnn.training.config import ConfigError


def make_mesh(num_devices: int) -> Mesh:
    """A one-axis (``"data"``) mesh of the first ``num_devices`` devices (0: all)."""
    devices = jax.devices()
    if num_devices:
        if num_devices > len(devices):
            raise ConfigError(
                f"train.num_devices={num_devices} but only {len(devices)} devices exist"
            )
        devices = devices[:num_devices]
    return Mesh(np.asarray(devices), ("data",))


def put(tree, sharding: NamedSharding):
    """Place host or device arrays with ``sharding`` (works with many processes too)."""
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def one(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(one, tree)


def local(tree):
    """A replicated global array's local copy (host-side reports on any process)."""
    return jax.tree.map(lambda x: x.addressable_data(0) if isinstance(x, jax.Array) else x, tree)


def any_process(flag: bool) -> bool:
    """Whether ``flag`` is set on any process. A stop asked of one process only (a SIGTERM
    that reaches one host first, ``should_stop``) must stop them all after the same step: a
    process that went on would wait forever in the next step's collectives for the others,
    which wait in the checkpoint's."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))
