"""IBP-LoRA's training step against LoRA's at the same rank, side by side in one process.

The 32x32 test Swin (embed 32, depths 2, 2) at batch 64, every default target adapted: LoRA at rank r
and IBP-LoRA at r_max = r (prior mass r, as a flat prior at stage3.rank). One step is forward + loss
(+ the KL / n_train for IBP-LoRA) + backward + AdamW, as stage 3 takes it. The two take turns, one step
each per round, so drifting machine load hits them alike; each figure is the median over the rounds.
IBP-LoRA's extra cost: a relaxed-Bernoulli draw and a gating multiply per layer, the KL's Kumaraswamy
draw, and the autograd path (LoRA's forward has its own fused backward, lora.LoRALinearFunction).

    python bench/bench_ibp_lora.py [--rank 8] [--rounds 30] [--threads 1]

Prints the times and their ratio (ibp-lora / lora) and writes bench/results/ibp_lora.json.
"""
import argparse
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

from orca_lora.adapters.ibp_lora import IBPLoRALinear, total_kl
from orca_lora.adapters.inject import add_adapters, mark_only_adapters_trainable, match_targets, replace_modules
from orca_lora.files import strict_json_text, write_text_atomic

RESULTS = Path(__file__).parent / "results" / "ibp_lora.json"
BATCH, IMAGE_SIZE, N_TRAIN, WARMUP_ROUNDS = 64, 32, 1000, 2


def tiny_swin() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=IMAGE_SIZE, patch_size=2,
                             window_size=4, embed_dim=32, depths=(2, 2), num_heads=(2, 4), num_classes=10)


def lora_model(rank: int) -> nn.Module:
    model = tiny_swin()
    add_adapters(model, ranks=rank, method="lora", alpha=16.0)
    mark_only_adapters_trainable(model)
    return model.train()


def ibp_model(rank: int) -> nn.Module:
    model = tiny_swin()
    generator = torch.Generator().manual_seed(0)
    replace_modules(model, {name: IBPLoRALinear(module, rank, alpha=16.0, generator=generator, prior_mass=rank)
                            for name, module in match_targets(model).items()})
    mark_only_adapters_trainable(model)
    return model.train()


def step_timer(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> Callable[[], None]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def step() -> None:
        loss = F.cross_entropy(model(images), labels)
        kl = total_kl(model)
        if kl is not None:
            loss = loss + kl / N_TRAIN
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def time_interleaved(runs: dict[str, Callable[[], None]], rounds: int) -> dict[str, float]:
    """Median seconds per call of each run over `rounds` rounds of one call each, after warm-up rounds."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for round_index in range(rounds + WARMUP_ROUNDS):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            if round_index >= WARMUP_ROUNDS:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(BATCH, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    labels = torch.randint(0, 10, (BATCH,), generator=generator)
    runs = {"lora": step_timer(lora_model(args.rank), images, labels),
            "ibp-lora": step_timer(ibp_model(args.rank), images, labels)}
    seconds = time_interleaved(runs, args.rounds)
    ratio = seconds["ibp-lora"] / seconds["lora"]
    print(f"training step, tiny Swin, batch {BATCH}, rank / r_max {args.rank}, {args.threads} thread(s)")
    for name, value in seconds.items():
        print(f"  {name:9s} {1e3 * value:8.2f} ms")
    print(f"  ratio ibp-lora / lora: {ratio:.3f}")
    result = {
        "versions": {"torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version()},
        "setting": {"model": "tiny Swin (32x32, embed 32, depths 2, 2)", "batch": BATCH, "rank": args.rank,
                    "rounds": args.rounds, "threads": args.threads, "device": "cpu"},
        "train_step_s": seconds,
        "ratio_ibp_lora_over_lora": ratio,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(RESULTS, strict_json_text(result))


if __name__ == "__main__":
    main()
