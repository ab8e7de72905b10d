"""Optimizer parameter groups for adapters, with LoRA+ learning rates (lora_plus.py).

LoRA+ (Hayou et al. 2024): A <- A - eta G_A, B <- B - lambda eta G_B with lambda >> 1. Plain LoRA is
lambda = 1.
"""

from torch import nn

_LORA_A, _LORA_B = "lora_A", "lora_B"


def adapter_param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    loraplus_ratio: float = 1.0,
) -> list[dict]:
    """Trainable parameters of `model` split into optimizer groups, each named by its "name" key.

    - "lora_A": every trainable `lora_A`, learning rate lr;
    - "lora_B": every trainable `lora_B`, learning rate lr * loraplus_ratio;
    - "decay": every other trainable matrix (e.g. an embedder or head weight), learning rate lr;
    - "no_decay": every other trainable vector (biases, norm scales, DoRA magnitudes), learning rate
      lr and no weight decay, the usual AdamW practice.

    Each group also carries "loraplus_ratio"; empty groups are left out. Shared parameters appear once.
    """
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if loraplus_ratio <= 0:
        raise ValueError(f"loraplus_ratio must be > 0 (LoRA+ uses >> 1, plain LoRA 1), got {loraplus_ratio}")
    groups: dict[str, list[nn.Parameter]] = {_LORA_A: [], _LORA_B: [], "decay": [], "no_decay": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if leaf in (_LORA_A, _LORA_B):
            groups[leaf].append(param)
        else:
            groups["decay" if param.ndim >= 2 else "no_decay"].append(param)
    if not any(groups.values()):
        raise ValueError("model has no trainable parameters; call mark_only_adapters_trainable(model) first")
    settings = {
        _LORA_A: (lr, weight_decay),
        _LORA_B: (lr * loraplus_ratio, weight_decay),
        "decay": (lr, weight_decay),
        "no_decay": (lr, 0.0),
    }
    return [
        {"name": name, "params": params, "lr": settings[name][0], "weight_decay": settings[name][1],
         "loraplus_ratio": loraplus_ratio}
        for name, params in groups.items()
        if params
    ]
