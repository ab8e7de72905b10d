import subprocess
import sys

import pytest

from orca_lora import choices
from orca_lora.align.distances import DISTANCES
from orca_lora.data.tasks import TASK_BUILDERS
from orca_lora.models.embedder import EMBEDDER_INITS
from orca_lora.rank.select import DECISIONS, LINKS


@pytest.mark.parametrize("what, registry, names", [
    ("task", TASK_BUILDERS, choices.TASKS),
    ("distance", DISTANCES, choices.DISTANCES),
    ("embedder init", EMBEDDER_INITS, choices.EMBEDDER_INITS),
    ("rank link", LINKS, choices.RANK_LINKS),
    ("rank decision", DECISIONS, choices.RANK_DECISIONS),
])
def test_every_registry_holds_exactly_the_names_the_config_accepts(what, registry, names):
    choices.check_registry(what, registry, names)


def test_align_distances_are_the_differentiable_registered_ones():
    assert set(choices.ALIGN_DISTANCES) == {name for name, entry in DISTANCES.items() if entry.differentiable}


def test_check_registry_names_both_sides_of_a_drift():
    with pytest.raises(RuntimeError, match=r"registered but not listed \['new'\], listed but not registered \['old'\]"):
        choices.check_registry("thing", {"kept": 1, "new": 2}, ("kept", "old"))


def test_the_config_validates_names_without_importing_torch(tmp_path):
    code = ("import sys; from orca_lora.config_load import load_config, ConfigError\n"
            "try:\n    load_config(None, ['task.name=nope'])\nexcept ConfigError as error:\n    print(error)\n"
            "assert 'torch' not in sys.modules, 'config pulled in torch'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "task.name: 'nope' is not one of darcy" in done.stdout


def test_every_allocation_is_registered_in_its_phase():
    from orca_lora.rank.allocations import check_allocations
    check_allocations()
