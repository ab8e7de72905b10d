"""Adapter speed, side by side in one process on the tiny 32x32 Swin.

Training step (forward + backward + AdamW step) for our LoRA, PEFT's LoRA and full fine-tuning, and
forward time of a merged model against the base model. Variants are timed in interleaved rounds so
drifting machine load hits them alike; each figure is the median over all timed steps.

    python bench/bench_adapters.py [--batch 64] [--rank 8] [--steps 5] [--rounds 6] [--device cpu] [--threads 1]

Prints one table of ratios with the library versions and writes bench/results/adapters.json.
"""

import argparse
import copy
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import peft
import timm
import torch
import torch.nn.functional as F
from torch import nn

from orca_lora.adapters.inject import DEFAULT_TARGETS, add_adapters, mark_only_adapters_trainable, merge_adapters

RESULTS = Path(__file__).parent / "results" / "adapters.json"
PEFT_TARGETS = r".*\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)"


def tiny_swin(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(
        "swin_tiny_patch4_window7_224", pretrained=False, img_size=32, patch_size=2, window_size=4,
        embed_dim=32, depths=(2, 2), num_heads=(2, 4), num_classes=10,
    )


def training_models(rank: int) -> dict[str, nn.Module]:
    base = tiny_swin(0)
    ours = copy.deepcopy(base)
    add_adapters(ours, DEFAULT_TARGETS, ranks=rank, alpha=2.0 * rank)
    mark_only_adapters_trainable(ours)
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=PEFT_TARGETS)
    )
    return {"ours": ours, "peft": theirs, "full": base}


def step_timer(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> Callable[[], None]:
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

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


def time_interleaved(
    runs: dict[str, Callable[[], None]], steps: int, rounds: int, device: torch.device
) -> dict[str, float]:
    """Median seconds per call of each run, after one warm-up round."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for round_index in range(rounds + 1):
        for name, run in runs.items():
            for _ in range(steps):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                run()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if round_index > 0:
                    times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="timed calls per variant per round")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads; 1 keeps timings steady on a shared machine")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, 32, 32, generator=generator).to(device)
    labels = torch.randint(0, 10, (args.batch,), generator=generator).to(device)

    models = {name: model.to(device) for name, model in training_models(args.rank).items()}
    train = time_interleaved(
        {name: step_timer(model, images, labels) for name, model in models.items()}, args.steps, args.rounds, device
    )
    merged, base = copy.deepcopy(models["ours"]), tiny_swin(0).to(device)
    merge_adapters(merged)
    infer = time_interleaved(
        {"merged": forward_timer(merged, images), "base": forward_timer(base, images)}, args.steps, args.rounds, device
    )

    ratios = {
        "ours_step / full_step": train["ours"] / train["full"],
        "peft_step / full_step": train["peft"] / train["full"],
        "ours_step / peft_step": train["ours"] / train["peft"],
        "merged_forward / base_forward": infer["merged"] / infer["base"],
    }
    versions = {"torch": torch.__version__, "timm": timm.__version__, "peft": peft.__version__,
                "python": platform.python_version()}
    setting = {"batch": args.batch, "rank": args.rank, "steps": args.steps, "rounds": args.rounds,
               "device": str(device), "threads": torch.get_num_threads(), "targets": list(DEFAULT_TARGETS)}
    print(" ".join(f"{k} {v}" for k, v in versions.items()), "|", json.dumps(setting))
    print(f"{'median seconds':<32}" + "".join(f"{name:>10}" for name in (*train, *infer)))
    print(f"{'':<32}" + "".join(f"{value:>10.4f}" for value in (*train.values(), *infer.values())))
    print(f"{'ratio':<32}{'value':>10}")
    for name, value in ratios.items():
        print(f"{name:<32}{value:>10.3f}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    record = {"versions": versions, "setting": setting, "train_step_s": train, "forward_s": infer, "ratios": ratios}
    staging = args.output.with_name(args.output.name + ".tmp")
    staging.write_text(json.dumps(record, indent=2))
    staging.replace(args.output)


if __name__ == "__main__":
    main()
