"""`attention.cache=dynamic`: transformers' DynamicCache run by the same protocol as the harness caches
(mixkvq/eval/dynamic_cache.py), for the baseline of the throughput benchmarks."""

from __future__ import annotations

import pytest

from mixkvq.eval.protocol import generate_batch
from test_batched_generation import GEN, loaded, prompts  # noqa: F401  (fixtures)
from test_models import qwen7b_dir  # noqa: F401  (fixture)
from tiny import build


def test_dynamic_cache_rows_match_the_harness_bf16_rows(loaded, prompts):  # noqa: F811
    method = build("bf16", model=loaded.model)
    args = (loaded.model, loaded.tokenizer, method, prompts, 1, {**GEN, "max_new_tokens": 12, "min_new_tokens": 12},
            0, "auto")
    harness = generate_batch(*args)
    dynamic = generate_batch(*args, cache_impl="dynamic")
    for h, d in zip(harness, dynamic):
        assert d.token_ids == h.token_ids  # greedy: the same model, the same tokens
        assert d.decode_kernels == "sdpa" and d.graph_counts is None
        for hs, ds in zip(h.cache_stats, d.cache_stats):  # the same bits and bytes per row (prompts of 3 lengths)
            assert ds == pytest.approx(hs), (ds, hs)
    # the padded [rows, heads, width + 11 tokens, dim] keys and values of every layer
    cache = dynamic[0].cache
    c = loaded.model.config
    rows, width = len(prompts), cache.width
    dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    assert cache.peak_allocated_bytes == 2 * c.num_hidden_layers * rows * c.num_key_value_heads * (width + 11) * dim * 4


def test_dynamic_cache_is_for_bf16_only():
    from mixkvq.config import load_config
    from mixkvq.errors import ConfigError
    from mixkvq.eval.preflight import check_static

    check_static(load_config(["method=bf16", "attention.cache=dynamic"]))
    with pytest.raises(ConfigError, match="attention.cache=dynamic"):
        check_static(load_config(["method=kivi", "attention.cache=dynamic"]))
    with pytest.raises(ConfigError, match="attention.cache"):
        check_static(load_config(["attention.cache=static"]))
