"""A full disk while stage 3 writes a checkpoint: one line naming the file, "no space left" and the fix,
and no partial checkpoint under a checkpoint's name (the write goes to a temp file, renamed when complete)."""
import errno
from pathlib import Path

import pytest
import torch
from finetune.test_stage import make_model, ranks_for

from orca_lora import cli
from orca_lora.config import Stage3Config, TaskConfig, TrainerConfig
from orca_lora.data.tasks import build_task
from orca_lora.files import WriteFailed
from orca_lora.finetune import stage as finetune_stage
from orca_lora.run_files import RunFiles


def test_a_full_disk_during_stage_3_is_one_line_and_leaves_no_partial_checkpoint(tmp_path, monkeypatch, capsys):
    real_save, saved = torch.save, []

    def fill_the_disk(checkpoint, temp, *args, **kwargs):
        """best.ckpt is written; last.ckpt, written next, fills the disk half-way."""
        saved.append(temp)
        if len(saved) == 1:
            return real_save(checkpoint, temp, *args, **kwargs)
        with open(temp, "wb") as stream:
            stream.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", fill_the_disk)
    task = build_task(TaskConfig(name="procedural", n_train=40, n_test=16, n_classes=3, val_fraction=0.2), "unused")
    model = make_model()
    trainer = TrainerConfig(max_epochs=1, limit_train_batches=2, enable_progress_bar=False, log_every_n_steps=1)
    run = RunFiles(tmp_path)
    with pytest.raises(WriteFailed) as raised:
        finetune_stage.run(Stage3Config(rank=2, batch_size=8), trainer, model, ranks_for(model), task, 0, run)
    assert [Path(temp).name.split(".")[1] for temp in saved] == ["best", "last"]
    assert all(temp.endswith(".tmp") for temp in saved)
    # best.ckpt complete, no last.ckpt, and the half-written temp file gone
    assert [path.name for path in run.checkpoints.iterdir()] == ["best.ckpt"]
    assert torch.load(run.checkpoints / "best.ckpt", weights_only=False)["global_step"] == 2
    assert str(raised.value).startswith(f"{run.last_checkpoint}: no space left on device")

    # Lightning's teardown may hit the same full disk while the failure propagates: the line still names the file
    try:
        raise raised.value
    except WriteFailed:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as later:
            teardown = later
    def plot_failing(args):
        raise teardown

    monkeypatch.setitem(cli.COMMANDS, "plot", (*cli.COMMANDS["plot"][:2], plot_failing))
    assert cli.main(["plot", str(tmp_path)]) == 2
    line, = capsys.readouterr().err.splitlines()
    assert line.startswith(f"orca-lora plot: error: {run.last_checkpoint}: no space left on device ([Errno 28] No "
                           "space left on device); free space there or set output.root (data_root for data) to a disk")
    assert line.endswith("then run the same command (finished stages are kept; stage 3 resumes from its last "
                         "checkpoint)")
