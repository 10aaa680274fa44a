"""scripts/bench_decode_e2e.py's decode loop on CPU: a harness cache filled by the synthetic path, then decode steps
through `bind` and `graphed` (graphs are impossible on CPU, so the steps run eagerly and no counts come back), with
positions fed as a graph would take them. The GPU runs the same function with graphs."""

from __future__ import annotations

import torch

from mixkvq.kv.synthetic import fill_cache
from tiny import build, load_script, tiny_model


def test_decode_steps_run_the_harness_cache_and_advance_it():
    bench = load_script("bench_decode_e2e")
    model = tiny_model("qwen2", layers=2, q_heads=4, kv_heads=2, head_dim=64)
    cache = build("kivi", model=model).new_cache(2, capacity=300 + bench.WARMUP + 3)
    fill_cache(cache, 300, model.config.num_attention_heads, chunk=128)
    seconds, counts = bench.decode_steps(model, cache, batch=2, steps=3)
    assert seconds > 0 and counts is None  # CPU: eager steps, no graph counts
    assert cache.get_seq_length() == 300 + bench.WARMUP + 3
    assert int(cache.layers[0].tokens().min()) == 300 + bench.WARMUP + 3  # every step's token went into the cache


def test_decode_steps_time_dynamic_cache_eagerly():
    from transformers import DynamicCache

    bench = load_script("bench_decode_e2e")
    model = tiny_model("qwen2", layers=2, q_heads=4, kv_heads=2, head_dim=64)
    cache = DynamicCache(config=model.config)
    for i in range(2):
        kv = torch.randn(2, 2, 40, 64)
        cache.update(kv, kv.clone(), i)
    seconds, counts = bench.decode_steps(model, cache, batch=2, steps=2)
    assert seconds > 0 and counts is None and cache.get_seq_length() == 40 + bench.WARMUP + 2
