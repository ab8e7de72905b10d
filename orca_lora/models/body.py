"""The pretrained body g_s: a timm Swin Transformer, built by name, with local or hub weights.

timm 1.x `SwinTransformer.forward_features` is patch_embed -> layers -> norm on NHWC tokens,
with no absolute position embedding; the embedder and OrcaModel rely on that layout.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import timm
import torch
from safetensors.torch import load_file
from timm.models import is_model, model_entrypoint
from timm.models.swin_transformer import SwinTransformerBlock, checkpoint_filter_fn
from torch import nn

from orca_lora.files import save_tensors_atomic, write_text_atomic

SWIN_MODULE = "timm.models.swin_transformer"
MAX_LISTED_KEYS = 3


def _check_swin_name(name: str) -> None:
    # swinv2 calls attn.qkv through F.linear on its weight, so wrapping the Linear would be silently bypassed.
    if not is_model(name) or model_entrypoint(name).__module__ != SWIN_MODULE:
        choices = ", ".join(timm.list_models("swin_*"))
        raise ValueError(f"model {name!r} is not a timm Swin (timm.models.swin_transformer); choose one of: {choices}")


def build_body(name: str, pretrained: bool = False, checkpoint: str | Path | None = None,
               model_kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """A headless timm Swin `name` (num_classes=0), from the hub (`pretrained`) or a local `checkpoint`."""
    _check_swin_name(name)
    if pretrained and checkpoint is not None:
        raise ValueError("build_body: give either pretrained=True (hub) or checkpoint=PATH (local), not both")
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist; point `checkpoint:` at a local weights file")
    kwargs = dict(model_kwargs or {})
    try:
        body = timm.create_model(name, pretrained=pretrained, num_classes=0, **kwargs)
    except OSError as error:
        if not pretrained:
            raise
        raise ConnectionError(f"could not fetch pretrained weights for {name} from the Hugging Face hub "
                           f"({type(error).__name__}); use `checkpoint: PATH` with a local file or the offline "
                           f"body (`source.model: offline`)") from None
    if checkpoint is not None:
        load_checkpoint(body, checkpoint, name)
    return body


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping):
        raise ValueError(f"checkpoint {path} holds a {type(state).__name__}, not a state dict")
    return dict(state)


def _mismatches(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> list[str]:
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    shapes = [f"{key} {tuple(state[key].shape)} vs {tuple(value.shape)}"
              for key, value in expected.items() if key in state and state[key].shape != value.shape]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape file vs model", shapes)):
        if items:
            more = f" (+{len(items) - MAX_LISTED_KEYS} more)" if len(items) > MAX_LISTED_KEYS else ""
            problems.append(f"{label}: {', '.join(items[:MAX_LISTED_KEYS])}{more}")
    return problems


def _without_classifier(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> dict:
    return {key: value for key, value in state.items() if key in expected or not key.startswith("head.")}


def load_checkpoint(body: nn.Module, checkpoint: str | Path, name: str) -> None:
    """Load local weights (safetensors or a torch state dict) into `body`, or fail in one line.

    A file that does not fit as it is (original Microsoft checkpoints, other window or patch
    sizes) goes through timm's own `checkpoint_filter_fn`, as `pretrained=True` does. The
    classifier is dropped; any other difference is reported against the file's own keys.
    """
    path = Path(checkpoint)
    raw = _read_state_dict(path)
    expected = body.state_dict()
    state = _without_classifier(raw, expected)
    problems = _mismatches(state, expected)
    if problems:
        try:
            state = _without_classifier(checkpoint_filter_fn(raw, body), expected)
        except Exception:  # timm's filter breaks on foreign architectures; the report below says why
            state = raw
        if _mismatches(state, expected):
            raise ValueError(f"checkpoint {path} does not fit model {name}: {'; '.join(problems)}")
    body.load_state_dict(state, strict=True)


def _body_files(path: str | Path) -> tuple[Path, Path]:
    stem = Path(path)
    if stem.suffix in (".safetensors", ".json"):
        stem = stem.with_suffix("")
    return stem.parent / f"{stem.name}.safetensors", stem.parent / f"{stem.name}.json"


def save_body(body: nn.Module, path: str | Path, model_name: str, model_kwargs: Mapping[str, Any]) -> Path:
    """Write `<path>.safetensors` and the `<path>.json` sidecar that `load_body` rebuilds from."""
    weights, sidecar = _body_files(path)
    save_tensors_atomic(body.state_dict(), weights)
    info = {"model_name": model_name, "model_kwargs": dict(model_kwargs)}
    write_text_atomic(sidecar, json.dumps(info, indent=2, sort_keys=True) + "\n")
    return weights


def load_body(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a body written by `save_body`; returns it with the sidecar's {"model_name", "model_kwargs"}."""
    weights, sidecar = _body_files(path)
    for file in (weights, sidecar):
        if not file.is_file():
            raise FileNotFoundError(f"body file {file} is missing; save_body writes both "
                                    f"{weights.name} and {sidecar.name}")
    info = json.loads(sidecar.read_text())
    body = build_body(info["model_name"], checkpoint=weights, model_kwargs=info["model_kwargs"])
    return body, info


def body_blocks(body: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every SwinTransformerBlock in forward order, named as in the body (`layers.0.blocks.1`)."""
    return [(name, module) for name, module in body.named_modules() if isinstance(module, SwinTransformerBlock)]


def body_token_grid(body: nn.Module) -> tuple[int, int, int]:
    """(H, W, C) of the patch-embedding output, the grid the embedder must produce."""
    height, width = body.patch_embed.grid_size
    return int(height), int(width), int(body.patch_embed.proj.out_channels)


def body_img_size(body: nn.Module) -> tuple[int, int]:
    """(H, W) of the images the body's patch embedding takes."""
    height, width = body.patch_embed.img_size
    return int(height), int(width)


def body_stride(body: nn.Module) -> int:
    """Input pixels per token of the last stage: patch size x 2 per patch merging."""
    return int(body.feature_info[-1]["reduction"])
