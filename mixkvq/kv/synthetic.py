"""Random cache states for benchmarks: long contexts at large batch without a token-by-token prefill.

Keys and values go through the layer's own streams (append, then the window rule's release into the store), so
the stored codes, metadata, windows and byte counts are exactly what a real prefill of that length leaves; only
the values are random. Decode cost does not depend on them. Keys get per-channel offsets and scales, as real
post-RoPE keys do, so MixKVQ's salience picks a realistic mix of tiers.
"""

from __future__ import annotations

import torch

from mixkvq.kv.ragged import Ragged


def random_kv(batch: int, heads: int, tokens: int, dim: int, dtype, device, gen: torch.Generator,
              channel_scale: torch.Tensor) -> torch.Tensor:
    x = torch.randn(batch, heads, tokens, dim, device=device, generator=gen, dtype=torch.float32)
    return (x * channel_scale).to(dtype)


def fill_layer(layer, context: int, q_heads: int, gen: torch.Generator, chunk: int = 4096) -> None:
    """Store `context` random tokens in every row of `layer`, `chunk` tokens at a time, as a prefill would."""
    batch, heads, dim = len(layer.pad), layer.heads, layer.dim
    data = layer.key_stream.window.data
    dtype, device = data.dtype, data.device
    channel_scale = 0.5 + 4 * torch.rand(heads, 1, dim, device=device, generator=gen)
    # A query so that query-aware methods (MixKVQ) have importance statistics before their first flush.
    layer.observe_queries(torch.randn(batch, q_heads, 1, dim, device=device, generator=gen).to(dtype))
    done = 0
    while done < context:
        n = min(chunk, context - done)
        lens = torch.full((batch,), n, dtype=torch.int64)
        for stream in (layer.key_stream, layer.value_stream):
            stream.append(Ragged(random_kv(batch, heads, n, dim, dtype, device, gen, channel_scale), lens))
        if layer.releases_before_attention:  # as `update` releases for methods that quantize before attention
            layer.key_stream.release()
            layer.value_stream.release()
        layer.after_attention()
        done += n
    layer.seq_len = context
    layer.is_prefill = False


def fill_cache(cache, context: int, q_heads: int, seed: int = 0, chunk: int = 4096) -> None:
    gen = torch.Generator(device=cache.layers[0].key_stream.window.data.device).manual_seed(seed)
    for layer in cache.layers:
        fill_layer(layer, context, q_heads, gen, chunk)
