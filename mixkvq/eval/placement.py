"""Where a model lives: `model.device_map` checked and handed to transformers (accelerate places the layers), the
device each decoder layer runs on (its KV cache and decode kernel live there), and peak memory per device.

`model.device` picks the hardware (auto | cpu | cuda | cuda:N). On CUDA with `auto` or `cuda`, `model.device_map`
spreads the model over the visible GPUs: an accelerate strategy (auto | balanced | balanced_low_0 | sequential),
capped per device by `model.max_memory`, or a mapping {module name: device}. A pinned device (cpu, cuda:N) takes
the whole model. A module mapped to `cpu` on a GPU machine is offloaded: its weights wait in host memory and it
runs on the main GPU, so its layer's cache lives there too.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch

from mixkvq.errors import ConfigError, choice_error

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
OFFLOAD_TARGETS = ("cpu",)  # accelerate keeps these modules' weights in host memory and runs them on the main GPU


# ---------------------------------------------------------------- config


def _map_value(module: str, value) -> int | str:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and value in OFFLOAD_TARGETS:
        return value
    if isinstance(value, str) and value.startswith("cuda"):
        try:
            device = torch.device(value)
        except (RuntimeError, ValueError):
            device = None
        if device is not None and device.type == "cuda":
            return f"cuda:{device.index or 0}"
    raise ConfigError(f"model.device_map[{module!r}]={value!r} is not a device; use a GPU index (0), 'cuda:N' "
                      "or 'cpu' (weights offloaded to host memory, run on the main GPU)")


def check_device_map(value) -> str | dict[str, int | str] | None:
    """A strategy name, a {module: device} mapping (plain dict), or None; anything else is a ConfigError."""
    if value is None or (isinstance(value, str) and value in STRATEGIES):
        return value
    if isinstance(value, Mapping):
        if not value:
            raise ConfigError("model.device_map is an empty mapping; map module names (e.g. model.layers.0) to devices")
        return {str(k): _map_value(str(k), v) for k, v in value.items()}
    raise choice_error("model.device_map", value, [*STRATEGIES, "a {module: device} mapping", "null"])


def check_max_memory(value) -> dict[int | str, int] | None:
    """{GPU index | 'cuda:N' | 'cpu': bytes or a size such as '70GiB'} -> {int | 'cpu': bytes}, as accelerate takes it."""
    if value is None:
        return None
    if not isinstance(value, Mapping) or not value:
        raise ConfigError(f"model.max_memory={value!r} must be null or a mapping such as {{0: 70GiB, cpu: 200GiB}}")
    from accelerate.utils import convert_file_size_to_int

    out: dict[int | str, int] = {}
    for key, size in value.items():
        name = str(key)
        if name.isdigit() or name.startswith("cuda:") and name[5:].isdigit():
            dev: int | str = int(name.removeprefix("cuda:"))
        elif name == "cpu":
            dev = "cpu"
        else:
            raise ConfigError(f"model.max_memory key {key!r} is not a device; use a GPU index (0), 'cuda:N' or 'cpu'")
        try:
            out[dev] = convert_file_size_to_int(size)
        except (ValueError, TypeError):
            raise ConfigError(f"model.max_memory[{key!r}]={size!r} is not a size; use bytes or e.g. '70GiB'") from None
    return out


def device_map_arg(device_name: str, device: torch.device, device_map) -> str | dict[str, int | str]:
    """What from_pretrained gets as `device_map`: a mapping as given, the strategy when the model may spread over
    the visible GPUs (CUDA, device auto or cuda), else the one device."""
    if isinstance(device_map, Mapping):
        if any(v not in OFFLOAD_TARGETS for v in device_map.values()) and not torch.cuda.is_available():
            raise ConfigError("model.device_map maps modules to GPUs but CUDA is not available; use model.device_map="
                              "null (one device, model.device) or map every module to 'cpu'")
        return dict(device_map)
    if device.type == "cuda" and device_map is not None and device_name in ("auto", "cuda"):
        return device_map
    return str(device)


def is_strategy(arg) -> bool:
    """Whether a device_map argument leaves the placement to accelerate (over the visible GPUs)."""
    return isinstance(arg, str) and arg in STRATEGIES


# ---------------------------------------------------------------- where layers run


def as_device(value) -> torch.device:
    """accelerate's device names (a GPU index, 'cpu', 'cuda:1') as torch devices."""
    return torch.device("cuda", value) if isinstance(value, int) else torch.device(value)


def _hook_device(module) -> torch.device | None:
    """The execution device accelerate's hook on this module moves inputs and offloaded weights to, if any."""
    hook = getattr(module, "_hf_hook", None)
    hooks = getattr(hook, "hooks", None) or ([hook] if hook is not None else [])  # a SequentialHook holds several
    for h in hooks:
        dev = getattr(h, "execution_device", None)
        if dev is not None:
            return as_device(dev)
    return None


def _tensor_device(module) -> torch.device | None:
    for t in (*module.parameters(), *module.buffers()):
        if t.device.type != "meta":
            return t.device
    return None


def execution_devices(model, modules: list[torch.nn.Module]) -> list[torch.device]:
    """The device each module computes on: the nearest accelerate hook's execution device (offloaded modules keep
    their weights on `meta` and run elsewhere), else where its own tensors are, else where the model's are."""
    names = {m: n for n, m in model.named_modules()}
    fallback = _tensor_device(model) or torch.device("cpu")
    out = []
    for module in modules:
        parts = names[module].split(".") if names[module] else []
        found = None
        for k in range(len(parts), -1, -1):  # the module itself, then its ancestors up to the model
            found = _hook_device(model.get_submodule(".".join(parts[:k])))
            if found is not None:
                break
        out.append(found or _tensor_device(module) or fallback)
    return out


def layer_devices(model) -> list[torch.device]:
    """Per decoder layer (in layer order), the device its attention runs on."""
    from mixkvq.kv.attention import attention_modules

    return execution_devices(model, attention_modules(model))


def input_device(model) -> torch.device:
    """Where input ids go: the device the token embedding runs on."""
    return execution_devices(model, [model.get_input_embeddings()])[0]


def devices_of(model) -> list[torch.device]:
    """Every device the model computes on, input device first."""
    seen = [input_device(model)]
    for d in layer_devices(model):
        if d not in seen:
            seen.append(d)
    return seen


# ---------------------------------------------------------------- memory


def reset_peak_memory(devices) -> None:
    for d in devices:
        if d.type == "cuda":
            torch.cuda.reset_peak_memory_stats(d)


def peak_memory(devices) -> tuple[int, str, str | None]:
    """(peak bytes summed over the GPUs, kind, JSON {device: peak bytes} per GPU); on CPU the process's peak RSS."""
    gpus = [d for d in devices if d.type == "cuda"]
    if gpus:
        per = {str(d): int(torch.cuda.max_memory_allocated(d)) for d in gpus}
        return sum(per.values()), "cuda_allocated", json.dumps(per)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "cpu_rss", None


def describe(model) -> dict[str, Any]:
    """Layers per device, for logs: {'cuda:0': 14, 'cuda:1': 14}."""
    counts: dict[str, int] = {}
    for d in layer_devices(model):
        counts[str(d)] = counts.get(str(d), 0) + 1
    return counts
