"""PM-KVQ (METHODS.md §6): the equivalent right shift, progressive budgets, the integer program, the key scales."""

from __future__ import annotations

import json
import random

import pytest
import torch

from mixkvq.eval.models import model_config

from baselines.pmkvq import brute_force_allocation, fold_key_scales, solve_allocation
from baselines.pmkvq_store import ProgressiveTokenStore, shrink_codes
from mixkvq.calib.artifacts import load_artifact, save_artifact
from mixkvq.errors import ConfigError
from mixkvq.kv.methods import ModelShape
from mixkvq.kv.quantizer import QuantSpec, quantize
from mixkvq.kv.ragged import Ragged
from tiny import build, generate, random_prompts, tiny_model

H, D = 2, 128
SHAPE = ModelShape(layers=2, kv_heads=H, q_heads=4, head_dim=D, dtype=torch.bfloat16, device=torch.device("cpu"))
SPEC = QuantSpec("half_even", "clamp", 1e-5, torch.bfloat16)
NO_ARTIFACT = ["method.allocation=uniform", "method.reparameterize=false"]


@pytest.mark.parametrize("b", [8, 4, 2])
def test_equivalent_right_shift_is_dequantize_then_requantize_for_every_code(b):
    gen = torch.Generator().manual_seed(b)
    codes = torch.arange(1 << 2 * b)
    for _ in range(5):  # any zero point and scale: the identity is exact in float64
        zero, scale = float(torch.randn(1, generator=gen)) * 3, float(torch.rand(1, generator=gen)) + 1e-3
        x = zero + codes.double() * scale  # dequantize at 2b bits
        new_scale = ((1 << b) + 1) * scale  # S_b = (2^b + 1)·S_2b, Z_b = Z_2b
        requant = torch.round((x - zero) / new_scale).clamp(0, (1 << b) - 1).long()
        assert torch.equal(shrink_codes(codes, b, "equivalent"), requant)
    # The repo's integer form gives the same codes.
    t = ((codes << 2 * b) - (codes << b) + codes + ((1 << 3 * b - 1) - (1 << 2 * b - 1) + (1 << b - 1))) >> 3 * b
    assert torch.equal(shrink_codes(codes, b, "equivalent"), t & ((1 << b) - 1))
    # The top code maps to the top code: the range is kept.
    assert int(shrink_codes(codes[-1:], b, "equivalent")) == (1 << b) - 1


@pytest.mark.parametrize("rule", ["equivalent", "direct", "modified"])
def test_packed_shrink_equals_fake_requantization_down_the_whole_ladder(rule):
    gen = torch.Generator().manual_seed(1)
    stores = {p: ProgressiveTokenStore(2, H, D, 128, 16, torch.bfloat16, "cpu", SPEC, p) for p in (True, False)}
    x = (torch.randn(2, H, 40, D, generator=gen) * 4).to(torch.bfloat16)
    x[..., 5] *= 30  # an outlier channel
    for s in stores.values():
        s.append(Ragged(x, torch.tensor([40, 23])))
    for bits in (8, 4, 2):
        versions = {p: s.version for p, s in stores.items()}
        for s in stores.values():
            s.shrink(torch.tensor([0, 1]), rule)
        packed, fake = stores[True].ragged(), stores[False].ragged()
        assert torch.equal(packed.data[0], fake.data[0]) and torch.equal(packed.data[1, :, :23], fake.data[1, :, :23])
        assert all(s.version == versions[p] + 1 for p, s in stores.items())  # the reference re-reads the store
        assert stores[True].row_bits.tolist() == [bits, bits] and stores[True].bits == bits
        # The container narrows with the width: words_for(D, b) int32 words per token.
        assert stores[True].codes.data.shape[-1] == D * bits // 32
        err = (packed.data[0].float() - x[0].float()).abs().max()
        assert err > 0
    # Codes really were shifted, not requantized from fresh min/max: the shift keeps the zero point.
    codes16, _, zero16 = quantize(x.reshape(2, H, 40, 1, D), 16, SPEC)
    assert torch.equal(stores[True].zero.data[0], zero16[0])


def test_rows_shrink_independently_and_bytes_follow_each_row():
    store = ProgressiveTokenStore(2, H, D, 128, 16, torch.bfloat16, "cpu", SPEC, True)
    x = torch.randn(2, H, 10, D).to(torch.bfloat16)
    store.append(Ragged(x, torch.tensor([10, 10])))
    before = store.ragged().data[0].clone()
    store.shrink(torch.tensor([1]), "equivalent")
    assert store.row_bits.tolist() == [16, 8]
    assert store.bits == 0  # no single width while rows differ: readers of one `bits` must not trust the store
    assert torch.equal(store.ragged().data[0], before)  # row 0 untouched
    meta = 2 * 1 * 2  # one group per token and head: bf16 scale + zero
    assert store.live_bytes.tolist() == [10 * H * (D * 16 // 8 + meta), 10 * H * (D * 8 // 8 + meta)]
    store.append(Ragged(x, torch.tensor([3, 3])))  # new tokens arrive at each row's own width
    assert store.tokens().tolist() == [13, 13]
    assert store.code_bits.tolist() == [13 * H * D * 16, 13 * H * D * 8]


def test_layer_shrinks_16_8_4_2_at_its_budget_then_stops_the_row():
    # Budget Mem(2) at max_len 2048: 2·(H·D)·2·2048/8 = 262144 bytes per layer (256 tokens at 16 bits).
    m = build("pmkvq", [*NO_ARTIFACT, "method.fbit=2", "method.max_len=2048"], model=SHAPE)
    budget = 2 * H * D * 2 * 2048 // 8
    assert m.budgets() == [budget, budget]
    layer = m.make_layer(0, 1, torch.zeros(1, dtype=torch.int64))
    gen = torch.Generator().manual_seed(0)
    seen, stopped_at = [], None
    for t in range(1, 4000):
        layer.update(torch.randn(1, H, 1, D, generator=gen), torch.randn(1, H, 1, D, generator=gen))
        layer.after_attention()
        beta = int(layer.beta[0])
        # The paper's count: every element at its width, sink and window at 16 bits.
        fp = int(layer.key_stream.fp_tokens()[0])
        main = int(layer.key_stream.store.tokens()[0])
        used = 2 * H * D * (fp * 16 + main * beta) // 8
        if not bool(layer.overflowed[0]):
            assert used <= budget, t
        if not seen or seen[-1][0] != beta:
            seen.append((beta, t))
        if bool(layer.overflowed[0]):
            stopped_at = t
            break
    assert [b for b, _ in seen] == [16, 8, 4, 2]
    # 16 -> 8 once 16-bit tokens no longer fit (a whole 128-block leaves the window: 1 + 128·k).
    assert seen[1][1] == 1 + 128 * (budget * 8 // (2 * H * D * 16) // 128)
    assert stopped_at is not None and used > budget and int(layer.beta[0]) == 2
    with pytest.raises(MemoryError, match="budget"):
        over = [*NO_ARTIFACT, "method.fbit=2", "method.max_len=2048", "method.on_budget_overflow=error"]
        lay = build("pmkvq", over, model=SHAPE).make_layer(0, 1, torch.zeros(1, dtype=torch.int64))
        for _ in range(4000):
            lay.update(torch.randn(1, H, 1, D), torch.randn(1, H, 1, D))
            lay.after_attention()


def _steps(m, tokens: list[int], storage_rows: int = 1):
    """Drive a whole cache (no model): per step, every layer stores `t` new tokens, attends (skipped), releases."""
    cache = m.new_cache(storage_rows)
    gen = torch.Generator().manual_seed(7)
    betas = []
    for t in tokens:
        for i, layer in enumerate(cache.layers):
            layer.cache = cache
            layer.update(torch.randn(storage_rows, H, t, D, generator=gen), torch.randn(storage_rows, H, t, D,
                                                                                   generator=gen))
            layer.after_attention()
            cache.step_done(i)
        betas.append(int(cache.layers[0].beta[0]))
    return cache, betas


@pytest.mark.parametrize("halving,betas,over_steps", [("per_step", [8, 4, 4], 1),
                                                      ("until_within_budget", [4, 4, 4], 0)])
def test_a_prefill_needing_two_halvings_halves_once_per_step_and_the_overrun_is_recorded(halving, betas, over_steps):
    # Budget Mem(2) at max_len 2048 holds 256 tokens at 16 bits. A 651-token prefill leaves 1 sink token,
    # 5 blocks of 128 in the main cache and 10 in the window: 640 main tokens fit only at 4 bits (16 -> 8 -> 4).
    m = build("pmkvq", [*NO_ARTIFACT, "method.fbit=2", "method.max_len=2048", f"method.halving={halving}"],
              model=SHAPE)
    cache, seen = _steps(m, [651, 1, 1])
    assert seen == betas  # the repo's backends halve at most once per step: 8 after the prefill, 4 one step later
    layer = cache.layers[0]
    assert not bool(layer.over_budget().any()) and not bool(cache.stopped().any())
    stats = cache.sequence_stats(torch.tensor([3]))[0]
    assert stats["budget_over_steps"] == over_steps  # per_step: the prefill step ended over budget, recorded
    prefill = cache.sequence_stats(torch.tensor([1]))[0]  # the prefill step's snapshot: main cache at its β
    assert prefill["payload_bits_final"] == pytest.approx((640 * betas[0] + 11 * 16) / 651)


def test_per_step_halving_still_stops_a_row_that_is_over_budget_at_the_lowest_width():
    # 32 tokens at 16 bits: nothing but the window fits
    m = build("pmkvq", [*NO_ARTIFACT, "method.fbit=2", "method.max_len=256"], model=SHAPE)
    cache, seen = _steps(m, [300] + [1] * 5)
    assert seen[:4] == [8, 4, 2, 2]
    assert int(cache.stop_step[0]) == 3  # over at 2 bits after the third step's halving: stopped at the fourth


@pytest.mark.parametrize("rule", ["equivalent", "modified"])
def test_fake_and_packed_give_the_same_tokens_through_shrinks_and_budget_stops(rule):
    model = tiny_model("qwen2", dtype=torch.bfloat16, q_heads=4, kv_heads=2, head_dim=128)
    ids = torch.stack(random_prompts([140, 140], seed=3))  # two rows of one prompt length
    over = ["method.fbit=2", "method.max_len=900", f"method.shrink_rule={rule}"]
    outs = {}
    for storage in ("packed", "fake"):
        out, cache = generate(model, build("pmkvq", NO_ARTIFACT + over, model=model, storage=storage), ids,
                              max_new_tokens=150)
        outs[storage] = (out, cache)
    (p, pc), (f, fc) = outs["packed"], outs["fake"]
    assert torch.equal(p, f)
    assert torch.equal(pc.stop_step, fc.stop_step)
    assert int(pc.layers[0].beta.min()) < 16  # the run really shrank
    stats = pc.sequence_stats(torch.tensor([150, 150]))[0]
    assert stats["payload_bits_mean"] > stats["payload_bits_final"]  # 16-bit early, fewer bits later


def test_budget_stop_ends_the_sample_and_is_recorded():
    from transformers import StoppingCriteriaList

    from mixkvq.eval.protocol import CacheStop
    from mixkvq.kv.attention import bind

    model = tiny_model("llama", q_heads=4, kv_heads=2, head_dim=128)
    ids = torch.stack(random_prompts([100], seed=4))
    m = build("pmkvq", NO_ARTIFACT + ["method.fbit=2", "method.max_len=1400"], model=model)
    cache = m.new_cache(1)
    with bind(model, cache), torch.no_grad():
        out = model.generate(ids, past_key_values=cache, do_sample=False, max_new_tokens=600, pad_token_id=0,
                             stopping_criteria=StoppingCriteriaList([CacheStop(cache)]))
    step = int(cache.stop_step[0])
    assert step > 0 and out.shape[1] - ids.shape[1] == step + 1  # generation ended right after the stop
    assert bool(cache.layers[-1].overflowed[0]) or bool(cache.layers[0].overflowed[0])


def test_integer_program_respects_the_budget_and_matches_brute_force():
    rng = random.Random(0)
    for trial in range(40):
        layers = rng.randint(1, 6)
        cands = [2, 4, 8]
        cost = [sorted((rng.random() for _ in cands), reverse=True) for _ in range(layers)]
        unit = rng.choice([1, 3, 1000])
        mem = [[b * unit for b in cands] for _ in range(layers)]
        budget = rng.randint(2 * unit * layers, 8 * unit * layers)
        pick = solve_allocation(cost, mem, budget)
        assert sum(mem[i][j] for i, j in enumerate(pick)) <= budget
        oracle = brute_force_allocation(cost, mem, budget)
        assert sum(cost[i][j] for i, j in enumerate(pick)) == pytest.approx(
            sum(cost[i][j] for i, j in enumerate(oracle)))
    with pytest.raises(ConfigError, match="below the smallest"):
        solve_allocation([[1.0, 0.5]], [[2, 4]], 1)


def test_blockwise_budgets_favour_the_sensitive_layers(tmp_path):
    sens = [[1.0, 0.1, 0.05, 0.01, 0.0], [1.0, 0.5, 0.05, 0.03, 0.0]]  # columns: 1, 2, 4, 8, 16 bits
    save_artifact(tmp_path, method="pmkvq", model="smollm2-135m", shape=SHAPE, data={"sha256": "x"}, config_yaml="",
                  seconds=0.0, payload={"bits": [1, 2, 4, 8, 16], "sensitivity": sens, "elements": 10,
                                        "rep_scales": [[[1.0] * (D // 2)] * H] * 2})
    m = build("pmkvq", [*NO_ARTIFACT, "method.allocation=blockwise", f"method.artifact={tmp_path}",
                        "method.max_len=1024", "method.budget_mean_bits=3"], model=SHAPE)
    assert m.budgets() == [m.layer_mem(2), m.layer_mem(4)]  # 3 bits on average: the sensitive layer gets 4
    assert m.fbits == [2, 4]
    assert m.nominal_bits == "Fbit=4/2"


def _post_rope(model, ids):
    """Each layer's post-RoPE query and key, via the calibration capture."""
    from mixkvq.calib.calibration import capture

    seen = {}
    with capture(model, lambda i, q, k, v: seen.__setitem__(i, (q.detach().clone(), k.detach().clone()))):
        logits = model(input_ids=ids, use_cache=False).logits
    return seen, logits


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_reparameterization_keeps_scores_and_logits(family):
    model = tiny_model(family, dtype=torch.float64, q_heads=4, kv_heads=2, head_dim=64)
    if family == "qwen2":  # q/k biases must be scaled too
        with torch.no_grad():
            for mod in model.modules():
                if hasattr(mod, "k_proj") and mod.k_proj.bias is not None:
                    mod.k_proj.bias.normal_()
                    mod.q_proj.bias.normal_()
    ids = torch.stack(random_prompts([33], seed=5))
    before, logits_before = _post_rope(model, ids)
    gen = torch.Generator().manual_seed(6)
    scales = torch.rand(2, 2, 32, generator=gen, dtype=torch.float64) * 10 + 0.1
    fold_key_scales(model, scales)
    after, logits_after = _post_rope(model, ids)
    for layer in before:
        (q0, k0), (q1, k1) = before[layer], after[layer]
        assert not torch.allclose(k0, k1)  # keys really changed ...
        s0 = q0 @ k0.repeat_interleave(2, dim=1).transpose(-1, -2)
        s1 = q1 @ k1.repeat_interleave(2, dim=1).transpose(-1, -2)
        torch.testing.assert_close(s1, s0, rtol=1e-10, atol=1e-10)  # ... but Q·Kᵀ is unchanged after RoPE
        lam = torch.cat([scales[layer], scales[layer]], dim=-1)[None, :, None, :]
        torch.testing.assert_close(k1, k0 / lam, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(logits_after, logits_before, rtol=1e-9, atol=1e-9)


def test_calibrated_key_scales_are_clamped_for_dead_and_extreme_key_channels():
    from baselines.pmkvq import pmkvq_rep_scales

    model = tiny_model("llama", dtype=torch.float32, q_heads=4, kv_heads=2, head_dim=64)
    half = 32
    with torch.no_grad():
        k = model.model.layers[0].self_attn.k_proj.weight  # rows: KV head 0 is rows 0..63
        k[[0, half]] = 0.0  # RoPE pair 0 of head 0 never fires: max |K| = 0
        k[[1, 1 + half]] *= 1e6  # pair 1: an extreme key maximum
    ids = torch.stack(random_prompts([24, 24], seed=8))
    out = pmkvq_rep_scales(model, ids, 64, SPEC, pi_scale=1, alpha_points=1, rep_bits=4, clamp=(1e-4, 1e4))
    lam = torch.tensor(out["rep_scales"])  # [layers, H_kv, D/2]; alpha 1: λ = max |K| before the clamp
    assert out["alpha"] == [1.0, 1.0]
    assert float(lam[0, 0, 0]) == pytest.approx(1e-4, rel=1e-6)  # not 0 (nor the former floor 1e-5)
    assert float(lam[0, 0, 1]) == pytest.approx(1e4, rel=1e-6)
    assert bool(((lam >= 1e-4 * (1 - 1e-6)) & (lam <= 1e4 * (1 + 1e-6))).all())


@pytest.mark.parametrize("bug", [False, True])
def test_folded_key_scales_are_clamped_as_the_repo_folds_them(tmp_path, bug):
    model = tiny_model("llama", dtype=torch.float64, q_heads=4, kv_heads=2, head_dim=64)
    shape = ModelShape.of(model)
    lam = torch.ones(2, 2, 32, dtype=torch.float64)
    lam[0, 0, 0], lam[0, 0, 1], lam[1, 1, 5] = 1e12, 1e-12, 3.0  # an artifact searched without the clamp
    save_artifact(tmp_path, method="pmkvq", model="smollm2-135m", shape=shape, data={}, config_yaml="", seconds=0.0,
                  payload={"rep_scales": lam.tolist()})
    m = build("pmkvq", ["method.allocation=uniform", f"method.artifact={tmp_path}",
                        f"method.rep_scale_bug={str(bug).lower()}"], model=shape)
    got = m.key_scales()
    want = (lam.sqrt() if bug else lam).clamp(1e-4, 1e4)
    assert torch.equal(got, want) and float(got[0, 0, 0]) == 1e4 and float(got[0, 0, 1]) == 1e-4
    before = model.model.layers[0].self_attn.k_proj.weight.detach().clone()
    m.prepare_model(model)
    after = model.model.layers[0].self_attn.k_proj.weight
    torch.testing.assert_close(after[0], before[0] / 1e4, rtol=1e-12, atol=0)  # channel 0 and its pair 32
    torch.testing.assert_close(after[32], before[32] / 1e4, rtol=1e-12, atol=0)
    torch.testing.assert_close(after[1], before[1] * 1e4, rtol=1e-12, atol=0)


def test_artifacts_are_refused_for_another_model_or_when_missing(tmp_path):
    save_artifact(tmp_path / "a", method="pmkvq", model="smollm2-135m", shape=SHAPE, payload={}, data={},
                  config_yaml="", seconds=0.0)
    with pytest.raises(ConfigError, match="made for model 'smollm2-135m'.*deepseek-r1-distill-7b"):
        load_artifact("pmkvq", str(tmp_path), str(tmp_path / "a"), {"name": "deepseek-r1-distill-7b"}, SHAPE)
    other = ModelShape(3, H, 4, D, torch.bfloat16, torch.device("cpu"))
    with pytest.raises(ConfigError, match="shape"):
        load_artifact("pmkvq", str(tmp_path), str(tmp_path / "a"), {"name": "smollm2-135m"}, other)
    with pytest.raises(ConfigError, match="scripts/calibrate.py method=pmkvq model=smollm2-135m"):
        load_artifact("pmkvq", str(tmp_path / "none"), None, {"name": "smollm2-135m"}, SHAPE)
    assert json.loads((tmp_path / "a" / "artifact.json").read_text())["shape"]["layers"] == 2


@pytest.mark.parametrize(
    "override,match",
    [("method.shrink_rule=floor", "shrink_rule"), ("method.fbit=3", "fbit"), ("method.allocation=greedy", "allocation"),
     ("method.on_budget_overflow=ignore", "on_budget_overflow"), ("method.group_size=48", "group_size"),
     ("method.halving=twice", "halving"),
     ("method.rep_scale_clamp=[1.0e4,1.0e-4]", "rep_scale_clamp")],
)
def test_impossible_settings_are_refused_by_name(override, match):
    with pytest.raises(ConfigError, match=match):
        build("pmkvq", [*NO_ARTIFACT, override], model=SHAPE).budgets()


def test_null_max_len_takes_the_models_max_new_tokens_and_is_refused_without_one():
    assert build("pmkvq", [*NO_ARTIFACT, "method.max_len=null"], model=SHAPE).max_len == model_config("smollm2-135m").max_new_tokens
    with pytest.raises(ConfigError, match="max_len"):
        build("pmkvq", [*NO_ARTIFACT, "method.max_len=null", "model.max_new_tokens=null"], model=SHAPE).budgets()


def test_kv_budget_takes_a_number_a_list_or_a_file(tmp_path):
    assert build("pmkvq", [*NO_ARTIFACT, "method.kv_budget=0.5"], model=SHAPE).budgets() == [2**19, 2**19]
    assert build("pmkvq", [*NO_ARTIFACT, "method.kv_budget=[0.25,1]"], model=SHAPE).budgets() == [2**18, 2**20]
    (tmp_path / "budgets.txt").write_text("0.5\n2\n")
    from_file = build("pmkvq", [*NO_ARTIFACT, f"method.kv_budget={tmp_path / 'budgets.txt'}"], model=SHAPE)
    assert from_file.budgets() == [2**19, 2**21]
    with pytest.raises(ConfigError, match="kv_budget"):
        build("pmkvq", [*NO_ARTIFACT, "method.kv_budget=[1,2,3]"], model=SHAPE).budgets()
