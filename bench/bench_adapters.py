"""Adapter speed and memory, side by side in one process, on two timm Swins.

For each model (`tiny`: the 32x32 test Swin at batch 64; `swin_tiny`: swin_tiny_patch4_window7_224 at
224x224, batch 8, random weights), one training step (forward + backward + AdamW step) of our LoRA,
PEFT's LoRA and full fine-tuning with the same ranks and batch, and the forward time (eval, no grad)
of our LoRA model merged and unmerged against the base model. Contenders take turns, one call each per
round, so drifting machine load hits them alike; each figure is the median over the timed rounds.

Memory of a training step: on CUDA, torch.cuda.max_memory_allocated over one step. On the CPU there
is no allocator peak counter, so the figure is the bytes the step must hold at its peak, counted
exactly: tensors saved for backward (saved_tensors_hooks, each storage once, the model's own
parameters and buffers left out since all contenders hold the same ones) + gradients + AdamW state.

    python bench/bench_adapters.py [--models tiny swin_tiny] [--rank 8] [--rounds N] [--device cpu] [--threads 1]

Targets (issue 8): our LoRA step <= 0.9x PEFT's on both models with no more memory; merged forward
within 2% of the base. Prints one table per model and writes bench/results/adapters.json.
"""

import argparse
import copy
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import peft
import timm
import torch
import torch.nn.functional as F
from torch import nn

from orca_lora.adapters.inject import add_adapters, mark_only_adapters_trainable, merge_adapters
from orca_lora.config import DEFAULT_TARGETS
from orca_lora.files import strict_json_text, write_text_atomic

RESULTS = Path(__file__).parent / "results" / "adapters.json"
PEFT_TARGETS = r".*\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)"
NUM_CLASSES = 10
WARMUP_ROUNDS = 2


@dataclass(frozen=True)
class BenchModel:
    """A Swin to benchmark, the batch it is run at and its number of timed rounds."""

    timm_options: dict
    image_size: int
    batch: int
    rounds: int

    def build(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return timm.create_model(
            "swin_tiny_patch4_window7_224", pretrained=False, num_classes=NUM_CLASSES, **self.timm_options
        )


BENCH_MODELS = {
    "tiny": BenchModel(
        dict(img_size=32, patch_size=2, window_size=4, embed_dim=32, depths=(2, 2), num_heads=(2, 4)),
        image_size=32, batch=64, rounds=30,
    ),
    "swin_tiny": BenchModel({}, image_size=224, batch=8, rounds=10),
}


@dataclass(frozen=True)
class StepMemory:
    """Bytes one training step holds at its peak (CPU measure; see the module docstring)."""

    saved_for_backward: int
    gradients: int
    optimizer_state: int

    @property
    def total(self) -> int:
        return self.saved_for_backward + self.gradients + self.optimizer_state


def training_models(spec: BenchModel, rank: int) -> dict[str, nn.Module]:
    base = spec.build(0)
    ours = copy.deepcopy(base)
    add_adapters(ours, DEFAULT_TARGETS, ranks=rank, alpha=2.0 * rank)
    mark_only_adapters_trainable(ours)
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=PEFT_TARGETS)
    )
    return {"ours": ours, "peft": theirs, "full": base}


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)


def step_timer(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> Callable[[], None]:
    model.train()
    optimizer = make_optimizer(model)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()

    return step


def forward_timer(model: nn.Module, images: torch.Tensor) -> Callable[[], None]:
    model.eval()

    def forward() -> None:
        with torch.inference_mode():
            model(images)

    return forward


def step_memory(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> StepMemory:
    """Saved-for-backward bytes (each storage once, parameters and buffers excluded) + grads + AdamW state."""
    model = copy.deepcopy(model).train()
    optimizer = make_optimizer(model)
    persistent = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in persistent:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = F.cross_entropy(model(images), labels)
    loss.backward()
    optimizer.step()
    state = optimizer.state.values()
    return StepMemory(
        saved_for_backward=sum(saved.values()),
        gradients=sum(p.grad.nbytes for p in model.parameters() if p.grad is not None),
        optimizer_state=sum(t.nbytes for s in state for t in s.values() if torch.is_tensor(t) and t.dim() > 0),
    )


def cuda_peak_memory(step: Callable[[], None]) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def time_interleaved(runs: dict[str, Callable[[], None]], rounds: int, device: torch.device) -> dict[str, float]:
    """Median seconds per call of each run over `rounds` rounds of one call each, after two warm-up rounds."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for round_index in range(rounds + WARMUP_ROUNDS):
        for name, run in runs.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            run()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if round_index >= WARMUP_ROUNDS:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def measure_memory(
    models: dict[str, nn.Module], steps: dict[str, Callable[[], None]], images: torch.Tensor, labels: torch.Tensor
) -> dict[str, dict[str, int]]:
    """Bytes per contender, with the figure compared under "total" (CUDA peak, or the CPU count)."""
    if images.device.type == "cuda":
        return {name: {"total": cuda_peak_memory(step)} for name, step in steps.items()}
    footprints = {name: step_memory(model, images, labels) for name, model in models.items()}
    return {name: asdict(footprint) | {"total": footprint.total} for name, footprint in footprints.items()}


def bench_model(spec: BenchModel, rank: int, rounds: int, device: torch.device) -> dict:
    """Step times, step memory and forward times of one model, with their ratios."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(spec.batch, 3, spec.image_size, spec.image_size, generator=generator).to(device)
    labels = torch.randint(0, NUM_CLASSES, (spec.batch,), generator=generator).to(device)
    models = {name: model.to(device) for name, model in training_models(spec, rank).items()}
    steps = {name: step_timer(model, images, labels) for name, model in models.items()}
    memory = measure_memory(models, steps, images, labels)
    train = time_interleaved(steps, rounds, device)
    merged, base = copy.deepcopy(models["ours"]), spec.build(0).to(device)
    merge_adapters(merged)
    forwards = {"merged": merged, "base": base, "unmerged": models["ours"]}
    infer = time_interleaved(
        {name: forward_timer(model, images) for name, model in forwards.items()}, rounds, device
    )
    ratios = {
        "ours_step / full_step": train["ours"] / train["full"],
        "peft_step / full_step": train["peft"] / train["full"],
        "ours_step / peft_step": train["ours"] / train["peft"],
        "ours_memory / peft_memory": memory["ours"]["total"] / memory["peft"]["total"],
        "merged_forward / base_forward": infer["merged"] / infer["base"],
        "unmerged_forward / base_forward": infer["unmerged"] / infer["base"],
    }
    setting = {"batch": spec.batch, "image_size": spec.image_size, "rounds": rounds}
    return {"setting": setting, "train_step_s": train, "forward_s": infer, "step_memory_bytes": memory,
            "ratios": ratios}


def print_table(name: str, result: dict) -> None:
    train, infer, memory = result["train_step_s"], result["forward_s"], result["step_memory_bytes"]
    print(f"\n{name}  {json.dumps(result['setting'])}")
    print(f"{'':<16}" + "".join(f"{name:>10}" for name in (*train, *infer)))
    print(f"{'median seconds':<16}" + "".join(f"{value:>10.4f}" for value in (*train.values(), *infer.values())))
    print(f"{'step memory MiB':<16}" + "".join(f"{memory[name]['total'] / 2**20:>10.1f}" for name in train))
    for ratio, value in result["ratios"].items():
        print(f"{ratio:<32}{value:>10.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(BENCH_MODELS), default=list(BENCH_MODELS))
    parser.add_argument("--rank", type=int, default=8)
    default_rounds = ", ".join(f"{name} {spec.rounds}" for name, spec in BENCH_MODELS.items())
    parser.add_argument("--rounds", type=int, help=f"timed rounds per model (default: {default_rounds})")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads; 1 keeps timings steady on a shared machine")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.rounds is not None and args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    versions = {"torch": torch.__version__, "timm": timm.__version__, "peft": peft.__version__,
                "python": platform.python_version()}
    setting = {"rank": args.rank, "device": str(device), "threads": torch.get_num_threads(),
               "targets": list(DEFAULT_TARGETS)}
    print(" ".join(f"{k} {v}" for k, v in versions.items()), "|", json.dumps(setting))
    results = {}
    for name in args.models:
        spec = BENCH_MODELS[name]
        results[name] = bench_model(spec, args.rank, args.rounds or spec.rounds, device)
        print_table(name, results[name])
    record = {"versions": versions, "setting": setting, "models": results}
    write_text_atomic(args.output, strict_json_text(record))


if __name__ == "__main__":
    main()
