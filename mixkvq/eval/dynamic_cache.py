"""transformers' own DynamicCache as a run's cache (`attention.cache=dynamic`, method=bf16): the baseline that the
papers' speedups are measured against, run by the same protocol, with the same per-row records as this project's
caches.

The model attends with its own attention implementation (SDPA), steps run eagerly (transformers' path), and the
cache grows by concatenation at every step. Bits and bytes per row are those of dense keys and values in the model's
dtype, counted as a QuantizedCache counts them (tests/test_dynamic_cache.py: equal to the harness bf16 cache's
records); the peak is the largest number of bytes the cache's tensors held after a step (padding included).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache


class RecordedDynamicCache(DynamicCache):
    def __init__(self, config, pad: torch.Tensor):
        super().__init__(config=config)
        self.pad = pad.to("cpu", torch.int64)  # left padding per row
        self.width: int | None = None  # the prompts' padded width, seen at the prefill
        self.peak_allocated_bytes = 0
        self.stop_step = torch.full((len(pad),), -1, dtype=torch.int64)  # no row is ever stopped by the cache

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self.width is None:
            self.width = key_states.shape[-2]
        out = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if layer_idx == len(self.layers) - 1:
            self.peak_allocated_bytes = max(self.peak_allocated_bytes, self.allocated_bytes())
        return out

    def allocated_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers if getattr(layer, "keys", None) is not None
                   for t in (layer.keys, layer.values))

    def sequence_stats(self, n_generated: torch.Tensor) -> list[dict]:
        """Per row at its own end (a row that generated n tokens holds its prompt and n - 1 of them): dense bits
        and bytes, as `QuantizedCache.sequence_stats` reports them."""
        layer = next(layer for layer in self.layers if getattr(layer, "keys", None) is not None)
        _, heads, _, dim = layer.keys.shape
        size = layer.keys.element_size()
        out = []
        for b, n in enumerate(n_generated.tolist()):
            tokens = self.width - int(self.pad[b]) + max(n, 1) - 1
            elements = 2 * len(self.layers) * heads * dim * tokens
            bits = float(size * 8)
            out.append({"payload_bits_final": bits, "payload_bits_mean": bits, "storage_bits_final": bits,
                        "storage_bits_mean": bits, "kv_bytes_final": elements * size,
                        "kv_bytes_bf16_final": elements * 2, "budget_over_steps": 0})
        return out
