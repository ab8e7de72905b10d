"""Two training processes (gloo, CPU), started side by side as torchrun starts them, on a run directory
whose last.ckpt is truncated: each checks the file it would load, rank 0 alone sets it aside, and both
start afresh; on the next attempt both resume from the same verified checkpoint. The processes come from a
forkserver that imported this module once (a spawned pair took 36 s to import on two busy cores); they are
not forked from the test process, whose OpenMP threads, once used, hang a forked child in its first
parallel region (CI lost 240 s to that when another test had run first on the same xdist worker)."""
import json
import math
import multiprocessing
import os
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from finetune.test_ddp import relative_files
from finetune.test_stage import make_model, ranks_for

from orca_lora.config import Stage3Config, TaskConfig, TrainerConfig
from orca_lora.data.tasks import build_task
from orca_lora.finetune import stage
from orca_lora.finetune.checkpoints import Resumable, SameResume
from orca_lora.run_files import RunFiles


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def train_twice(rank: int, port: int, run: RunFiles, out: Path) -> None:
    """One of the two processes: stage 3 for one epoch, then again for two (resuming the first)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", NODE_RANK="0",
                      LOCAL_RANK=str(rank))
    checked, seen = stage.resumable_checkpoint, []

    def check(path, aside):
        """Rank 0 checks after rank 1, so that rank 1 meets the damaged file before rank 0 sets it aside."""
        handshake = run.root / f"rank1-checked-{len(seen)}"
        for _ in range(300 if rank == 0 else 0):
            if handshake.exists():
                break
            time.sleep(0.05)
        found = checked(path, aside)
        seen.append([path.is_file(), None if found is None else [found.step, found.sha256]])
        if rank == 1:
            handshake.touch()
        return found

    stage.resumable_checkpoint = check
    task = build_task(TaskConfig(name="procedural", n_train=40, n_test=16, n_classes=3, val_fraction=0.2), "unused")
    errors = []  # per attempt: the validation error both processes selected on, and the test error
    for epochs in (1, 2):
        model = make_model()
        trainer = TrainerConfig(max_epochs=epochs, limit_train_batches=2, enable_progress_bar=False,
                                accelerator="cpu", devices=2, strategy="ddp")
        result = stage.run(Stage3Config(rank=2, batch_size=8), trainer, model, ranks_for(model), task, 0, run)
        errors.append([result.best_val_error, None if math.isnan(result.test_error) else result.test_error])
    out.write_text(json.dumps({"seen": seen, "errors": errors}))


def test_both_processes_start_afresh_from_a_truncated_checkpoint_then_resume_from_the_same_one(tmp_path):
    run = RunFiles(tmp_path / "run")
    run.checkpoints.mkdir(parents=True)
    run.last_checkpoint.write_bytes(b"PK\x03\x04 a checkpoint cut short")
    context, port = multiprocessing.get_context("forkserver"), free_port()
    context.set_forkserver_preload([__name__])
    processes = [context.Process(target=train_twice, args=(rank, port, run, tmp_path / f"rank{rank}.json"))
                 for rank in (0, 1)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
    exit_codes = [process.exitcode for process in processes]
    for process in processes:
        process.kill()  # a hung pair must not outlive the test
    assert exit_codes == [0, 0]
    zero, one = (json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1))
    # first attempt: rank 1 met the damaged file and did not load it; rank 0 set it aside; both started afresh
    assert one["seen"][0] == [True, None] and zero["seen"][0] == [False, None]
    assert len(list(run.stage("stage3").glob("last.ckpt.corrupt-*"))) == 1
    # second attempt: both resumed from the one checkpoint rank 0 checked (same step, same content hash)
    assert zero["seen"][1] == one["seen"][1] and zero["seen"][1][1][0] == 2
    # the same model selected on the same validation error; rank 0 alone scores the test split
    assert [v for v, _ in zero["errors"]] == [v for v, _ in one["errors"]]
    assert all(t is not None for _, t in zero["errors"]) and all(t is None for _, t in one["errors"])
    assert not [name for name in relative_files(run.root) if name.endswith(".tmp")]


def test_a_process_that_sees_another_checkpoint_stops_every_process_before_training(tmp_path):
    """SameResume on rank 1, whose own check found no usable file where rank 0 found step 4: every
    process's decision is reduced, and the one that disagrees names the file and the fix."""
    rank_zero = Resumable(4, "ab" * 32)
    strategy = SimpleNamespace(broadcast=lambda choice, src: rank_zero,
                               reduce_boolean_decision=lambda agree, all: agree)
    trainer = SimpleNamespace(world_size=2, global_rank=1, strategy=strategy)
    with pytest.raises(ValueError, match=r"the 2 training processes do not see the same .*last.ckpt \(rank 0 resumes "
                                         r"from step 4 \(sha256 abababababab\), rank 1 starts afresh\); put "
                                         r"output.root on a file system that every node shares"):
        SameResume(tmp_path / "last.ckpt", None).setup(trainer, None, "fit")
    SameResume(tmp_path / "last.ckpt", rank_zero).setup(trainer, None, "fit")  # the same file: goes on
