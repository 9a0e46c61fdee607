"""Memory accounting (SPEC §5) and, later, the optax budget transforms (SPEC §6)."""

from mpdnn.optim.memory import KB, LayerMemory, MemoryReport, memory

__all__ = ["KB", "LayerMemory", "MemoryReport", "memory"]
