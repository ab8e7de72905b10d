"""Adapter layers and how they go into a model.

Importing the package registers every Linear-wrapping variant in `lora.ADAPTER_VARIANTS` (LoRA,
LoRA+, Delta-LoRA, DyLoRA, DoRA, QLoRA, MoRA, SBoRA-FA/FB); Houlsby bottlenecks wrap whole
attention and MLP modules (`bottleneck.py`).
"""
from orca_lora.adapters import lora, mora, qlora, sbora  # importing them registers the variants

__all__ = ["lora", "mora", "qlora", "sbora"]
