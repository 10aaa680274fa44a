"""The registered attention function, its mask function, and the explicit bind of cache layers to modules.

transformers calls the attention function with the module, the query and whatever `Cache.update` returned,
but not the cache. `bind(model, cache)` attaches each cache layer to its attention module for the duration
of a `generate` call and detaches it afterwards: no monkey-patching, no reliance on forward kwargs.

Prefill attends over the exact prompt K/V through SDPA. Decode attends over the layer's stores through the
decode kernel picked once at bind time (`attention.decode_kernel`).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from kernels import resolve_decode_kernel
from mixkvq.eval.placement import execution_devices
from mixkvq.kv.cache import QuantizedCache

ATTENTION_NAME = "quantized_kv"


def quantized_kv_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    layer = getattr(module, "kv_cache_layer", None)
    if layer is None:
        raise RuntimeError(f"attention '{ATTENTION_NAME}' needs a bound cache: run generate inside `bind(model, cache)`")
    layer.observe_queries(query)
    if layer.is_prefill:
        out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                        **kwargs)
    else:
        out = layer.decode_fn(module, query, layer, scaling)
        if layer.probe is not None:
            layer.probe.on_decode(module, query, scaling, out)
    layer.after_attention()
    layer.cache.step_done(layer.layer_idx)
    return out, None


def quantized_kv_mask(*args, q_length: int, **kwargs):
    # Decode reads each row's length from the cache, so a one-token query needs no mask; prefill masks as SDPA does.
    if q_length == 1:
        return None
    return sdpa_mask(*args, q_length=q_length, **kwargs)


AttentionInterface.register(ATTENTION_NAME, quantized_kv_attention)
AttentionMaskInterface.register(ATTENTION_NAME, quantized_kv_mask)


def attention_modules(model) -> list[torch.nn.Module]:
    mods = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "k_proj") and hasattr(m, "scaling")]
    return sorted(mods, key=lambda m: m.layer_idx)


@contextmanager
def bind(model, cache: QuantizedCache, decode_kernel: str = "auto"):
    """Attach cache layers to attention modules and switch the model to the quantized-KV attention."""
    mods = attention_modules(model)
    if len(mods) != len(cache.layers):
        raise ValueError(f"model has {len(mods)} attention layers but the cache has {len(cache.layers)}")
    devices = execution_devices(model, mods)  # layers spread over devices: each kernel runs where its layer does
    for mod, layer, device in zip(mods, cache.layers, devices):
        held = layer.key_stream.window.data.device
        if held != device:
            raise ValueError(f"cache layer {layer.layer_idx} lives on {held} but the model runs that layer on "
                             f"{device}; build the cache from ModelShape.of(model) of this placement")
    previous = model.config._attn_implementation
    for mod, layer, device in zip(mods, cache.layers, devices):
        layer.query_groups = getattr(mod, "num_key_value_groups", None)  # what a kernel may need to know of GQA
        layer.decode_fn, layer.cache = resolve_decode_kernel(decode_kernel, device, layer), cache
        mod.kv_cache_layer = layer
    model.set_attn_implementation(ATTENTION_NAME)
    try:
        yield cache
    finally:
        model.set_attn_implementation(previous)
        for mod in mods:
            del mod.kv_cache_layer
