"""bf16: the unquantized reference, run through the same cache, attention binding and decode path."""

from __future__ import annotations

from dataclasses import dataclass

from mixkvq.kv.cache import QuantizedLayer
from mixkvq.kv.methods import Method


@dataclass(frozen=True)
class Bf16Config:
    name: str
    nominal_bits: str


class Bf16(Method):
    config_cls = Bf16Config

    @property
    def nominal_bits(self) -> str:
        return self.cfg.nominal_bits

    def make_layer(self, idx, batch, pad):
        s = self.shape
        keys = self.stream(batch, window="keep")
        values = self.stream(batch, window="keep")
        return QuantizedLayer(idx, keys, values, pad, s.kv_heads, s.head_dim)
