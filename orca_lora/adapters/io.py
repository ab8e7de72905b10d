"""Save and load adapters in Hugging Face PEFT's LoRA layout.

A directory holds `adapter_config.json` (a PEFT LoraConfig) and `adapter_model.safetensors` with keys
`base_model.model.<module>.lora_A.weight`, `.lora_B.weight` and, for DoRA, `.lora_magnitude_vector`,
so `peft.PeftModel.from_pretrained(base_model, directory)` rebuilds the adapted model. Only methods
whose spec has `peft_export` save here; the others (MoRA, SBoRA, Houlsby) raise naming the method.

- A LoRA on a patchify Conv2d (conv_lora.py) is saved in PEFT's conv layout: lora_A.weight
  (r, in_channels, kh, kw), lora_B.weight (out_channels, r, 1, 1); PEFT and our loader rebuild it.

- DyLoRA is saved at its current eval rank b as a plain LoRA of rank b (the first b components);
  PEFT's scale for it, lora_alpha / b, is DyLoRA's own, so alpha is kept.
- Delta-LoRA also moves W0, which PEFT's layout cannot hold: the moved weights go to
  `delta_lora_base_weights.safetensors` (keys `base_model.model.<module>.base_layer.weight`). Our
  loader applies them; a PEFT user must copy them into the base model before from_pretrained.
- QLoRA's adapter is a plain LoRA A, B (only its frozen W0 is stored in NF4), so it is saved as
  LoRA and loads as `lora` on the given fp base, which lacks the NF4 rounding it was trained on.
"""

import json
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from orca_lora.adapters.base import Adapter, AdapterLayer
from orca_lora.adapters.conv_lora import PATCHIFY
from orca_lora.adapters.inject import add_adapters, adapter_modules, is_adaptable, load_adapter_state_dict
from orca_lora.adapters.spec import get_method
from orca_lora.files import give_directory_default_mode

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
DELTA_BASE_NAME = "delta_lora_base_weights.safetensors"
_PREFIX = "base_model.model."
# LoraConfig fields whose non-default values change the model in ways this loader does not rebuild.
_UNSUPPORTED_FIELDS = {
    "bias": "none", "fan_in_fan_out": False, "lora_bias": False, "modules_to_save": None,
    "exclude_modules": None, "layers_to_transform": None, "target_parameters": None, "layer_replication": None,
}


# Each tensor an adapter layer saves, by name, and its shape at rank r for a base weight of shape
# (d_out, d_in) (Linear) or (d_out, in_channels, kh, kw) (patchify Conv2d, PEFT's conv layout)
_SHAPES = {
    "lora_A": lambda rank, shape: (rank, *shape[1:]),
    "lora_B": lambda rank, shape: (shape[0], rank, *(1,) * (len(shape) - 2)),
    "lora_magnitude_vector": lambda rank, shape: (shape[0],),
    "base_layer.weight": lambda rank, shape: tuple(shape),
}
_FACTORS = ("lora_A", "lora_B")  # cut to the saved rank; every other adapter tensor is saved whole


def _check_peft_format(model: nn.Module) -> None:
    """Refuse a model holding adapters of a method that PEFT's LoRA layout cannot describe."""
    for method in sorted({module.method for module in model.modules() if isinstance(module, Adapter)}):
        if not get_method(method).peft_export:
            raise ValueError(f"method {method} has no PEFT format; its trained tensors are saved by "
                             "adapter_state_dict (stage 3 writes them to trainable.safetensors)")


def _one_value(values: Mapping[str, object], what: str) -> object:
    distinct = sorted(set(values.values()), key=str)
    if len(distinct) != 1:
        raise ValueError(f"PEFT's LoraConfig holds one {what} for all modules; this model mixes {distinct}")
    return distinct[0]


def _with_pattern(values: Mapping[str, float]) -> tuple[float, dict[str, float]]:
    """(most common value, {escaped module name: value} for the modules that differ from it)."""
    common = Counter(values.values()).most_common(1)[0][0]
    # PEFT reads pattern keys as regexes matched at a module-name suffix, so escape the dots.
    return common, {re.escape(name): value for name, value in values.items() if value != common}


def peft_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The model's adapter tensors under PEFT's keys (DyLoRA cut to its eval rank), on the CPU."""
    _check_peft_format(model)
    state: dict[str, Tensor] = {}
    for name, module in adapter_modules(model).items():
        rank = module.peft_rank
        state[f"{_PREFIX}{name}.lora_A.weight"] = module.lora_A[:rank]
        state[f"{_PREFIX}{name}.lora_B.weight"] = module.lora_B[:, :rank]
        for extra in module.adapter_parameter_names:
            if extra not in _FACTORS:
                state[f"{_PREFIX}{name}.{extra}"] = module.get_parameter(extra)
    return {key: tensor.detach().cpu().contiguous() for key, tensor in state.items()}


def _peft_config(model: nn.Module, base_model_name: str | None) -> dict:
    adapters = adapter_modules(model)
    method = _one_value({name: m.method for name, m in adapters.items()}, "method")
    r, rank_pattern = _with_pattern({name: m.peft_rank for name, m in adapters.items()})
    lora_alpha, alpha_pattern = _with_pattern({name: m.alpha for name, m in adapters.items()})
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name,
        "inference_mode": True,
        "r": r,
        "lora_alpha": lora_alpha,
        "target_modules": list(adapters),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "use_rslora": _one_value({name: m.use_rslora for name, m in adapters.items()}, "use_rslora"),
        "use_dora": "lora_magnitude_vector" in get_method(method).layer.adapter_parameter_names,
        "lora_dropout": _one_value({name: m.lora_dropout.p for name, m in adapters.items()}, "lora_dropout"),
        "init_lora_weights": True,
        **_UNSUPPORTED_FIELDS,
    }


def _replace_directory(new: Path, directory: Path) -> None:
    """Move the finished `new` to `directory`, replacing an earlier adapter directory there."""
    if not directory.exists():
        new.rename(directory)
        return
    if not (directory / CONFIG_NAME).is_file() and any(directory.iterdir()):
        raise FileExistsError(f"{directory} exists and holds no adapter; choose a new or empty directory")
    old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old.", dir=directory.parent))
    directory.rename(old / directory.name)
    new.rename(directory)
    shutil.rmtree(old)


def save_peft_adapter(model: nn.Module, directory: str | Path, base_model_name: str | None = None) -> Path:
    """Write the model's adapters to `directory` in PEFT's LoRA layout (written aside, then renamed)."""
    _check_peft_format(model)
    adapters = adapter_modules(model)
    if not adapters:
        raise ValueError("model has no adapter layers; call add_adapters(model, ...) first")
    merged = [name for name, module in adapters.items() if module.merged]
    if merged:
        raise RuntimeError(f"adapters {merged} are merged into W0; call unmerge_adapters(model) before saving")
    config = _peft_config(model, base_model_name)
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.new.", dir=directory.parent))
    try:
        give_directory_default_mode(staging)
        (staging / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
        save_file(peft_state_dict(model), staging / WEIGHTS_NAME, metadata={"format": "pt"})
        base_weights = {  # Delta-LoRA's moved W0, which PEFT's layout has no place for
            f"{_PREFIX}{name}.base_layer.weight": module.base_layer.weight.detach().cpu().contiguous()
            for name, module in adapters.items()
            if "base_layer.weight" in module.saved_tensor_names
        }
        if base_weights:
            save_file(base_weights, staging / DELTA_BASE_NAME, metadata={"format": "pt"})
        _replace_directory(staging, directory)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return directory


def _peft_targets(model: nn.Module, target_modules: str | list[str]) -> list[str]:
    """Module names PEFT would adapt: a string is a full-match regex, a list names module suffixes."""
    if isinstance(target_modules, str):
        names = [name for name, _ in model.named_modules() if re.fullmatch(target_modules, name)]
    else:
        names = [
            name for name, _ in model.named_modules()
            if any(name == target or name.endswith(f".{target}") for target in target_modules)
        ]
    if not names:
        raise ValueError(f"target_modules {target_modules!r} select no module of {type(model).__name__}")
    others = [name for name in names if not is_adaptable(model.get_submodule(name))]
    if others:
        raise ValueError(f"target_modules {target_modules!r} select modules that are neither nn.Linear nor a "
                         f"patchify Conv2d ({PATCHIFY}): {others}")
    return names


def _pattern_value(patterns: Mapping[str, float], name: str, default: float) -> float:
    """PEFT's rule: the first pattern matching a suffix of the module name wins."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", name):
            return value
    return default


def _read_config(directory: Path) -> dict:
    for file_name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (directory / file_name).is_file():
            raise FileNotFoundError(f"{directory / file_name} not found; is {directory} a PEFT adapter directory?")
    config = json.loads((directory / CONFIG_NAME).read_text())
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{directory / CONFIG_NAME}: peft_type is {config.get('peft_type')!r}, only 'LORA' loads")
    for field, default in _UNSUPPORTED_FIELDS.items():
        if config.get(field, default) not in (default, [], {}):
            raise ValueError(f"{directory / CONFIG_NAME}: {field}={config[field]!r} is not supported; use {default!r}")
    return config


def _read_state(directory: Path, has_base: bool) -> dict[str, Tensor]:
    """The stored tensors under our keys: PEFT's `<module>.lora_A.weight` is our `<module>.lora_A`."""
    stored = load_file(directory / WEIGHTS_NAME)
    state = {key.removeprefix(_PREFIX).removesuffix(".weight"): tensor for key, tensor in stored.items()}
    if has_base:
        base_weights = load_file(directory / DELTA_BASE_NAME)
        state.update({key.removeprefix(_PREFIX): tensor for key, tensor in base_weights.items()})
    return state


def load_peft_adapter(model: nn.Module, directory: str | Path, seed: int = 0) -> dict[str, AdapterLayer]:
    """Inject the adapters described in `directory` (PEFT LoRA layout) into `model` and load them."""
    directory = Path(directory)
    config = _read_config(directory)
    names = _peft_targets(model, config["target_modules"])
    ranks = {name: int(_pattern_value(config.get("rank_pattern") or {}, name, config["r"])) for name in names}
    has_base = (directory / DELTA_BASE_NAME).is_file()
    # the three layouts PEFT's files can hold: DoRA's magnitudes, Delta-LoRA's moved W0, or plain LoRA
    method = "dora" if config.get("use_dora") else "delta-lora" if has_base else "lora"
    state = _read_state(directory, has_base)
    _check_state_shapes(model, state, ranks, get_method(method).layer.adapter_parameter_names
                        + (("base_layer.weight",) if has_base else ()))
    adapters = add_adapters(
        model, [f"^{re.escape(name)}$" for name in names], ranks, method, config["lora_alpha"], seed=seed,
        use_rslora=bool(config.get("use_rslora", False)), dropout=float(config.get("lora_dropout", 0.0)),
    )
    for name, module in adapters.items():
        module.alpha = float(_pattern_value(config.get("alpha_pattern") or {}, name, config["lora_alpha"]))
    load_adapter_state_dict(model, state)
    return adapters


def _check_state_shapes(model: nn.Module, state: Mapping[str, Tensor], ranks: Mapping[str, int],
                        tensor_names: tuple[str, ...]) -> None:
    """Check the stored tensors (each module's `tensor_names`) against the model before it is touched."""
    expected = {
        f"{name}.{tensor_name}": _SHAPES[tensor_name](rank, model.get_submodule(name).weight.shape)
        for name, rank in ranks.items() for tensor_name in tensor_names
    }
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise KeyError(f"adapter files do not fit the config: missing keys {missing}, unexpected keys {unexpected}")
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise ValueError(f"{key!r}: stored shape {tuple(state[key].shape)}, the config and model need {shape}")
