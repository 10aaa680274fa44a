"""KVmix (Li et al., AAAI 2026), METHODS.md §7: per-layer key/value widths from gradient importance + RPC window.

Keys per channel in token groups (G=32; 3-bit keys in groups of 11 packed 11 per int32 in the repo layout),
values per token in groups of G channels. The `high_bit_layers` most important layers by the profiled
‖∇W_k L‖ (and separately ‖∇W_v L‖) get the high widths (K3 / V4), the others the low ones (K2 / V2).

Recent Pivotal Context (§7.3), at every forward, before the step's attention: the full-precision buffer is
`old ++ new` (c tokens); keep = ⌊r·c⌋; the oldest ⌊(c − keep)/G⌋·G tokens are quantized. r depends on the
tensor's width (`rpc_ratios`: paper or repo values), so the buffer cycles in a small band (~7..39 for r=0.2, G=32).

The layer scores come from the calibrator at the end of this file (`scripts/calibrate.py method=kvmix`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mixkvq.calib.artifacts import load_artifact
from mixkvq.calib.calibration import calibration_dataset, lm_loss, load_texts, prompt_ids, register_calibrator
from mixkvq.errors import ConfigError
from mixkvq.kv.cache import QuantizedLayer
from mixkvq.kv.methods import Method, check_choice, check_group
from mixkvq.kv.quantizer import PACK11, check_bits


@dataclass(frozen=True)
class KVmixConfig:
    name: str
    nominal_bits: str | None
    high_bits: dict
    low_bits: dict
    rpc_ratios: str
    ratio_tables: dict
    high_bit_layers: str
    high_bit_share: float
    group_size: int
    key3_format: str
    layer_bits: dict | None
    calibration_dir: str
    artifact: str | None
    profile: dict


def rpc_rule(ratio: float, group: int):
    """Window rule: tokens each row releases, given its buffer lengths w (the residual argument is unused)."""

    def rule(w: torch.Tensor, _residual: int) -> torch.Tensor:
        keep = torch.floor(w.to(torch.float64) * ratio).to(torch.int64)
        return ((w - keep) // group) * group

    return rule


def high_bit_count(layers: int, rule: str, share: float) -> int:
    """repo: 2·⌊0.1·L⌋ (6 of 32 layers); paper: ⌊share·L⌋ (the paper gives no rounding; floor)."""
    return 2 * int(0.1 * layers) if rule == "repo" else int(math.floor(share * layers + 1e-9))


def allocate(scores: list[float], n_high: int, high: int, low: int) -> list[int]:
    """The n_high layers with the largest scores get `high` bits (ties: the earlier layer), the rest `low`."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    top = set(order[:n_high])
    return [high if i in top else low for i in range(len(scores))]


class KVmixLayer(QuantizedLayer):
    releases_before_attention = True  # KVmix quantizes before the step's attention (§7.3)


class KVmix(Method):
    config_cls = KVmixConfig

    @staticmethod
    def needs_artifact(cfg) -> bool:
        return cfg.layer_bits is None

    def validate(self) -> None:
        c = self.cfg
        check_choice("method.rpc_ratios", c.rpc_ratios, c.ratio_tables)
        check_choice("method.high_bit_layers", c.high_bit_layers, ("repo", "paper"))
        check_choice("method.key3_format", c.key3_format, ("repo", "g32"))
        for which in ("high_bits", "low_bits"):
            bits = getattr(c, which)
            if sorted(bits) != ["key", "value"]:
                raise ConfigError(f"method.{which}={bits!r} must have exactly the keys ['key', 'value']")
            for k, b in bits.items():
                check_bits(b, f"method.{which}.{k}")
        if not 0 <= float(c.high_bit_share) <= 1:
            raise ConfigError(f"method.high_bit_share={c.high_bit_share!r} must lie in [0, 1]")
        check_group("method.group_size", c.group_size, self.shape.head_dim, "head_dim")
        self.ratios = {int(b): float(r) for b, r in c.ratio_tables[c.rpc_ratios].items()}
        for b in {*c.high_bits.values(), *c.low_bits.values()}:
            if b not in self.ratios:
                raise ConfigError(f"method.ratio_tables.{c.rpc_ratios} gives no RPC ratio for {b}-bit tensors; "
                                  f"it has {sorted(self.ratios)}")
        self.key_bits, self.value_bits = self._layer_bits()

    def _layer_bits(self) -> tuple[list[int], list[int]]:
        c, layers = self.cfg, self.shape.layers
        if c.layer_bits is not None:
            keys, values = list(c.layer_bits.get("key", [])), list(c.layer_bits.get("value", []))
            if len(keys) != layers or len(values) != layers:
                raise ConfigError(f"method.layer_bits needs {layers} key and {layers} value widths, got "
                                  f"{len(keys)} and {len(values)}")
            for b in keys + values:
                check_bits(b, "method.layer_bits")
            return keys, values
        scores = load_artifact("kvmix", c.calibration_dir, c.artifact, self.model_cfg, self.shape)
        n_high = high_bit_count(layers, c.high_bit_layers, c.high_bit_share)
        keys = allocate(scores["key_scores"], n_high, c.high_bits["key"], c.low_bits["key"])
        values = allocate(scores["value_scores"], n_high, c.high_bits["value"], c.low_bits["value"])
        return keys, values

    @property
    def average_bits(self) -> tuple[float, float]:
        return sum(self.key_bits) / len(self.key_bits), sum(self.value_bits) / len(self.value_bits)

    @property
    def nominal_bits(self) -> str:
        k, v = self.average_bits
        return self.cfg.nominal_bits or f"k{k:.2f}v{v:.2f}"

    def key_group(self, bits: int) -> int:
        return PACK11 if bits == 3 and self.cfg.key3_format == "repo" else self.cfg.group_size

    def make_layer(self, idx, batch, pad):
        s = self.shape
        kb, vb = self.key_bits[idx], self.value_bits[idx]
        kg, vg = self.key_group(kb), self.cfg.group_size
        key_store = self.channel_store(batch, kg, kg, kb, pack11=kg == PACK11)
        keys = self.stream(batch, window=rpc_rule(self.ratios[kb], kg), store=key_store)
        # Values release whole groups of G tokens too (the repo's rule is shared by K and V).
        values = self.stream(batch, window=rpc_rule(self.ratios[vb], vg), store=self.token_store(batch, vg, vb))
        return KVmixLayer(idx, keys, values, pad, s.kv_heads, s.head_dim)


# ---- calibration: gradient-norm layer importance (§7.2) --------------------------------------------------------


def kvmix_profile(model, tokenizer, prompts: list[torch.Tensor], mode: str) -> dict:
    """Mean over prompts of ‖∇_{W_k} L‖₂ and ‖∇_{W_v} L‖₂ per layer.

    single_backward: one backward per prompt collects every layer's gradients at once. per_layer: the repo's
    loop, one forward+backward per layer with only that layer's weights trainable (same numbers, L× the cost).
    """
    from mixkvq.kv.attention import attention_modules

    mods = attention_modules(model)
    pad = model.generation_config.pad_token_id
    pad = pad if pad is not None else tokenizer.pad_token_id or 0
    weights = [p for m in mods for p in (m.k_proj.weight, m.v_proj.weight)]
    saved = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    keys = torch.zeros(len(mods), dtype=torch.float64)
    values = torch.zeros(len(mods), dtype=torch.float64)
    try:
        for ids in prompts:
            groups = [list(range(len(mods)))] if mode == "single_backward" else [[i] for i in range(len(mods))]
            for layers in groups:
                for i in layers:
                    mods[i].k_proj.weight.requires_grad_(True)
                    mods[i].v_proj.weight.requires_grad_(True)
                model.zero_grad(set_to_none=True)
                lm_loss(model, ids[None], pad).backward()
                for i in layers:
                    keys[i] += mods[i].k_proj.weight.grad.double().norm().item()
                    values[i] += mods[i].v_proj.weight.grad.double().norm().item()
                    mods[i].k_proj.weight.requires_grad_(False)
                    mods[i].v_proj.weight.requires_grad_(False)
    finally:
        model.zero_grad(set_to_none=True)
        for p, r in zip(model.parameters(), saved):
            p.requires_grad_(r)
        del weights
    n = len(prompts)
    return {"key_scores": (keys / n).tolist(), "value_scores": (values / n).tolist(), "prompts": n, "mode": mode}


@register_calibrator("kvmix", without_artifact=lambda shape: {
    "layer_bits": {"key": [2] * shape.layers, "value": [2] * shape.layers}})
def calibrate(cfg, loaded, method) -> tuple[dict, dict]:
    """`python scripts/calibrate.py method=kvmix`: the layer scores of `method.profile` prompts."""
    p = cfg.method.profile
    if p.mode not in ("single_backward", "per_layer"):
        raise ConfigError(f"method.profile.mode={p.mode!r} is not valid; choose one of ['single_backward', 'per_layer']")
    texts, data = load_texts(calibration_dataset(cfg, p.dataset), cfg.data_files, int(p.prompts), cfg.calib_seed)
    prompts = prompt_ids(loaded.tokenizer, texts, int(p.max_tokens))
    return kvmix_profile(loaded.model, loaded.tokenizer, prompts, p.mode), data

