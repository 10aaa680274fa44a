"""Capacity without slack: a cache reserved for prompt + max_new_tokens allocates its stores once, holds what
DynamicCache holds (bf16), and decodes exactly the tokens of a cache that grows as it goes."""

from __future__ import annotations

import pytest
import torch

from mixkvq.kv.attention import bind
from tiny import build, generate_dynamic, random_prompts, tiny_model

NEW = 300  # KIVI and MixKVQ flush two 128-token blocks after a 40-token prompt


@pytest.fixture(scope="module")
def model():
    return tiny_model("qwen2")


def run(model, method, ids, capacity=None):
    cache = method.new_cache(len(ids), capacity=capacity)
    with bind(model, cache, "auto"), torch.no_grad():
        out = model.generate(ids, past_key_values=cache, pad_token_id=0, do_sample=False, max_new_tokens=NEW,
                             min_new_tokens=NEW)
    return out, cache


def store_bytes(cache) -> int:
    return sum(s.store.allocated_bytes() for layer in cache.layers for s in (layer.key_stream, layer.value_stream))


def test_bf16_holds_what_dynamic_cache_holds(model):
    ids = torch.stack(random_prompts([40, 40], seed=1))
    capacity = ids.shape[1] + NEW
    out, cache = run(model, build("bf16", model=model), ids, capacity)
    assert torch.equal(out, generate_dynamic(model, ids, max_new_tokens=NEW, min_new_tokens=NEW))
    c = model.config
    # DynamicCache at the end: every layer's keys and values for the tokens fed back (the last one is not).
    dynamic = c.num_hidden_layers * 2 * len(ids) * c.num_key_value_heads * (capacity - 1) * c.head_dim * 4
    assert dynamic <= cache.allocated_bytes() <= 1.02 * dynamic


@pytest.mark.parametrize("name", ["kivi", "kivi4", "mixkvq"])
def test_reserved_cache_decodes_the_same_tokens(model, name):
    ids = torch.stack(random_prompts([40], seed=2))
    method = build(name, model=model)
    grown, grown_cache = run(model, method, ids)
    reserved, cache = run(model, method, ids, capacity=ids.shape[1] + NEW)
    assert torch.equal(grown, reserved)
    assert int(cache.layers[0].key_stream.store.tokens()[0]) >= 256  # blocks were really flushed into the store
    if name != "mixkvq":  # uniform widths: the reservation is exactly what the stores hold at the end
        before = store_bytes(method.new_cache(1, capacity=ids.shape[1] + NEW))
        assert store_bytes(cache) == before
        assert store_bytes(cache) < store_bytes(grown_cache)  # doubling leaves slack the reservation does not


def test_mixed_width_pool_grows_by_extrapolation_not_doubling(model):
    ids = torch.stack(random_prompts([40], seed=3))
    capacity = ids.shape[1] + 4 * NEW
    method = build("mixkvq", model=model)
    cache = method.new_cache(1, capacity=capacity)
    store = cache.layers[0].key_stream.store
    with bind(model, cache, "auto"), torch.no_grad():
        model.generate(ids, past_key_values=cache, pad_token_id=0, do_sample=False, max_new_tokens=NEW,
                       min_new_tokens=NEW)
    blocks = int(store.nblocks.max())
    used = int(store.used.max())
    # After the first flush the pool is sized for every reserved block at the words per block seen so far,
    # so it holds room for the rest of the sequence rather than twice what it holds.
    assert blocks == 2
    assert store.pool.shape[2] > 2 * used  # doubling would hold at most twice what is used
    assert store.scale.shape[2] == store.reserved_blocks == -(-capacity // store.p)
