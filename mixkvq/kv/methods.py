"""Method registry and the small base class every KV-cache method builds on.

A method is a dataclass config (mirrored one-to-one by `configs/method/<name>.yaml`, which holds the
defaults) plus a `Method` subclass that builds one `QuantizedLayer` per decoder layer, in one module of its own
beside whatever else is only its own (a store subclass, its calibrator). `METHODS` names every method by a
`"module:Class"` string, imported on first use: the framework imports no method.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass

import torch
from omegaconf import DictConfig, OmegaConf

from mixkvq.calib.artifacts import model_name
from mixkvq.config import per_model_settings
from mixkvq.errors import ConfigError
from mixkvq.kv.cache import QuantizedCache, QuantizedLayer, Stream
from mixkvq.kv.quantizer import QuantSpec
from mixkvq.kv.storage import ChannelGroupStore, TokenGroupStore, check_pack_kernel
from mixkvq.registry import Registry

# Every method by name, imported on first use; a new method adds its line here.
METHODS: Registry[type["Method"]] = Registry("method", {
    "bf16": "baselines.bf16:Bf16",
    "kivi": "baselines.kivi:Kivi",
    "mixkvq": "mixkvq.mixkvq:MixKVQ",
    "pmkvq": "baselines.pmkvq:PMKVQ",
    "kvmix": "baselines.kvmix:KVmix",
})
STORAGE_MODES = ("packed", "fake")


def register_method(name: str, target: str | None = None):
    """Add a method: `register_method("name", "module:Class")` (imported on first use), or `@register_method("name")`
    on the class in a module imported before the method is built (a notebook, a test)."""
    return METHODS.register(name, target)


@dataclass(frozen=True)
class ModelShape:
    """What a cache needs to know about the model."""

    layers: int
    kv_heads: int
    q_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device  # where inputs go (the main device)
    layer_devices: tuple[torch.device, ...] = ()  # where each layer runs, when spread over devices (placement.py)

    @classmethod
    def of(cls, model) -> "ModelShape":
        from mixkvq.eval import placement

        c = model.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        p = next(model.parameters())
        kv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        return cls(c.num_hidden_layers, kv, c.num_attention_heads, head_dim, p.dtype, placement.input_device(model),
                   tuple(placement.layer_devices(model)))

    def layer_device(self, idx: int) -> torch.device:
        return self.layer_devices[idx] if self.layer_devices else self.device


class Method:
    """Builds caches for one method. Subclasses set `config_cls` and implement `make_layer`."""

    config_cls: type

    def __init__(self, cfg, shape: ModelShape, quant: QuantSpec, storage: str, model_cfg=None,
                 pack_kernel: str = "auto"):
        if storage not in STORAGE_MODES:
            raise ConfigError(f"storage={storage!r} is not valid; choose one of {list(STORAGE_MODES)}")
        self.cfg, self.shape, self.quant, self.storage = cfg, shape, quant, storage
        self.pack_kernel = check_pack_kernel(pack_kernel)  # who packs the stores' writes (`quant.pack_kernel`)
        self.model_cfg = model_cfg  # the model config: its name (artifacts), its generation budget
        # The method's per-model paper settings for this model (`per_model` in its config), for options left null.
        self.per_model = per_model_settings(getattr(cfg, "per_model", None), model_name(model_cfg))
        self.device = shape.device  # where the builders below put tensors: the layer being built's device
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError for impossible settings, before any model work."""

    def check_prompts(self, shortest: int) -> None:
        """Raise ConfigError when no prompt of the task (the shortest has `shortest` tokens) can be run at all."""

    @staticmethod
    def needs_artifact(cfg) -> bool:
        """Whether this config reads a calibration artifact (checked for existence before a sweep launches)."""
        return False

    @property
    def nominal_bits(self) -> str:
        raise NotImplementedError

    def prepare_model(self, model) -> None:
        """Called once on the loaded model before any generation (PM-KVQ folds its key scales into weights)."""

    def make_layer(self, idx: int, batch: int, pad: torch.Tensor) -> QuantizedLayer:
        raise NotImplementedError

    def new_cache(self, batch: int, pad: torch.Tensor | None = None, capacity: int | None = None) -> QuantizedCache:
        """A fresh cache for `batch` rows; `pad[b]` is row b's left padding in the prompt; `capacity` (tokens per
        row, pads included: prompt + max_new_tokens) allocates the stores once instead of growing them."""
        pad = torch.zeros(batch, dtype=torch.int64) if pad is None else pad.to("cpu", torch.int64)
        layers = []
        for i in range(self.shape.layers):
            self.device = self.shape.layer_device(i)  # each layer's stores live where its attention runs
            layers.append(self.make_layer(i, batch, pad))
        self.device = self.shape.device
        cache = QuantizedCache(layers, self.cfg.name, self.storage)
        if capacity is not None:
            cache.reserve(capacity)
        return cache

    # -- building blocks for subclasses ------------------------------------------------------------------------

    def stream(self, batch, *, window: str, residual: int = 0, sink: int = 0, store=None, widths_fn=None) -> Stream:
        s = self.shape
        return Stream(batch, s.kv_heads, s.head_dim, s.dtype, self.device, window, residual, sink, store, widths_fn)

    def channel_store(self, batch, block: int, group: int, width: int | None, pack11: bool = False) -> ChannelGroupStore:
        s = self.shape
        return ChannelGroupStore(batch, s.kv_heads, s.head_dim, block, group, s.dtype, self.device, self.quant,
                                 self.storage == "packed", width, pack11, self.pack_kernel)

    def token_store(self, batch, group: int, bits: int) -> TokenGroupStore:
        s = self.shape
        return TokenGroupStore(batch, s.kv_heads, s.head_dim, group, bits, s.dtype, self.device, self.quant,
                               self.storage == "packed", self.pack_kernel)


def method_config(node, extra: dict | None = None):
    """The method's dataclass from its config node; unknown or missing keys are ConfigErrors."""
    values = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    values.update(extra or {})
    cls = METHODS.get(values.get("name")).config_cls
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown} for method {values['name']!r}; valid: {sorted(fields)}")
    missing = sorted(fields - set(values))
    if missing:
        raise ConfigError(f"method {values['name']!r} config lacks {missing}")
    for name, kind in typing.get_type_hints(cls).items():
        check_type(f"method.{name}", values[name], kind)
    if "per_model" in fields:
        check_per_model(values["per_model"], sorted(fields - {"name", "per_model"}))
    return cls(**values)


def check_per_model(table: dict, options: list[str]) -> None:
    """`method.per_model`: model config name (or `default`) -> {option: value}, each option one of the method's."""
    for model, entry in table.items():
        if not isinstance(entry, dict):
            raise ConfigError(f"method.per_model.{model}={entry!r} must be a mapping of method options")
        unknown = sorted(set(entry) - set(options))
        if unknown:
            raise ConfigError(f"method.per_model.{model} sets unknown option(s) {unknown}; valid: {options}")


def _accepts(kind, value) -> bool:
    if kind is object or kind is typing.Any:
        return True
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        return any(_accepts(k, value) for k in typing.get_args(kind))
    kind = typing.get_origin(kind) or kind
    if kind is type(None):
        return value is None
    if kind is float:  # an integer is a fine float; a bool is neither
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def check_type(key: str, value, kind) -> None:
    """`value` fits the dataclass field type `kind` (e.g. `float | None`), else a ConfigError naming the key."""
    if not _accepts(kind, value):
        want = " or ".join("null" if k is type(None) else getattr(typing.get_origin(k) or k, "__name__", str(k))
                           for k in (typing.get_args(kind) if isinstance(kind, types.UnionType) else (kind,)))
        raise ConfigError(f"{key}={value!r} is not valid; it must be {want}")


def build_method(cfg, model, method=None) -> Method:
    """The method of a run config: `cfg.method` (or the `method` node given instead), its storage, and the
    quantizer settings `cfg.quant` for the model's dtype (with `quant.pack_kernel`, who packs the stores' writes).
    `model` is the loaded model or its `ModelShape`. The method's `per_model` settings (e.g. MixKVQ's target bits)
    are resolved for `cfg.model` (its name)."""
    shape = model if isinstance(model, ModelShape) else ModelShape.of(model)
    quant = QuantSpec.from_config(cfg.quant, shape.dtype)
    config = method_config(cfg.method if method is None else method)
    return METHODS.get(config.name)(config, shape, quant, cfg.storage, cfg.get("model"),
                                    pack_kernel=cfg.quant.get("pack_kernel", "auto"))


def check_choice(key: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not valid; choose one of {list(choices)}")


def check_group(key: str, group: int, total: int, total_key: str) -> None:
    if not isinstance(group, int) or group <= 0 or total % group:
        raise ConfigError(f"{key}={group!r} must be a positive divisor of {total_key}={total}")
