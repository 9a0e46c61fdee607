"""Host-streamed input (mpdnn.training.streaming): the ImageNet path, tested on synthetic RGB."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from mpdnn import data as mdata
from mpdnn.training import config as cfg
from mpdnn.training.checkpoint import Checkpointer
from mpdnn.training.streaming import streaming_data
from mpdnn.training.trainer import train_and_evaluate


def streamed_config(**train):
    c = cfg.base_config()
    c.name = "streamed"
    c.model.name = "small_cnn"
    c.model.widths = (8, 8, 8)
    c.data.name = "synthetic"
    c.data.synthetic_shape = (32, 32, 3)
    c.data.synthetic_train = 64  # 4 steps of 16 per epoch
    c.data.synthetic_test = 40  # 3 evaluation batches of 16, the last one short
    c.data.stream = True
    c.data.image_size = 24  # the random-resized crop (train) and center crop (eval)
    c.data.eval_resize = 28
    c.data.workers = 2
    c.quant.weights.mode = "learned"
    c.quant.weights.bits = 4
    c.train.batch_size = 16
    c.train.eval_batch_size = 16
    c.train.epochs = 2
    c.train.steps_per_call = 3  # calls of 3, 1 (to the epoch end), 3, 1 steps
    c.train.progress = False
    c.optim.decay_epochs = ()
    c.train.update(train)
    return c


def final_params(workdir):
    with Checkpointer(workdir / "final", max_to_keep=1, async_save=False) as ckpt:
        return ckpt.restore(None)[1]["params"]


@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
def test_streamed_run_trains_and_evaluates_every_test_image(tmp_path, scan):
    result = train_and_evaluate(streamed_config(scan=scan), tmp_path)
    assert result.status == "completed" and result.step == 8
    wrong = result.final_test_error * 40  # errors over all 40 test images, none dropped
    assert abs(wrong - round(wrong)) < 1e-9 and 0 <= wrong <= 40


def test_resumed_mid_epoch_equals_uninterrupted(tmp_path):
    """The epoch's order and each example's crop depend on (seed, epoch, index) only, so a
    run stopped mid-epoch and resumed sees the same batches as one that never stopped."""
    whole = tmp_path / "whole"
    train_and_evaluate(streamed_config(), whole)
    parts = tmp_path / "parts"
    first = train_and_evaluate(streamed_config(), parts, should_stop=lambda step: step >= 5)
    assert first.status == "stopped" and first.step == 7  # calls end at 3, 4, 7, 8
    second = train_and_evaluate(streamed_config(), parts)
    assert second.status == "completed" and second.step == 8
    a, b = final_params(whole), final_params(parts)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=1e-6)


def test_imagenet_without_data_is_one_line(tmp_path):
    c = streamed_config()
    c.data.name = "imagenet"
    c.data.dir = str(tmp_path / "no_tfds_here")
    with pytest.raises(Exception, match="imagenet2012") as info:
        train_and_evaluate(c, tmp_path / "run")
    assert "\n" not in str(info.value)


def test_data_worker_processes_reach_the_batcher():
    c = streamed_config()
    c.data.worker_processes = 2
    loaded = mdata.load_dataset("synthetic", image_shape=(32, 32, 3), num_train=16, num_test=8)
    batches = streaming_data(c, loaded).batches(train=True, batch=8, epoch=0, seed=0)
    assert (batches.worker_processes, batches.num_workers) == (2, 2)
    images, labels = next(iter(batches))
    assert images.shape == (8, 24, 24, 3) and labels.shape == (8,)
