"""KIVI (Liu, Yuan et al., ICML 2024), METHODS.md §4.

Keys: per-channel groups of G tokens, flushed in whole R-token blocks when the full-precision buffer
reaches R (so it cycles 0..R-1 between steps). Values: per-token groups of G channels with a true sliding
window: the last R values stay at full precision and each decode step quantizes the single oldest one.
`variant` picks the comparison papers' settings (paper / pmkvq / kvmix); explicit keys override it.
"""

from __future__ import annotations

from dataclasses import dataclass

from mixkvq.cache import QuantizedLayer
from mixkvq.errors import ConfigError
from mixkvq.methods import Method, check_choice, check_group, register_method
from mixkvq.quantizer import check_bits

AXES = ("channel", "token")
VALUE_WINDOWS = ("sliding", "flush")


@dataclass(frozen=True)
class KiviConfig:
    name: str
    nominal_bits: str | None
    variant: str
    variants: dict
    k_bits: int
    v_bits: int
    group_size: int | None
    residual_length: int | None
    value_window: str | None
    key_axis: str
    value_axis: str


@register_method("kivi")
class Kivi(Method):
    config_cls = KiviConfig

    def validate(self) -> None:
        c = self.cfg
        check_choice("kivi.variant", c.variant, c.variants)
        preset = c.variants[c.variant]
        self.group = c.group_size if c.group_size is not None else preset["group_size"]
        self.residual = c.residual_length if c.residual_length is not None else preset["residual_length"]
        self.value_window = c.value_window if c.value_window is not None else preset["value_window"]
        check_bits(c.k_bits, "kivi.k_bits")
        check_bits(c.v_bits, "kivi.v_bits")
        check_choice("kivi.key_axis", c.key_axis, AXES)
        check_choice("kivi.value_axis", c.value_axis, AXES)
        check_choice("kivi.value_window", self.value_window, VALUE_WINDOWS)
        if not isinstance(self.residual, int) or self.residual <= 0:
            raise ConfigError(
                f"kivi.residual_length={self.residual!r} is not supported; use a positive multiple of "
                f"kivi.group_size={self.group} (residual 0, every token quantized, is not implemented)"
            )
        check_group("kivi.group_size", self.group, self.residual, "kivi.residual_length")
        if "token" in (c.key_axis, c.value_axis):
            check_group("kivi.group_size", self.group, self.shape.head_dim, "head_dim")
        if c.value_axis == "channel" and self.value_window != "flush":
            raise ConfigError("kivi.value_axis=channel groups values over tokens and needs kivi.value_window=flush")

    @property
    def nominal_bits(self) -> str:
        c = self.cfg
        if c.nominal_bits:
            return c.nominal_bits
        return f"KIVI-{c.k_bits}" if c.k_bits == c.v_bits else f"K{c.k_bits}V{c.v_bits}"

    def _store(self, batch, axis: str, bits: int):
        if axis == "channel":
            return self.channel_store(batch, self.residual, self.group, bits)
        return self.token_store(batch, self.group, bits)

    def make_layer(self, idx, batch, pad):
        c, s = self.cfg, self.shape
        keys = self.stream(batch, window="flush", residual=self.residual, store=self._store(batch, c.key_axis, c.k_bits))
        values = self.stream(batch, window=self.value_window, residual=self.residual,
                             store=self._store(batch, c.value_axis, c.v_bits))
        return QuantizedLayer(idx, keys, values, pad, s.kv_heads, s.head_dim)
