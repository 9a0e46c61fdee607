"""Memory accounting (docs/method.md §5) and the optax budget transforms (docs/method.md §6).

One family per module: ``accounting`` and ``memory`` (the sizes), ``constraints`` (budgets:
penalty, Lagrangian, feasibility), ``stabilisers`` (the authors' clip and projection of θ),
``freeze`` (θ frozen once the budgets are met), ``sgd`` (NNabla and log-space SGD) and
``chain`` (the run's whole update).
"""

from mpdnn.optim._base import OptionError
from mpdnn.optim.accounting import Accounting, QuantizerInfo, Sizes
from mpdnn.optim.chain import budget_chain, check_options
from mpdnn.optim.constraints import (
    DUAL_LEARNING_RATE,
    Budget,
    BudgetState,
    budget_lagrangian,
    budget_penalty,
    budget_values,
    check_feasible,
    feasible,
    within_limits,
)
from mpdnn.optim.freeze import FreezeState, freeze_quantizer_params, freeze_values
from mpdnn.optim.memory import KB, LayerMemory, MemoryReport, memory
from mpdnn.optim.sgd import LogSpaceState, sgd_log_space, sgd_nnabla
from mpdnn.optim.stabilisers import clip_quantizer_gradients, project, project_quantizer_params

__all__ = [
    "DUAL_LEARNING_RATE",
    "KB",
    "Accounting",
    "Budget",
    "BudgetState",
    "FreezeState",
    "LogSpaceState",
    "LayerMemory",
    "MemoryReport",
    "OptionError",
    "QuantizerInfo",
    "Sizes",
    "budget_chain",
    "budget_lagrangian",
    "budget_penalty",
    "budget_values",
    "check_feasible",
    "check_options",
    "clip_quantizer_gradients",
    "feasible",
    "freeze_quantizer_params",
    "freeze_values",
    "memory",
    "project",
    "project_quantizer_params",
    "sgd_log_space",
    "sgd_nnabla",
    "within_limits",
]
