"""KVmix (METHODS.md §7): layer allocation, the RPC window, the 11-per-int32 3-bit layout, gradient profiling."""

from __future__ import annotations

import pytest
import torch

from baselines.kvmix import allocate, high_bit_count, kvmix_profile
from mixkvq.errors import ConfigError
from mixkvq.kv.quantizer import pack11, unpack11
from tiny import build, generate, random_prompts, tiny_model

H, D = 2, 128  # the shape `build` gives by default


def layer_bits(key: list[int], value: list[int]) -> str:
    """The override giving each layer its key and value bits (what calibration would choose)."""
    return f"method.layer_bits={{key:{key},value:{value}}}"


@pytest.mark.parametrize(
    "layers,rule,share,k,v",
    [
        (32, "repo", 0.2, 2.1875, 2.375),  # "k2.19v2.38": 6 of 32 layers
        (32, "paper", 0.3, 2.28125, 2.5625),  # "k2.28v2.56": 9 of 32 layers
        (28, "repo", 0.2, 2 + 4 / 28, 2 + 8 / 28),  # R1-Qwen-7B: 4 high-bit layers, K 2.14, V 2.29
        (48, "repo", 0.2, 2 + 8 / 48, 2 + 16 / 48),
        (32, "paper", 0.2, 2 + 6 / 32, 2 + 12 / 32),
    ],
)
def test_layer_bits_give_the_stated_averages(layers, rule, share, k, v):
    gen = torch.Generator().manual_seed(layers)
    ks, vs = torch.rand(layers, generator=gen).tolist(), torch.rand(layers, generator=gen).tolist()
    n = high_bit_count(layers, rule, share)
    keys, values = allocate(ks, n, 3, 2), allocate(vs, n, 4, 2)
    assert sum(keys) / layers == pytest.approx(k) and sum(values) / layers == pytest.approx(v)
    # The high-bit layers are the highest-scoring ones, chosen separately for K and V.
    top_k = sorted(range(layers), key=lambda i: -ks[i])[:n]
    assert {i for i, b in enumerate(keys) if b == 3} == set(top_k)
    assert {i for i, b in enumerate(values) if b == 4} == set(sorted(range(layers), key=lambda i: -vs[i])[:n])


def test_kvmix_nominal_bits_follow_the_allocation():
    m = build("kvmix", [layer_bits([3] * 6 + [2] * 26, [4] * 6 + [2] * 26)], layers=32)
    assert m.nominal_bits == "k2.19v2.38"


def _buffer_band(m, layer_idx, steps=400, prompt=300):
    layer = m.make_layer(layer_idx, 1, torch.zeros(1, dtype=torch.int64))
    gen = torch.Generator().manual_seed(0)
    layer.update(torch.randn(1, H, prompt, D, generator=gen), torch.randn(1, H, prompt, D, generator=gen))
    layer.after_attention()
    ks, vs = [], []
    for _ in range(steps):
        kc = int(layer.key_stream.window.lens[0]) + 1
        vc = int(layer.value_stream.window.lens[0]) + 1
        layer.update(torch.randn(1, H, 1, D, generator=gen), torch.randn(1, H, 1, D, generator=gen))
        # Released before attention: the buffer after update() already follows the rule.
        ks.append((kc, int(layer.key_stream.window.lens[0])))
        vs.append((vc, int(layer.value_stream.window.lens[0])))
        layer.after_attention()
    return layer, ks, vs


def _rule(c, r, g):
    keep = int(r * c)
    return c - ((c - keep) // g) * g


@pytest.mark.parametrize(
    "ratios,k_bits,v_bits,key_band,value_band",
    [
        ("paper", 3, 4, (2, 13), (7, 39)),  # 3-bit keys: G=11, r=0.2; 4-bit values: r=0.2, G=32
        ("paper", 2, 2, (3, 35), (3, 35)),  # 2-bit: r=0.1
        ("repo", 4, 4, (13, 45), (13, 45)),  # repo 4-bit: r=0.3
    ],
)
def test_rpc_window_cycles_in_the_stated_band(ratios, k_bits, v_bits, key_band, value_band):
    m = build("kvmix", [layer_bits([k_bits], [v_bits]), f"method.rpc_ratios={ratios}"])
    layer, ks, vs = _buffer_band(m, 0)
    r = {("paper", 4): 0.2, ("paper", 3): 0.2, ("paper", 2): 0.1, ("repo", 4): 0.3}
    kg = 11 if k_bits == 3 else 32
    for (c, after) in ks:
        assert after == _rule(c, r[(ratios, k_bits)], kg)
    for (c, after) in vs:
        assert after == _rule(c, r[(ratios, v_bits)], 32)
    # METHODS.md's band: from the fewest tokens left after a release to the most the buffer holds (c).
    for steps, band in ((ks[50:], key_band), (vs[50:], value_band)):
        assert (min(a for _, a in steps), max(c for c, _ in steps)) == band
    # Everything else is quantized, in whole groups.
    n = 300 + 400
    assert int(layer.key_stream.store.tokens()[0]) + int(layer.key_stream.window.lens[0]) == n
    assert int(layer.key_stream.store.tokens()[0]) % kg == 0


def test_prefill_keeps_r_of_the_prompt_plus_the_remainder():
    m = build("kvmix", [layer_bits([2], [2])])
    layer = m.make_layer(0, 1, torch.zeros(1, dtype=torch.int64))
    layer.update(torch.randn(1, H, 1000, D), torch.randn(1, H, 1000, D))
    assert int(layer.key_stream.window.lens[0]) == _rule(1000, 0.1, 32) == 100 + (900 % 32)


def test_three_bit_keys_pack_eleven_codes_per_word_with_a_two_bit_last_slot():
    gen = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 8, (5, 33), generator=gen, dtype=torch.uint8)
    words = pack11(codes)
    assert words.shape == (5, 3) and words.dtype == torch.int32
    back = unpack11(words, 33)
    expected = codes.clone()
    expected[:, 10::11] = expected[:, 10::11].clamp(max=3)
    assert torch.equal(back, expected)
    # Payload: 32/11 bits per element for 3-bit layers (METHODS.md §2); 11-token groups carry their own metadata.
    m = build("kvmix", [layer_bits([3], [2])])
    layer = m.make_layer(0, 1, torch.zeros(1, dtype=torch.int64))
    layer.update(torch.randn(1, H, 220, D), torch.randn(1, H, 220, D))
    store = layer.key_stream.store
    n = int(store.tokens()[0])
    assert n % 11 == 0 and n > 0
    assert float(store.code_bits[0]) == pytest.approx(n * H * D * 32 / 11)
    assert int(store.used.sum()) == (n // 11) * H * D  # one int32 word per channel per 11-token group
    g32 = build("kvmix", [layer_bits([3], [2]), "method.key3_format=g32"]).make_layer(0, 1,
                                                                                   torch.zeros(1, dtype=torch.int64))
    g32.update(torch.randn(1, H, 220, D), torch.randn(1, H, 220, D))
    assert int(g32.key_stream.store.tokens()[0]) % 32 == 0


def test_fake_and_packed_give_the_same_tokens_with_g32_keys_and_repo_ratios():
    # The default layout is in the method matrix (test_cache_contract.py); this is the other 3-bit key layout.
    over = [layer_bits([3, 2], [4, 2]), "method.key3_format=g32", "method.rpc_ratios=repo"]
    model = tiny_model("qwen2", dtype=torch.bfloat16, q_heads=4, kv_heads=2, head_dim=128)
    ids = torch.stack(random_prompts([90], seed=7))
    new = dict(max_new_tokens=120, min_new_tokens=120)
    packed, pc = generate(model, build("kvmix", over, model=model), ids, **new)
    fake, _ = generate(model, build("kvmix", over, model=model, storage="fake"), ids, **new)
    assert torch.equal(packed, fake)
    stats = pc.sequence_stats(torch.tensor([120]))[0]
    assert stats["payload_bits_final"] < 6 and stats["kv_bytes_final"] < 0.5 * stats["kv_bytes_bf16_final"]


def test_single_backward_profile_equals_the_repo_per_layer_loop():
    model = tiny_model("llama", layers=3)
    prompts = random_prompts([20, 31], seed=8)
    one = kvmix_profile(model, None, prompts, "single_backward")
    loop = kvmix_profile(model, None, prompts, "per_layer")
    torch.testing.assert_close(torch.tensor(one["key_scores"]), torch.tensor(loop["key_scores"]))
    torch.testing.assert_close(torch.tensor(one["value_scores"]), torch.tensor(loop["value_scores"]))
    assert all(s > 0 for s in one["key_scores"] + one["value_scores"])
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())  # nothing left behind


@pytest.mark.parametrize(
    "override,match",
    [("method.rpc_ratios=both", "rpc_ratios"), ("method.key3_format=g11", "key3_format"),
     ("method.high_bit_layers=top", "high_bit_layers"), ("method.high_bits.key=5", "high_bits.key"),
     ("method.layer_bits={key:[2],value:[2,2]}", "layer_bits")],
)
def test_impossible_settings_are_refused_by_name(override, match):
    with pytest.raises(ConfigError, match=match):
        build("kvmix", [layer_bits([3, 2], [4, 2]), override], layers=2)  # a later override wins


def test_missing_artifact_names_the_calibration_command(tmp_path):
    with pytest.raises(ConfigError, match="scripts/calibrate.py method=kvmix model=smollm2-135m"):
        build("kvmix", [f"method.calibration_dir={tmp_path}"], layers=30)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_profile_runs_on_cuda_with_the_cpu_numbers():
    """The scores accumulate on the host whatever the model's device (they once mixed devices and raised)."""
    model = tiny_model("llama", layers=2)
    prompts = random_prompts([20, 31], seed=8)
    cpu = kvmix_profile(model, None, prompts, "single_backward")
    gpu = kvmix_profile(model.cuda(), None, prompts, "single_backward")
    torch.testing.assert_close(torch.tensor(gpu["key_scores"]), torch.tensor(cpu["key_scores"]), rtol=1e-3, atol=0)
    torch.testing.assert_close(torch.tensor(gpu["value_scores"]), torch.tensor(cpu["value_scores"]), rtol=1e-3,
                               atol=0)
