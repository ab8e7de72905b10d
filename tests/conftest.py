"""Shared fixtures: a tiny but complete pipeline setting that runs in seconds.

`make test` runs the suite on pytest-xdist workers (`-n auto --dist worksteal`), where session and
module fixtures are built once per worker that uses them. Under worksteal, `pytest_collection_modifyitems`
puts the tests of each expensive shared run in `SHARED_RUNS` side by side at the front, so that one
worker takes them all and builds the run once (worksteal gives the first worker the front of the list
and takes tests to move only from the back of a worker's queue); the other integration tests follow.
Otherwise (plain `pytest`, `-p no:xdist`, other --dist modes) the order is the files' own."""
import logging
import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from orca_lora.models.body import build_body

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))  # shared test helpers: `from toys import ...`
if os.environ.get("PYTEST_XDIST_WORKER"):
    # One torch thread per xdist worker and per process it starts: the workers already fill the cores, and
    # OpenMP threads beyond them spin against each other (on 2 cores the suite took 352 s of wall time and
    # 626 s of CPU time with torch's default of two threads per worker, 180 s and 305 s with one).
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
TINY_KWARGS = {"img_size": 32, "patch_size": 2, "window_size": 4, "embed_dim": 16, "depths": (2, 2),
               "num_heads": (2, 4)}

TINY = [
    "task.resolution=16", "task.n_train=96", "task.n_test=32",
    "source.proxy_samples=128", "source.pretrain.n_classes=4", "source.pretrain.samples_per_class=48",
    "source.pretrain.epochs=1", "source.pretrain.embed_dim=24", "source.pretrain.depths=[2,2]",
    "source.pretrain.num_heads=[2,4]",
    "stage1.epochs=2", "stage1.max_samples=64", "stage2.max_samples=64",
    "stage3.batch_size=16", "trainer.max_epochs=2", "trainer.enable_progress_bar=false",
]


# fixtures (by name) whose runs take tens of seconds, shared by several tests (a test's fixture names
# include those its fixtures use: rehearsed_sweep's tests go with stopped_sweep's)
SHARED_RUNS = ("tiny_sweep", "stopped_sweep", "uninterrupted", "tiny_runs")


def run_order(item: pytest.Item) -> tuple[int, bool]:
    """The users of each shared run together, in SHARED_RUNS' order, then integration tests, then the rest."""
    names = getattr(item, "fixturenames", ())
    shared = next((i for i, name in enumerate(SHARED_RUNS) if name in names), len(SHARED_RUNS))
    return shared, item.get_closest_marker("slow") is None


@pytest.hookimpl(optionalhook=True)  # an xdist hook, run where the workers are started
def pytest_configure_node(node):
    node.workerinput["orca_lora_run_order"] = node.config.getoption("dist") == "worksteal"


def pytest_collection_modifyitems(config, items):
    if getattr(config, "workerinput", {}).get("orca_lora_run_order"):
        # only under worksteal, which moves tests between workers: `load` sends each worker a block of
        # the list at first, and one worker would get every long test. A stable sort, the same on every
        # worker (xdist checks that they collected the same list); the long tests start early, so the
        # workers end together instead of one running the last long test alone.
        items.sort(key=run_order)


@pytest.fixture(autouse=True)
def restore_orca_lora_logger():
    """`cli.main()` gives the `orca_lora` logger a handler on the stderr of the moment (capsys's, in a
    test); left in place, it would write to a closed stream in later tests."""
    logger = logging.getLogger("orca_lora")
    state = list(logger.handlers), logger.level, logger.propagate
    yield
    logger.handlers[:], logger.level, logger.propagate = state


@pytest.fixture(scope="session")
def shared_data_root(tmp_path_factory) -> Path:
    """One data root per test session (per xdist worker), so the tiny offline body is pretrained once. The
    body and the tiny Darcy set are built here, before any test reads them: every test finds them built,
    whichever test runs first (a test checking that an error is one line of stderr would otherwise also
    read the progress of building them)."""
    from orca_lora.config_load import load_config
    from orca_lora.data.tasks import build_task
    from orca_lora.models.source import load_source_body

    root = tmp_path_factory.mktemp("data")
    config = load_config(REPO / "configs" / "quickstart.yaml", TINY + [f"data_root={root}"])
    load_source_body(config.source, config.data_root)
    build_task(config.task, config.data_root)
    return root


@pytest.fixture(scope="session")
def tiny_settings(shared_data_root) -> list[str]:
    """TINY on the shared data root, for session-scoped fixtures (which cannot use tmp_path)."""
    return TINY + [f"data_root={shared_data_root}"]


@pytest.fixture
def tiny_overrides(shared_data_root, tmp_path) -> list[str]:
    return TINY + [f"data_root={shared_data_root}", f"output.root={tmp_path / 'runs'}", "output.name=tiny"]


@pytest.fixture(scope="module")
def body() -> nn.Module:
    """A tiny frozen timm Swin (blocks of 16 and 32 channels) for stage-level tests."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return build_body("swin_tiny_patch4_window7_224", model_kwargs=TINY_KWARGS).eval().requires_grad_(False)


TINY_SWEEP = """\
name: tiny
base: {base}
grids:
  - task: &tasks
      darcy: {{task.name: darcy}}
      near: {{task.name: procedural, task.n_classes: 4, task.class_offset: 100}}
    stage3.rank: [1, 2]
    ranks: {{uniform: {{stage2.allocation: uniform}}}}
  - task: {{darcy: {{task.name: darcy}}}}
    stage3.rank: [2]
    ranks: {{gap-aware: {{stage2.allocation: gap-relative, stage2.match_uniform_budget: true}}}}
"""


def write_tiny_sweep(directory: Path) -> Path:
    path = directory / "tiny_sweep.yaml"
    path.write_text(TINY_SWEEP.format(base=REPO / "configs" / "quickstart.yaml"))
    return path


@pytest.fixture
def tiny_sweep_file(tmp_path) -> Path:
    """The tiny sweep's file (outputs go where `output.root` says)."""
    return write_tiny_sweep(tmp_path)


@pytest.fixture(scope="session")
def tiny_sweep(tiny_settings, tmp_path_factory) -> Path:
    """The finished sweep directory (5 points: 2 tasks x ranks 1, 2, plus gap-aware ranks for darcy), run by
    `orca-lora sweep` in this process: as a subprocess with two workers it imported the training stack three
    times (about 9 s each here); the launches in tests/sweeps cover the workers."""
    from orca_lora import cli

    root = tmp_path_factory.mktemp("sweep")
    sets = [part for item in tiny_settings + [f"output.root={root / 'runs'}"] for part in ("--set", item)]
    logger = logging.getLogger("orca_lora")
    state = list(logger.handlers), logger.level, logger.propagate
    try:
        code = cli.main(["sweep", str(write_tiny_sweep(root)), *sets])
    finally:
        logger.handlers[:], logger.level, logger.propagate = state
    assert code == 0
    return root / "runs" / "tiny"
