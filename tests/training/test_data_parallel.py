"""One device vs 8 (fake CPU) devices: the same training, step for step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax
    assert jax.device_count() == 8, jax.devices()
    sys.path.insert(0, {repo!r})
    from tests.training.test_trainer import tiny_config
    from mpdnn.training.trainer import train_and_evaluate

    out = {{}}
    for n in (1, 8):
        config = tiny_config(num_devices=n, steps_per_call=1, max_steps=3, epochs=1)
        config.data.synthetic_train = 128
        config.train.batch_size = 32
        workdir = {tmp!r} + f"/run{{n}}"
        train_and_evaluate(config, workdir)
        lines = [json.loads(s) for s in open(workdir + "/metrics.jsonl")]
        out[n] = [r["loss"] for r in lines if r["type"] == "train"]
    print("LOSSES", json.dumps(out))
    """
)


def test_one_device_and_eight_devices_give_the_same_losses(tmp_path):
    env = dict(os.environ)
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    env["JAX_PLATFORMS"] = "cpu"
    script = SCRIPT.format(repo=str(REPO), tmp=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(s for s in proc.stdout.splitlines() if s.startswith("LOSSES"))
    losses = json.loads(line.split(" ", 1)[1])
    one, eight = losses["1"], losses["8"]
    assert len(one) == len(eight) == 3
    for a, b in zip(one, eight, strict=True):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (one, eight)
    # The losses move: three real steps, not a constant.
    assert len(set(one)) == 3
