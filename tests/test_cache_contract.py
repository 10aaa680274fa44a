"""Contract of the cache framework on tiny models built from config (greedy, CPU), over every method of the
matrix in tests/method_cases.py."""

from __future__ import annotations

import pytest
import torch

from method_cases import METHOD_CASES
from tiny import FAMILIES, build, generate, generate_dynamic, left_pad, model_shape, random_prompts, tiny_model

# Long enough that KIVI and MixKVQ flush several R=128 blocks and the value window slides.
LONG = dict(max_new_tokens=300, min_new_tokens=300)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model(request):
    return tiny_model(request.param)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_bf16_method_matches_dynamic_cache(family):
    model = tiny_model(family)
    ids = torch.stack(random_prompts([37, 37], seed=1))
    new = dict(max_new_tokens=150, min_new_tokens=150)  # the bf16 store doubles twice; it has nothing to flush
    expected = generate_dynamic(model, ids, **new)
    out, _ = generate(model, build("bf16", model=model), ids, **new)
    assert torch.equal(out, expected)


def test_every_registered_method_has_a_case():
    from mixkvq.kv.methods import METHODS

    covered = {case.build(model_shape(layers=2)).cfg.name for case in METHOD_CASES.values()}
    missing = sorted(set(METHODS.names()) - covered)
    assert not missing, f"registered methods without a row in tests/method_cases.py: {missing}"


@pytest.fixture(scope="module")
def bf16_gqa_model():
    return tiny_model("qwen2", dtype=torch.bfloat16, q_heads=8, kv_heads=2)  # GQA ratio 4


def test_fake_and_packed_storage_give_the_same_tokens(bf16_gqa_model, method_case):
    # A bf16 model, as every target model: fake storage rounds through the same bf16 scales and zeros as packed.
    model = bf16_gqa_model
    ids = torch.stack(random_prompts([140], seed=6))
    new = dict(max_new_tokens=150, min_new_tokens=150)
    packed, pc = generate(model, method_case.build(model, "packed"), ids, **new)
    fake, fc = generate(model, method_case.build(model, "fake"), ids, **new)
    assert torch.equal(packed, fake)
    assert pc.storage == "packed" and fc.storage == "fake"
    if method_case.quantized:
        # The quantized store really holds tokens: this is not the bf16 path in disguise.
        for layer in pc.layers:
            assert int(layer.key_stream.store.tokens()[0]) >= method_case.min_stored
        stats = pc.sequence_stats(torch.tensor([150]))[0]
        # bf16 cache of the same tokens: 16 bits per element. Quantized storage must be well below it.
        assert stats["storage_bits_final"] < 12
        assert stats["kv_bytes_final"] < 0.75 * stats["kv_bytes_bf16_final"]


def test_left_padded_batch_matches_prompts_run_one_by_one(method_case):
    model = tiny_model("llama")
    prompts = random_prompts([20, 161, 90], seed=3)
    ids, mask = left_pad(prompts)
    method = method_case.build(model)
    batched, cache = generate(model, method, ids, mask, **LONG)
    width = ids.shape[1]
    for i, p in enumerate(prompts):
        alone, _ = generate(model, method, p[None], **LONG)
        assert torch.equal(batched[i, width:], alone[0, len(p):]), f"row {i} differs"
    # Pads are never stored: each row holds exactly its real prompt plus the generated tokens it fed back.
    expected = torch.tensor([len(p) for p in prompts]) + LONG["max_new_tokens"] - 1
    for layer in cache.layers:
        assert torch.equal(layer.key_stream.tokens(), expected)
        assert torch.equal(layer.value_stream.tokens(), expected)


@pytest.mark.parametrize("name", ["bf16", "mixkvq"])
def test_lengths_and_masks_stay_consistent_through_prefill_and_decode(model, name):
    prompts = random_prompts([12, 30], seed=4)
    ids, mask = left_pad(prompts)
    out, cache = generate(model, build(name, model=model), ids, mask, max_new_tokens=9, min_new_tokens=9)
    # transformers counts the rectangular length (pads included); the cache agrees at every layer.
    assert all(layer.get_seq_length() == ids.shape[1] + 8 for layer in cache.layers)
    assert cache.get_seq_length() == out.shape[1] - 1
    assert cache.get_mask_sizes(1, 0) == (out.shape[1], 0)
    assert len(cache.snapshots) == 9  # one prefill + 8 decode steps


def test_sampling_with_num_return_sequences(model):
    ids = torch.stack(random_prompts([25], seed=5))
    out, cache = generate(model, build("mixkvq", model=model), ids, do_sample=True, temperature=0.6, top_p=0.95,
                          num_return_sequences=3, max_new_tokens=140, min_new_tokens=140)
    assert out.shape == (3, 25 + 140)
    assert torch.equal(out[:, :25], ids.expand(3, -1))
    assert len({tuple(row) for row in out[:, 25:].tolist()}) == 3  # three samples, not one copied
    for layer in cache.layers:  # every row holds its 164 fed tokens, the first R=128 of them quantized
        assert layer.key_stream.tokens().tolist() == [164] * 3
        assert layer.key_stream.store.tokens().tolist() == [128] * 3
    # fp32 model: the 36 window tokens are at 32 bits, yet the row is well below a bf16 cache of the same tokens
    stats = cache.sequence_stats(torch.full((3,), 140))
    assert all(s["kv_bytes_final"] < 0.75 * s["kv_bytes_bf16_final"] for s in stats)


def test_generate_outside_bind_fails_clearly(model):
    method = build("kivi", model=model)
    cache = method.new_cache(1)
    model.set_attn_implementation("quantized_kv")
    try:
        with pytest.raises(RuntimeError, match="bind"):
            model.generate(torch.ones(1, 4, dtype=torch.int64), past_key_values=cache, max_new_tokens=2)
    finally:
        model.set_attn_implementation("sdpa")
