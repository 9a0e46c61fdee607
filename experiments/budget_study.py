r"""The budget study's runs (mpdnn.configs.budget_study): ``:<arm>[,seed=<s>][,smoke]``.

Learned mixed precision (the authors' recipe and ours) against fixed 2-bit, TQT 2-bit and a
hand-made mixed precision at equal memory, on CIFAR-10 (the JPEG copy) with a small CNN,
three seeds, every error on the full test set. ``scripts/budget_study.py`` runs every arm
(the float net of a seed first) and writes ``results/budget_study.{json,md}``: the expected
results and the measured wall time are there (2-core CPU).

    python scripts/budget_study.py                 # the whole study, about an hour on 2 cores
    python -m mpdnn.train --config experiments/budget_study.py:float,seed=0 \
        --workdir runs/budget_study/seed0/float
    python -m mpdnn.train --config experiments/budget_study.py:mpdnn_w,seed=0 \
        --workdir runs/budget_study/seed0/mpdnn_w   # starts from ../float
"""

from mpdnn.configs.budget_study import arm_config, parse


def get_config(arg=None):
    arm, seed, smoke = parse(arg)
    return arm_config(arm, seed, smoke=smoke)
