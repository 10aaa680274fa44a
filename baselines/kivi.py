"""KIVI (Liu, Yuan et al., ICML 2024), METHODS.md §4.

Keys: per-channel groups of G tokens, flushed in whole R-token blocks when the full-precision buffer
reaches R (so it cycles 0..R-1 between steps). Values: per-token groups of G channels with a true sliding
window: the last R values stay at full precision and each decode step quantizes the single oldest one.
`variant` picks the comparison papers' settings (paper / pmkvq / kvmix); explicit keys override it.

R = 0 (the Table 1/3 ablation rows, §4.7 item 6): no full-precision residual. Per-token groups are complete
when their token arrives, so every such token is quantized after its step; per-channel groups need G tokens,
so those tokens flush in G-token blocks and the incomplete group (at most G - 1 tokens) waits at full precision.
"""

from __future__ import annotations

from dataclasses import dataclass

from mixkvq.errors import ConfigError
from mixkvq.kv.cache import QuantizedLayer
from mixkvq.kv.methods import Method, check_choice, check_group
from mixkvq.kv.quantizer import check_bits

AXES = ("channel", "token")
VALUE_WINDOWS = ("sliding", "flush")
# When a step's released tokens are quantized: after the step's attention (KIVI's repo: the new token is attended
# at full precision), or before it (PM-KVQ's KIVI baseline: a group completed by the new token, that token
# included, is quantized before the step attends).
QUANTIZE_AT = ("after_attention", "before_attention")


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
    quantize_at: str | None
    key_axis: str
    value_axis: str


class KiviLayer(QuantizedLayer):
    def __init__(self, *args, before_attention: bool, **kwargs):
        super().__init__(*args, **kwargs)
        self.before_attention = before_attention

    def update(self, key_states, value_states, *args, **kwargs):
        out = super().update(key_states, value_states, *args, **kwargs)
        if self.before_attention:  # prefill attention reads `out` (exact) anyway; decode reads the stores
            self.key_stream.release()
            self.value_stream.release()
        return out


class Kivi(Method):
    config_cls = KiviConfig

    def validate(self) -> None:
        c = self.cfg
        check_choice("method.variant", c.variant, c.variants)
        preset = c.variants[c.variant]
        self.group = c.group_size if c.group_size is not None else preset["group_size"]
        self.residual = c.residual_length if c.residual_length is not None else preset["residual_length"]
        self.value_window = c.value_window if c.value_window is not None else preset["value_window"]
        self.quantize_at = c.quantize_at if c.quantize_at is not None else preset["quantize_at"]
        check_bits(c.k_bits, "method.k_bits")
        check_bits(c.v_bits, "method.v_bits")
        check_choice("method.key_axis", c.key_axis, AXES)
        check_choice("method.value_axis", c.value_axis, AXES)
        check_choice("method.value_window", self.value_window, VALUE_WINDOWS)
        check_choice("method.quantize_at", self.quantize_at, QUANTIZE_AT)
        if not isinstance(self.residual, int) or isinstance(self.residual, bool) or self.residual < 0:
            raise ConfigError(f"method.residual_length={self.residual!r} must be 0 (no full-precision residual) or a "
                              f"positive multiple of method.group_size={self.group}")
        if self.residual:
            check_group("method.group_size", self.group, self.residual, "method.residual_length")
        elif not isinstance(self.group, int) or self.group <= 0:
            raise ConfigError(f"method.group_size={self.group!r} must be a positive integer")
        if "token" in (c.key_axis, c.value_axis):
            check_group("method.group_size", self.group, self.shape.head_dim, "head_dim")
        if c.value_axis == "channel" and self.value_window != "flush":
            raise ConfigError("method.value_axis=channel groups values over tokens and needs method.value_window=flush")

    @property
    def nominal_bits(self) -> str:
        c = self.cfg
        if c.nominal_bits:
            return c.nominal_bits
        if not self.residual:  # the paper's names of its no-residual rows, e.g. "2bit (K-C,V-T)"
            bits = f"{c.k_bits}bit" if c.k_bits == c.v_bits else f"K{c.k_bits}V{c.v_bits}"
            return f"{bits} (K-{c.key_axis[0].upper()},V-{c.value_axis[0].upper()})"
        return f"KIVI-{c.k_bits}" if c.k_bits == c.v_bits else f"K{c.k_bits}V{c.v_bits}"

    def _block(self) -> int:
        """Tokens a per-channel store takes at a time: R, or one group without a residual."""
        return self.residual or self.group

    def _window(self, axis: str, rule: str) -> tuple[str, int]:
        """(window rule, residual) of a stream with groups along `axis`."""
        if self.residual:
            return rule, self.residual
        if axis == "channel":  # G-token groups flush when complete; the incomplete one stays full precision
            return "flush", self.group
        return "sliding", 0  # per-token groups are complete at once: every token leaves after its step

    def _store(self, batch, axis: str, bits: int):
        if axis == "channel":
            return self.channel_store(batch, self._block(), self.group, bits)
        return self.token_store(batch, self.group, bits)

    def make_layer(self, idx, batch, pad):
        c, s = self.cfg, self.shape
        k_rule, k_res = self._window(c.key_axis, "flush")
        v_rule, v_res = self._window(c.value_axis, self.value_window)
        keys = self.stream(batch, window=k_rule, residual=k_res, store=self._store(batch, c.key_axis, c.k_bits))
        values = self.stream(batch, window=v_rule, residual=v_res, store=self._store(batch, c.value_axis, c.v_bits))
        return KiviLayer(idx, keys, values, pad, s.kv_heads, s.head_dim,
                         before_attention=self.quantize_at == "before_attention")
