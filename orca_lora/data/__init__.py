"""Data families, one module each, and the task registry (`tasks.py`). The generated family
(`task_builders.py`) and the known-answer controls (`planted_tasks.py`) register themselves on import,
so they are imported here, with the package, rather than from the registry's own module."""
from orca_lora.data import planted_tasks, task_builders  # noqa: F401
