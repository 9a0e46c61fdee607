"""Memory accounting (SPEC §5) and the optax budget transforms (SPEC §6)."""

from mpdnn.optim.accounting import Accounting, QuantizerInfo, Sizes
from mpdnn.optim.budget import (
    DUAL_LEARNING_RATE,
    Budget,
    BudgetState,
    budget_chain,
    budget_lagrangian,
    budget_penalty,
    budget_values,
    check_feasible,
    clip_quantizer_gradients,
    project,
    project_quantizer_params,
    sgd_nnabla,
)
from mpdnn.optim.memory import KB, LayerMemory, MemoryReport, memory

__all__ = [
    "DUAL_LEARNING_RATE",
    "KB",
    "Accounting",
    "Budget",
    "BudgetState",
    "LayerMemory",
    "MemoryReport",
    "QuantizerInfo",
    "Sizes",
    "budget_chain",
    "budget_lagrangian",
    "budget_penalty",
    "budget_values",
    "check_feasible",
    "clip_quantizer_gradients",
    "memory",
    "project",
    "project_quantizer_params",
    "sgd_nnabla",
]
