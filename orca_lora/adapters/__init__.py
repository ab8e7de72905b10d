"""Adapter layers, the stage-3 method specs and how they go into a model.

Importing the package imports every module in it, so each method module (one per method: lora.py,
lora_plus.py, delta.py, dylora.py, dora.py, qlora.py, mora.py, sbora.py, bottleneck.py, ibp_lora.py,
full.py, linear.py) registers its spec in `spec.METHODS`; a
new method is one new module here (and its name in orca_lora/choices.py, the torch-free table config
validation reads).
"""
import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
