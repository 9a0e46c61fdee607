"""One process of the multi-process training test (``tests/training/test_multihost.py``).

Both a config file (:func:`get_config`) and the script that trains it. The script runs
``python -m mpdnn.train --config <this file> --workdir OUT/workdir`` in-process, with
``--distributed --coordinator_address ... --num_processes ... --process_id ...`` when given
``--coordinator``, so the processes start exactly as the CLI documents. In a distributed job
process 1 alone is asked to stop at once, as a SIGTERM reaching one host first would: every
process must stop after the first step (exit status 143), and the trainer, run again on the
workdir, resumes from the checkpoint the processes wrote together and finishes. Last, every
process loads ``final/`` as a float-net init (``init.from_workdir``) would; process 0 writes
``OUT/params.npz`` (those parameters, keyed by tree path). Each process writes
``OUT/result-<process id>.json``.

    python tests/training/multihost_worker.py OUT                      # one process
    python tests/training/multihost_worker.py OUT --coordinator 127.0.0.1:PORT \\
        --num-processes 2 --process-id I                               # one per I
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

import ml_collections

REPO = Path(__file__).resolve().parents[2]


def get_config() -> ml_collections.ConfigDict:
    """A learned quantized small CNN on synthetic data: 3 steps of global batch 16 under a
    weight budget, so the budget transforms run in every step. The budget is met from the
    start (0.36 KB at 4 bits against 0.5 KB) and the run evaluates after every step that
    meets it, so the processes also save, delete and restore ``best/`` checkpoints."""
    from tests.training.test_trainer import tiny_config

    c = tiny_config(max_steps=3, steps_per_call=1, eval_feasible_every=1)
    c.name = "multihost"
    c.budget.recipe = "paper"  # evaluations select best/: the processes save and restore it
    c.budget.weight_kb = 0.5
    return c


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--coordinator", help="HOST:PORT of process 0's coordinator")
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--process-id", type=int, default=0)
    args = parser.parse_args(argv)
    workdir = args.out / "workdir"

    import jax

    # The resumed run compiles the same steps again (new jitted closures): a disk cache of
    # this worker's compilations turns that into lookups (in a distributed job JAX writes
    # the cache from process 0 only; the others compile again).
    jax.config.update("jax_compilation_cache_dir", str(args.out / f"jax-cache-{args.process_id}"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

    from mpdnn import train
    from mpdnn.training import trainer

    cli = ["mpdnn.train", "--config", str(Path(__file__).resolve()), "--workdir", str(workdir)]
    if args.coordinator:
        cli += [
            "--distributed",
            f"--coordinator_address={args.coordinator}",
            f"--num_processes={args.num_processes}",
            f"--process_id={args.process_id}",
        ]
        if args.process_id == 1:
            trainer.STOP_REQUESTED.set()
    sys.argv = cli
    try:
        train.run()
    except SystemExit as exit_:
        status = exit_.code or 0
    else:
        status = 0
    record = {"status": status}

    config = get_config()
    if args.coordinator:
        if status != 143:
            raise RuntimeError(f"the first run ended with status {status}, not 143 (stopped)")
        trainer.STOP_REQUESTED.clear()
        resumed = trainer.train_and_evaluate(config, workdir, command="multihost_worker")
        record["resumed"] = {k: getattr(resumed, k) for k in ("status", "step")}
    elif status:
        raise RuntimeError(f"the run ended with status {status}")

    import numpy as np
    from flax import nnx

    from mpdnn.training import setup
    from mpdnn.training.rundir import RunDir

    model = setup.build_model(config, setup.load_data(config), workdir)
    setup.restore_model(model, RunDir(workdir).final)
    _, params, rest = nnx.split(model, nnx.Param, ...)
    record |= {"process_count": jax.process_count(), "device_count": jax.device_count()}
    (args.out / f"result-{args.process_id}.json").write_text(json.dumps(record) + "\n")
    if jax.process_index() == 0:
        leaves = jax.tree_util.tree_leaves_with_path({"params": params, "rest": rest})
        np.savez(
            args.out / "params.npz",
            **{jax.tree_util.keystr(path): np.asarray(x) for path, x in leaves},
        )
    if args.coordinator:
        jax.distributed.shutdown()


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    try:
        main(sys.argv[1:])
    except BaseException:
        # Exit now: a normal exit would wait in jax.distributed's shutdown barrier (up to
        # 5 minutes) for a partner that may itself be waiting for this process.
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
