"""Checkpointer: exact round trips of the trainer's state, shardings, crash and corruption."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mpdnn.training.checkpoint import Checkpointer, CheckpointError

REPO = Path(__file__).resolve().parents[2]


class Model(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs):
        self.linear = nnx.Linear(6, 300, rngs=rngs)  # a 7 KB kernel: stored outside the b-tree
        self.norm = nnx.BatchNorm(300, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.norm(self.linear(x))


class Extra(NamedTuple):
    """A NamedTuple state with the awkward leaves optax states carry."""

    count: jax.Array
    nothing: Any
    empty: tuple


def train_state(seed: int) -> dict[str, Any]:
    """The trainer's state after one real update, so momenta and batch stats are non-trivial."""
    model = Model(rngs=nnx.Rngs(seed))
    x = jax.random.normal(jax.random.key(seed), (4, 6))
    model(x)  # updates the BatchNorm running statistics
    _, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.1, momentum=0.9))
    opt_state = tx.init(params)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5 + seed), params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return {
        "step": jnp.int32(seed),
        "params": params,
        "rest": rest,
        "opt_state": opt_state,
        "rng": jax.random.key_data(jax.random.key(seed)),
        "extra": Extra(jnp.int32(7 * seed), None, ()),
        # Bit patterns a float comparison would blur: -0, NaN, a subnormal; narrow dtypes.
        "odd": jnp.array([-0.0, jnp.nan, jnp.inf, 1e-45, seed], jnp.float32),
        "half": jnp.arange(5, dtype=jnp.bfloat16) * seed,
        "small": jnp.arange(5, dtype=jnp.int8) - seed,
    }


def assert_bitwise_equal(actual: Any, expected: Any) -> None:
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for (path, a), e in zip(
        jax.tree.leaves_with_path(actual), jax.tree.leaves(expected), strict=True
    ):
        where = jax.tree_util.keystr(path)
        assert isinstance(a, jax.Array), where
        assert (a.dtype, a.shape) == (e.dtype, e.shape), where
        assert np.asarray(a).tobytes() == np.asarray(e).tobytes(), where


def step_dir(directory: Path, step: int) -> Path:
    path = directory / str(step)
    assert path.is_dir(), sorted(os.listdir(directory))
    return path


def array_files(step_path: Path) -> list[Path]:
    """The OCDBT data files of a step (b-tree nodes and array chunks)."""
    files = sorted(p for p in (step_path / "state").rglob("*") if p.parent.name == "d")
    assert files, sorted(str(p) for p in step_path.rglob("*"))
    return files


def corrupt(step_path: Path, how: str) -> None:
    if how == "delete-array-data":
        for path in array_files(step_path):
            path.unlink()
    elif how == "truncate-array-data":
        for path in array_files(step_path):
            os.truncate(path, path.stat().st_size // 2)
    elif how == "delete-manifest":
        (step_path / "state" / "manifest.ocdbt").unlink()
    elif how == "delete-tree-metadata":
        (step_path / "state" / "_METADATA").unlink()
    elif how == "truncate-json":
        os.truncate(step_path / "metadata" / "metadata", 3)
    elif how == "empty-step-dir":
        shutil.rmtree(step_path)
        step_path.mkdir()
    else:
        raise ValueError(how)


def save_steps(directory: Path, steps: range, **kwargs: Any) -> None:
    with Checkpointer(directory, **kwargs) as ckpt:
        for step in steps:
            assert ckpt.save(step, train_state(step), metadata={"epoch": step})


@pytest.mark.parametrize("async_save", [True, False], ids=["async", "sync"])
@pytest.mark.parametrize("target_kind", ["concrete", "abstract"])
def test_trainer_state_round_trips_bitwise(tmp_path, async_save, target_kind):
    state = train_state(3)
    metadata = {"epoch": 3, "best_error": None, "config": {"lr": 0.1, "widths": [8, 16]}}
    with Checkpointer(tmp_path, async_save=async_save) as ckpt:
        assert ckpt.save(3, state, metadata=metadata)
        ckpt.wait()
        # The target's values must not leak into the result: initialise it differently.
        target = train_state(1)
        if target_kind == "abstract":
            target = jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), target
            )
        step, restored, restored_metadata = ckpt.restore(target)
    assert step == 3
    assert restored_metadata == metadata
    assert isinstance(restored["params"], nnx.State)
    assert isinstance(restored["extra"], Extra)
    assert restored["extra"].nothing is None and restored["extra"].empty == ()
    assert_bitwise_equal(restored, state)


def test_save_copies_arrays_before_returning(tmp_path):
    """The trainer may donate the state to the next step as soon as ``save`` returns."""
    state = {"w": jnp.arange(2000.0)}
    expected = np.asarray(state["w"]).copy()
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, state)
        state["w"].delete()
        ckpt.wait()
        _, restored, _ = ckpt.restore({"w": jax.ShapeDtypeStruct((2000,), jnp.float32)})
    np.testing.assert_array_equal(restored["w"], expected)


def test_restore_takes_the_target_sharding(tmp_path):
    mesh = Mesh(np.asarray(jax.devices()[:1]), ("data",))
    replicated = NamedSharding(mesh, P())
    state = jax.device_put(train_state(2), replicated)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(2, state)
        _, restored, _ = ckpt.restore(train_state(0) | {"params": state["params"]})
        _, sharded, _ = ckpt.restore(state)
    assert_bitwise_equal(sharded, state)
    for leaf in jax.tree.leaves(sharded):
        assert leaf.sharding == replicated
    # Each leaf follows its own target: params were given on the mesh, the rest not.
    for leaf in jax.tree.leaves(restored["params"]):
        assert leaf.sharding == replicated
    for leaf in jax.tree.leaves(restored["opt_state"]):
        assert not isinstance(leaf.sharding, NamedSharding)


MULTI_DEVICE = """
import sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from mpdnn.training.checkpoint import Checkpointer

assert jax.device_count() == 4, jax.devices()
mesh = Mesh(np.asarray(jax.devices()), ("data",))
replicated, batch = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
state = {
    "w": jax.device_put(jnp.arange(48.0).reshape(12, 4), replicated),
    "x": jax.device_put(jnp.arange(32, dtype=jnp.int32).reshape(8, 4), batch),
}
abstract = lambda tree: jax.tree.map(
    lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), tree)
with Checkpointer(sys.argv[1]) as ckpt:
    assert ckpt.save(5, state, force=True)
    ckpt.wait()
    step, same, _ = ckpt.restore(abstract(state))
    swapped_target = {
        "w": jax.ShapeDtypeStruct((12, 4), jnp.float32, sharding=batch),
        "x": jax.ShapeDtypeStruct((8, 4), jnp.int32, sharding=replicated),
    }
    _, swapped, _ = ckpt.restore(swapped_target)
assert step == 5
for name in state:
    np.testing.assert_array_equal(same[name], state[name])
    np.testing.assert_array_equal(swapped[name], state[name])
    assert same[name].sharding == state[name].sharding, (name, same[name].sharding)
    assert swapped[name].sharding == swapped_target[name].sharding
assert {s.data.shape for s in same["x"].addressable_shards} == {(2, 4)}
assert {s.data.shape for s in same["w"].addressable_shards} == {(12, 4)}
assert {s.data.shape for s in swapped["w"].addressable_shards} == {(3, 4)}
assert len({s.device for s in swapped["w"].addressable_shards}) == 4
print("OK")
"""


def test_restore_onto_a_four_device_mesh(tmp_path):
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(MULTI_DEVICE), str(tmp_path / "ckpt")],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("OK")


@pytest.mark.parametrize(
    "how",
    [
        "delete-array-data",
        "truncate-array-data",
        "delete-manifest",
        "delete-tree-metadata",
        "truncate-json",
        "empty-step-dir",
    ],
)
def test_corrupt_latest_falls_back_to_the_previous_step(tmp_path, how, caplog, capsys):
    save_steps(tmp_path, range(1, 4))
    corrupt(step_dir(tmp_path, 3), how)
    capsys.readouterr()
    with (
        caplog.at_level(logging.WARNING, logger="absl"),
        Checkpointer(tmp_path) as ckpt,
    ):
        assert ckpt.latest_step() == 3
        step, state, metadata = ckpt.restore(train_state(0))
    assert step == 2 and metadata == {"epoch": 2}
    assert_bitwise_equal(state, train_state(2))
    warnings = [r.getMessage() for r in caplog.records if "checkpoint at step" in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].startswith(f"checkpoint at step 3 in {tmp_path} is unreadable (")
    assert warnings[0].endswith("); falling back to step 2")


def test_fallback_walks_back_over_several_corrupt_steps(tmp_path, caplog):
    save_steps(tmp_path, range(1, 5), max_to_keep=4)
    corrupt(step_dir(tmp_path, 4), "delete-array-data")
    corrupt(step_dir(tmp_path, 3), "delete-tree-metadata")
    with caplog.at_level(logging.WARNING), Checkpointer(tmp_path, max_to_keep=4) as ckpt:
        step, state, _ = ckpt.restore(train_state(0))
    assert step == 2
    assert_bitwise_equal(state, train_state(2))
    messages = [r.getMessage() for r in caplog.records if "is unreadable" in r.getMessage()]
    assert [m.split(" is unreadable")[0] for m in messages] == [
        f"checkpoint at step 4 in {tmp_path}",
        f"checkpoint at step 3 in {tmp_path}",
    ]
    assert messages[0].endswith("falling back to step 3")
    assert messages[1].endswith("falling back to step 2")


def test_save_after_a_fallback_replaces_the_unreadable_checkpoints(tmp_path):
    save_steps(tmp_path, range(1, 4))
    corrupt(step_dir(tmp_path, 3), "truncate-array-data")
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.restore(train_state(0))[0] == 2
        # Resumed from step 2, the run reaches step 3 again: its new checkpoint must land.
        assert ckpt.save(3, train_state(30), metadata={"epoch": 30})
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.all_steps() == [1, 2, 3]
        step, state, metadata = ckpt.restore(train_state(0))
    assert (step, metadata) == (3, {"epoch": 30})
    assert_bitwise_equal(state, train_state(30))


def test_all_corrupt_raises_naming_the_directory(tmp_path):
    save_steps(tmp_path, range(1, 3))
    corrupt(step_dir(tmp_path, 1), "delete-array-data")
    corrupt(step_dir(tmp_path, 2), "empty-step-dir")
    with Checkpointer(tmp_path) as ckpt, pytest.raises(CheckpointError) as raised:
        ckpt.restore(train_state(0))
    message = str(raised.value)
    assert message.startswith(f"no readable checkpoint in {tmp_path} (tried steps [2, 1]; step 1:")
    assert "\n" not in message
    # A failed fallback must not mark the checkpoints for deletion by the next save.
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(CheckpointError):
            ckpt.restore(train_state(0))
        assert ckpt.save(5, train_state(5))
        assert ckpt.all_steps() == [1, 2, 5]


def test_no_checkpoints_gives_none(tmp_path):
    directory = tmp_path / "fresh" / "checkpoints"
    with Checkpointer(directory) as ckpt:
        assert ckpt.restore(train_state(0)) is None
        assert ckpt.latest_step() is None and ckpt.all_steps() == []
    assert directory.is_dir()


def test_interrupted_save_is_never_chosen(tmp_path, capsys):
    save_steps(tmp_path, range(1, 3))
    # What a kill during saves 3 and 4 leaves: orbax's temporary directories, one complete
    # but never renamed, one partial.
    shutil.copytree(tmp_path / "2", tmp_path / "3.orbax-checkpoint-tmp")
    shutil.copytree(tmp_path / "2", tmp_path / "4.orbax-checkpoint-tmp-1234")
    shutil.rmtree(tmp_path / "4.orbax-checkpoint-tmp-1234" / "state")
    capsys.readouterr()
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.all_steps() == [1, 2] and ckpt.latest_step() == 2
        step, state, _ = ckpt.restore(train_state(0))
        assert step == 2
        assert_bitwise_equal(state, train_state(2))
        assert "unreadable" not in capsys.readouterr().err
        # The debris does not block saving those steps again.
        assert ckpt.save(3, train_state(3)) and ckpt.save(4, train_state(4))
        ckpt.wait()
        step, state, _ = ckpt.restore(train_state(0))
    assert step == 4
    assert_bitwise_equal(state, train_state(4))


def test_reopened_directory_resumes(tmp_path):
    save_steps(tmp_path, range(1, 3))
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.all_steps() == [1, 2]
        step, state, metadata = ckpt.restore(train_state(0))
        assert (step, metadata) == (2, {"epoch": 2})
        assert ckpt.save(3, train_state(3), metadata={"epoch": 3})
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() == 3
        assert ckpt.restore(train_state(0), step=1)[2] == {"epoch": 1}


def test_max_to_keep_is_honoured(tmp_path):
    with Checkpointer(tmp_path, max_to_keep=2) as ckpt:
        for step in range(1, 6):
            assert ckpt.save(step, {"w": jnp.full((3,), step)})
        ckpt.wait()
        assert ckpt.all_steps() == [4, 5]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["4", "5"]


def test_saving_a_step_twice_is_skipped(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.save(np.int64(2), {"w": jnp.ones(3)})
        assert not ckpt.save(2, {"w": jnp.zeros(3)})
        assert not ckpt.save(2, {"w": jnp.zeros(3)}, force=True)
        assert not ckpt.save(1, {"w": jnp.zeros(3)})  # older than the newest: skipped...
        assert ckpt.save(1, {"w": jnp.full(3, 5.0)}, force=True)  # ...unless forced
        ckpt.wait()
        target = {"w": jax.ShapeDtypeStruct((3,), jnp.float32)}
        np.testing.assert_array_equal(ckpt.restore(target, step=2)[1]["w"], np.ones(3))
        np.testing.assert_array_equal(ckpt.restore(target, step=1)[1]["w"], np.full(3, 5.0))


def test_explicit_step_does_not_fall_back(tmp_path):
    save_steps(tmp_path, range(1, 3))
    corrupt(step_dir(tmp_path, 2), "delete-array-data")
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(CheckpointError, match=r"^checkpoint at step 2 in .* is unreadable"):
            ckpt.restore(train_state(0), step=2)
        with pytest.raises(CheckpointError, match=r"^no checkpoint at step 7 in .*steps: \[1, 2\]"):
            ckpt.restore(train_state(0), step=7)
        assert ckpt.restore(train_state(0), step=1)[0] == 1


def test_metadata_is_stored_as_json(tmp_path):
    metadata = {"epoch": np.int64(3), "error": np.float32(0.25), "sizes": jnp.arange(3), 4: (1,)}
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(CheckpointError, match="not JSON-serializable"):
            ckpt.save(1, {"w": jnp.ones(2)}, metadata={"f": object()})
        assert ckpt.all_steps() == []
        ckpt.save(1, {"w": jnp.ones(2)}, metadata=metadata)
        _, _, restored = ckpt.restore({"w": jnp.zeros(2)})
    assert restored == {"epoch": 3, "error": 0.25, "sizes": [0, 1, 2], "4": [1]}
    assert (tmp_path / "1" / "metadata" / "metadata").is_file()


class _Usage(NamedTuple):
    total: int
    used: int
    free: int


def _allocated(path: Path) -> int:
    """What the files under ``path`` take on disk, as ``du`` counts it."""
    return sum(512 * p.stat().st_blocks for p in path.rglob("*") if p.is_file())


def test_a_save_that_will_not_fit_is_refused_and_the_last_checkpoint_kept(tmp_path, monkeypatch):
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.save(1, train_state(1))
        ckpt.wait()
        taken = _allocated(step_dir(tmp_path, 1))
        monkeypatch.setattr(shutil, "disk_usage", lambda _: _Usage(1 << 40, 0, taken // 2))
        with pytest.raises(CheckpointError) as error:
            ckpt.save(2, train_state(2))
        assert str(error.value).startswith(f"no room for the checkpoint at step 2 in {tmp_path}")
        assert str(error.value).endswith("; the checkpoint at step 1 is kept")
        assert ckpt.all_steps() == [1]
        monkeypatch.setattr(shutil, "disk_usage", lambda _: _Usage(1 << 40, 0, 2 * taken))
        assert ckpt.save(2, train_state(2))
    with Checkpointer(tmp_path) as ckpt:
        step, state, _ = ckpt.restore(train_state(0))
    assert step == 2
    assert_bitwise_equal(state, train_state(2))


def test_a_first_save_needs_more_than_its_arrays(tmp_path, monkeypatch):
    """Before any checkpoint exists the arrays' bytes are the guide; a real checkpoint takes
    more than them, so a disk with exactly that much free is refused."""
    state = train_state(1)
    nbytes = sum(leaf.nbytes for leaf in jax.tree.leaves(state))
    with Checkpointer(tmp_path / "real") as ckpt:
        ckpt.save(1, state)
    assert _allocated(tmp_path / "real") > nbytes
    monkeypatch.setattr(shutil, "disk_usage", lambda _: _Usage(1 << 40, 0, nbytes))
    with Checkpointer(tmp_path / "full") as ckpt:
        with pytest.raises(CheckpointError, match=r"^no room .* MB is free$"):
            ckpt.save(1, state)
        assert ckpt.all_steps() == []


def test_a_long_tensorstore_error_keeps_the_operating_system_reason():
    """tensorstore puts "No space left on device" mid-message and the code at the end; the
    shortened one-line reason still says what the operating system said."""
    from mpdnn.training.checkpoint import _reason

    middle = "Error writing local file: No space left on device " + "x" * 600
    error = ValueError(f"WRITE failed: {'y' * 300} {middle} [os_error_code='28']")
    reason = _reason(error)
    assert reason.startswith("ValueError: WRITE failed") and len(reason) < 300
    assert reason.endswith("[No space left on device]"), reason
    assert _reason(OSError(28, "No space left on device")).count("No space left") == 1
    short = _reason(ValueError("disk trouble [os_error_code='28']"))
    assert short == "ValueError: disk trouble [os_error_code='28']"
