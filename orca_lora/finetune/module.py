"""Stage 3's LightningModule: the composed model, the task's loss and error, AdamW with warm-up
and a cosine / step / constant schedule, and the method spec's hooks (its optimizer groups, hooks
on the optimizer, a call before each training step, a regularizer added to the training loss over
the training set's size and logged as `train_kl`, and a penalty added as it is and logged as
`train_penalty`). Stage 3 itself finalizes and scores the best checkpoint (`stage.run`).

Checkpoints hold only what training changes (trainable parameters, the tensors each adapter layer
saves, buffers outside the frozen body), so a Swin-base checkpoint is megabytes, not 350 MB, plus the
random streams training draws from (torch's global generator for dropout, DyLoRA's rank draws), which
Lightning does not restore, so a resumed run continues the numbers of the run it resumes.
"""
from __future__ import annotations

import math

import lightning as L
import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric

from orca_lora.adapters.inject import adapter_modules
from orca_lora.adapters.spec import MethodSpec, StepHook, get_method
from orca_lora.config import Stage3Config
from orca_lora.data.tasks import TaskData
from orca_lora.errors import TrainingDiverged

RANDOM_STATES = "orca_lora_random_states"  # the checkpoint key of the generators' states


def schedule_factor(step: int, total_steps: int, warmup_steps: int, schedule: str,
                    steps_per_epoch: int, step_size: int, gamma: float) -> float:
    """Learning-rate multiplier: linear warm-up, then cosine to 0, step decay, or constant."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "cosine":
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    if schedule == "step":
        return gamma ** (step // max(1, steps_per_epoch * step_size))
    return 1.0


class FinetuneModule(L.LightningModule):
    def __init__(self, model: nn.Module, task: TaskData, stage: Stage3Config, total_steps: int,
                 steps_per_epoch: int, seed: int, method: MethodSpec | None = None):
        """`method`: the spec whose hooks run (a stage-3 allocation's, e.g. adalora's); None: stage3.method's."""
        super().__init__()
        self.model = model
        self.output_transform = task.output_transform
        self.loss_fn, self.error_fn = task.loss, task.error
        self.stage, self.method = stage, method or get_method(stage.method)
        self.step_hook: StepHook | None = None
        self.n_train = len(task.train)  # the ELBO's KL is per training sample, as the task loss is a mean
        self.total_steps, self.steps_per_epoch = total_steps, steps_per_epoch
        self.rank_generator = torch.Generator().manual_seed(seed)
        self.strict_loading = False  # checkpoints leave out the frozen body
        # a per-sample mean whose (sum, count) states are summed across processes: exact with uneven
        # shards, where self.log's synced mean truncates the integer sample count
        self.val_error = MeanMetric()

    def forward(self, inputs: Tensor) -> Tensor:
        return self.output_transform(self.model(inputs))

    def training_step(self, batch, batch_index):
        inputs, targets = batch
        self.method.on_train_batch_start(self.model, self.rank_generator)
        loss = self.loss_fn(self(inputs), targets).mean()
        objective = loss
        regularizer = self.method.regularizer(self.model)
        if regularizer is not None:
            objective = loss + regularizer / self.n_train
        penalty = self.method.penalty(self.model)
        if penalty is not None:
            objective = objective + penalty
        if not torch.isfinite(objective):
            raise TrainingDiverged(f"stage 3 diverged: the training loss is {objective.item()} at step "
                                   f"{self.trainer.global_step} (epoch {self.current_epoch}); lower stage3.lr "
                                   "or keep stage3.grad_clip on, then run again")
        self.log("train_loss", loss, prog_bar=True, batch_size=len(inputs))  # the task's, as for every method
        if regularizer is not None:
            self.log("train_kl", regularizer, batch_size=len(inputs))
        if penalty is not None:
            self.log("train_penalty", penalty, batch_size=len(inputs))
        return objective

    def validation_step(self, batch, batch_index):
        inputs, targets = batch
        self.val_error.update(self.error_fn(self(inputs), targets))
        self.log("val_error", self.val_error, prog_bar=True)

    def on_train_start(self) -> None:
        if self.step_hook is not None:
            # a resumed run restores global_step after configure_optimizers attached the hooks
            self.step_hook.step = self.trainer.global_step

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.method.param_groups(self, self.stage))
        self.step_hook = self.method.attach(optimizer, self.model, self.stage)
        stage = self.stage
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule_factor(
            step, self.total_steps, stage.warmup_steps, stage.schedule, self.steps_per_epoch,
            stage.step_size, stage.gamma))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def saved_keys(self) -> set[str]:
        """State-dict keys training can change: trainable parameters, what each adapter layer saves
        (Delta-LoRA's moved base weights too), and every buffer outside the frozen body (normalisers)."""
        keys = {name for name, p in self.named_parameters() if p.requires_grad}
        keys |= {name for name, _ in self.named_buffers() if not name.startswith("model.body.")}
        keys |= {f"model.{name}.{tensor}" for name, layer in adapter_modules(self.model).items()
                 for tensor in layer.saved_tensor_names}
        return keys

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep = self.saved_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint[RANDOM_STATES] = {"torch": torch.get_rng_state(), "rank": self.rank_generator.get_state()}
        if torch.cuda.is_available():
            checkpoint[RANDOM_STATES]["cuda"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        states = checkpoint.get(RANDOM_STATES)
        if states is None:  # written before the states were saved: resumes, but not bit for bit
            return
        torch.set_rng_state(states["torch"])
        self.rank_generator.set_state(states["rank"])
        if "cuda" in states and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(states["cuda"])
