"""Method semantics, driven step by step on cache layers without a model (METHODS.md §4.2, §5)."""

from __future__ import annotations

import pytest
import torch

from mixkvq.errors import ConfigError
from mixkvq.mixkvq import mean_code_bits, paper_tiers, salience
from mixkvq.quantizer import words_for
from mixkvq.storage import FULL_PRECISION
from tiny import build, generate, random_prompts, tiny_model

H, HQ, D = 2, 4, 128  # head_dim of every target model; the shape `build` gives by default


def step(layer, t: int, gen, queries=None):
    """One forward step of one layer: store new K/V, show the queries, attend (skipped), release."""
    b = len(layer.pad)
    k, v = torch.randn(b, H, t, D, generator=gen), torch.randn(b, H, t, D, generator=gen)
    q = torch.randn(b, HQ, t, D, generator=gen) if queries is None else queries
    layer.update(k, v)
    layer.observe_queries(q)
    layer.after_attention()
    return q


def windows(stream):
    return stream.window.lens.clone(), stream.store.tokens().clone()


@pytest.mark.parametrize("variant,value_rule", [("paper", "sliding"), ("pmkvq", "flush"), ("kvmix", "sliding")])
def test_kivi_windows_hold_the_specified_token_counts_at_every_step(variant, value_rule):
    m = build("kivi", [f"method.variant={variant}"])
    r = m.residual
    pad = torch.tensor([0, 37, 150])
    layer = m.make_layer(0, 3, pad)
    gen = torch.Generator().manual_seed(0)
    prompt = 200
    step(layer, prompt, gen)
    n = prompt - pad
    for i in range(2 * r + 7):
        kw, kq = windows(layer.key_stream)
        vw, vq = windows(layer.value_stream)
        # Keys: a modulo-R buffer; only whole R-blocks are ever quantized.
        assert torch.equal(kw, n % r), f"step {i}"
        assert torch.equal(kq, n - n % r)
        if value_rule == "sliding":  # the last R values stay full precision, the rest are quantized one by one
            assert torch.equal(vw, n.clamp_max(r)) and torch.equal(vq, n - n.clamp_max(r))
        else:
            assert torch.equal(vw, n % r) and torch.equal(vq, n - n % r)
        step(layer, 1, gen)
        n = n + 1


@pytest.mark.parametrize("key_axis,value_axis", [("channel", "token"), ("token", "token"), ("channel", "channel"),
                                                  ("token", "channel")])
def test_kivi_without_residual_quantizes_every_group_once_complete(key_axis, value_axis):
    # KIVI Table 1/3 rows (METHODS.md §4.7 item 6): no full-precision residual. Per-token groups are complete at
    # once, so their tokens are all quantized after each step; per-channel groups wait for G tokens.
    over = ["method.residual_length=0", f"method.key_axis={key_axis}", f"method.value_axis={value_axis}"]
    m = build("kivi", [*over, *(["method.value_window=flush"] if value_axis == "channel" else [])])
    g = m.group
    pad = torch.tensor([0, 37, 150])
    layer = m.make_layer(0, 3, pad)
    gen = torch.Generator().manual_seed(0)
    step(layer, 200, gen)
    n = 200 - pad
    for i in range(2 * g + 7):
        for stream, axis in ((layer.key_stream, key_axis), (layer.value_stream, value_axis)):
            w, q = windows(stream)
            waiting = n % g if axis == "channel" else torch.zeros_like(n)  # the incomplete group, full precision
            assert torch.equal(w, waiting) and torch.equal(q, n - waiting), f"step {i} {axis}"
        step(layer, 1, gen)
        n = n + 1
    assert m.nominal_bits == f"2bit (K-{key_axis[0].upper()},V-{value_axis[0].upper()})"


@pytest.mark.parametrize("storage", ["packed", "fake"])
def test_kivi_without_residual_generates_with_every_token_quantized(storage):
    model = tiny_model("llama", q_heads=4, kv_heads=2, head_dim=64)
    ids = torch.stack(random_prompts([45], seed=9))
    m = build("kivi", ["method.residual_length=0"], model=model, storage=storage)
    out, cache = generate(model, m, ids, max_new_tokens=20, min_new_tokens=20)
    for layer in cache.layers:
        keys, values = layer.key_stream, layer.value_stream
        assert int(keys.window.lens[0]) == (45 + 19) % 32 and int(values.window.lens[0]) == 0
        assert int(values.store.tokens()[0]) == 45 + 19
    stats = cache.sequence_stats(torch.tensor([20]))[0]
    assert stats["payload_bits_final"] < 2 + 14 * 32 / (45 + 19) / 2  # only the waiting key group is at 16 bits


def _kivi_step_state(variant: str, prompt: int):
    """A KIVI layer after a `prompt`-token prefill and the next step's update, before that step's attention."""
    from kernels.reference import stream_tokens

    m = build("kivi", [f"method.variant={variant}"])
    layer = m.make_layer(0, 1, torch.zeros(1, dtype=torch.int64))
    gen = torch.Generator().manual_seed(4)
    step(layer, prompt, gen)
    k, v = torch.randn(1, H, 1, D, generator=gen), torch.randn(1, H, 1, D, generator=gen)
    layer.update(k, v)
    return layer, stream_tokens(layer, "key_stream").data[0, :, -1], k[0, :, 0], m.residual


@pytest.mark.parametrize("variant", ["pmkvq", "paper"])
def test_kivi_pmkvq_variant_quantizes_the_group_the_new_token_completes_before_attending(variant):
    # PM-KVQ's KIVI baseline (its kivi_modeling_qwen2.py): when the new token completes a 128-token group, the
    # group, that token included, is quantized before the step's attention. KIVI's own code attends first.
    layer, attended, exact, r = _kivi_step_state(variant, 2 * 128 - 1)
    keys = layer.key_stream
    if variant == "pmkvq":
        assert int(keys.window.lens[0]) == 0 and int(keys.store.tokens()[0]) == 2 * r
        assert int(layer.value_stream.window.lens[0]) == 0  # values flush with the keys in this variant
        assert not torch.equal(attended, exact)  # the step attends over the quantized new key
    else:
        assert int(keys.window.lens[0]) == 128 and int(keys.store.tokens()[0]) == 128  # R = 128: the full window
        assert torch.equal(attended, exact)  # the new key is attended at full precision
    layer.after_attention()  # after the step both variants hold the same split
    assert int(keys.window.lens[0]) == 2 * 128 % r and int(keys.store.tokens()[0]) == 2 * 128 - 2 * 128 % r


def test_kivi_pmkvq_variant_keeps_full_precision_until_the_group_is_complete():
    layer, attended, exact, _ = _kivi_step_state("pmkvq", 128)  # the new token starts the next group
    assert int(layer.key_stream.window.lens[0]) == 1 and torch.equal(attended, exact)


def test_mixkvq_accumulators_see_every_real_query():
    m = build("mixkvq")
    pad = torch.tensor([0, 5])
    layer = m.make_layer(0, 2, pad)
    gen = torch.Generator().manual_seed(1)
    expected = torch.zeros(2, HQ, D)
    q = step(layer, 40, gen)
    expected[0] += q[0].abs().sum(dim=1)
    expected[1] += q[1, :, 5:].abs().sum(dim=1)  # queries at pad positions are not seen
    for _ in range(150):
        q = step(layer, 1, gen)
        expected += q.abs().sum(dim=2)
    assert layer.q_count.tolist() == [190, 185]
    torch.testing.assert_close(layer.q_abs_sum, expected)


def _flush_one_block(m, queries, keys):
    layer = m.make_layer(0, 1, torch.zeros(1, dtype=torch.int64))
    layer.update(keys, torch.randn_like(keys))
    layer.observe_queries(queries)
    layer.after_attention()
    return layer


def test_mixkvq_threshold_tiers_follow_salience():
    gen = torch.Generator().manual_seed(2)
    m = build("mixkvq", ["method.tier_rule=threshold", "method.tau_bf16=3.0", "method.tau_uint4=1.2"])
    q = torch.randn(1, HQ, 128, D, generator=gen)
    q[:, :, :, [3, 17]] *= 30  # query-heavy channels
    k = torch.randn(1, H, 128, D, generator=gen)
    k[:, :, :, [40]] *= 30  # a wide key channel with ordinary queries
    layer = _flush_one_block(m, q, k)
    widths = layer.key_stream.store.widths[0, :, 0]  # [H, D]
    importance = q.abs().mean(dim=2).reshape(H, HQ // H, D).mean(dim=1)
    a = salience(importance, k[0], None, None, 2, "mean")
    assert torch.equal(widths, paper_tiers(a, 3.0, 1.2))
    assert bool((widths[:, [3, 17]] == FULL_PRECISION).all())  # salience = |Q| x range, not range alone
    # Every full-precision channel is more salient than every 4-bit one, and those than every 2-bit one.
    for h in range(H):
        order = {FULL_PRECISION: 2, 4: 1, 2: 0}
        rank = torch.tensor([order[int(w)] for w in widths[h]])
        for lo in range(2):
            if (rank == lo).any() and (rank > lo).any():
                assert a[h][rank > lo].min() > a[h][rank == lo].max()


@pytest.mark.parametrize("target", [2.3, 2.7, 3.4])
def test_mixkvq_target_bits_rule_hits_the_requested_average(target):
    m = build("mixkvq", [f"method.target_bits={target}"])
    layer = m.make_layer(0, 2, torch.tensor([0, 3]))
    gen = torch.Generator().manual_seed(3)
    step(layer, 300, gen)
    for _ in range(300):
        step(layer, 1, gen)
    store = layer.key_stream.store
    widths = store.block_widths()[:, :, : int(store.nblocks.min())]
    key_bits = mean_code_bits(widths)  # per (row, head, block)
    budget = 2 * target - 2  # mean code bits over K and V, values at 2 bits
    assert bool((key_bits <= budget + 1e-9).all())
    assert bool((key_bits > budget - (16 - 2) / D).all())  # within one channel's step of the target
    assert FULL_PRECISION in widths.unique().tolist() or target < 3


def _kivi_bytes(n: torch.Tensor, r: int, g: int, bits: int, fp: int, meta: int) -> torch.Tensor:
    kq, kw = n - n % r, n % r
    vw = n.clamp_max(r)
    vq = n - vw
    keys = H * D * (kq * bits // 8 + (kq // g) * 2 * meta) + kw * H * D * fp
    values = vq * H * (D * bits // 8 + (D // g) * 2 * meta) + vw * H * D * fp
    return keys + values


@pytest.mark.parametrize("bits", [2, 4])
def test_kivi_byte_accounting_matches_an_independent_count(bits):
    m = build("kivi", [f"method.k_bits={bits}", f"method.v_bits={bits}"])
    layer = m.make_layer(0, 2, torch.tensor([0, 9]))
    gen = torch.Generator().manual_seed(4)
    step(layer, 170, gen)
    for _ in range(100):
        step(layer, 1, gen)
    n = torch.tensor([270, 261])
    expected = _kivi_bytes(n, 128, 32, bits, fp=4, meta=4)
    assert torch.equal(layer.live_bytes(), expected)
    assert layer.allocated_bytes() >= int(expected.sum())
    assert torch.equal(layer.code_bits(), (n - n % 128 + n - n.clamp_max(128)) * H * D * bits
                       + (n % 128 + n.clamp_max(128)) * H * D * 32.0)


def test_mixkvq_byte_accounting_matches_an_independent_count():
    m = build("mixkvq")
    layer = m.make_layer(0, 1, torch.zeros(1, dtype=torch.int64))
    gen = torch.Generator().manual_seed(5)
    step(layer, 300, gen)
    store = layer.key_stream.store
    widths = store.block_widths()[0]  # [H, NB, D]
    full_words = 128 * 32 // 32  # fp32 test model: one word per token
    words = sum(full_words if int(w) == FULL_PRECISION else words_for(128, int(w)) for w in widths.flatten())
    per_block_meta = 2 * D * (128 // 32) * 4 + D + 8  # scales + zeros (fp32) + width map + pool offset
    keys = words * 4 + H * widths.shape[1] * per_block_meta + (300 % 128) * H * D * 4
    values = 256 * H * (D * 2 // 8 + (D // 32) * 2 * 4) + (300 % 128) * H * D * 4
    assert int(layer.live_bytes()[0]) == keys + values
    # The pool really holds that many words: live words equal what was written.
    assert int(store.used.sum()) == words


def test_allocated_bytes_count_every_tensor_of_the_packed_cache():
    m = build("mixkvq", ["method.sink_tokens=8"])
    layer = m.make_layer(0, 1, torch.zeros(1, dtype=torch.int64))
    step(layer, 260, torch.Generator().manual_seed(6))
    seen, total = set(), 0

    def walk(obj):
        # Storage tensors are [B, H, ...] with at least 3 dims; 1-D/2-D tensors are host-side length counters.
        nonlocal total
        for value in vars(obj).values():
            if isinstance(value, torch.Tensor):
                if value.dim() >= 3 and id(value) not in seen:
                    seen.add(id(value))
                    total += value.numel() * value.element_size()
            elif type(value).__module__ in ("mixkvq.storage", "mixkvq.ragged"):
                walk(value)

    for stream in (layer.key_stream, layer.value_stream):
        walk(stream)
    assert layer.allocated_bytes() == total


@pytest.mark.parametrize(
    "name,override,match",
    [
        ("kivi", "method.k_bits=5", "k_bits"),
        ("kivi", "method.group_size=48", "group_size"),
        ("kivi", "method.residual_length=-32", "residual_length"),
        ("kivi", "method.quantize_at=never", "quantize_at"),
        ("kivi", "method.variant=vllm", "vllm"),
        ("mixkvq", "method.key_group_size=96", "key_group_size"),
        ("mixkvq", "method.target_bits=1.5", "target_bits"),
        ("mixkvq", "method.thresholds=search", "calibration"),
        ("mixkvq", "method.value_bits=6", "value_bits"),
    ],
)
def test_impossible_settings_are_refused_by_name(name, override, match):
    with pytest.raises(ConfigError, match=match):
        build(name, [override])


def test_unknown_method_lists_the_valid_ones():
    from mixkvq.methods import method_config

    with pytest.raises(ConfigError, match="bf16.*kivi.*mixkvq"):
        method_config({"name": "kvquant"})
