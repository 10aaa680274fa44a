"""The benchmarks' synthetic fill (mixkvq/kv/synthetic.py): a long context stored as each method stores a prefill of
that length, for every method of the matrix (a fill that left tokens in the window would time full-precision
attention and count full-precision bytes)."""

from __future__ import annotations

import torch

from mixkvq.kv.synthetic import fill_layer
from tiny import model_shape


def test_the_fill_stores_a_long_context_as_the_method_does(method_case):
    method = method_case.build(model_shape(layers=2, dtype=torch.bfloat16))
    cache = method.new_cache(2)
    for layer in cache.layers:
        fill_layer(layer, 1024, 4, torch.Generator().manual_seed(0))
        assert bool((layer.key_stream.tokens() == 1024).all()) and bool((layer.value_stream.tokens() == 1024).all())
        if method_case.quantized:
            for stream in (layer.key_stream, layer.value_stream):
                assert int(stream.store.tokens().min()) >= 1024 - 256, (method_case.config, stream.window.lens)
