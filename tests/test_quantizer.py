"""Quantizer primitives: round-trip bounds, degenerate groups, packing. Random shapes every run (seed printed)."""

from __future__ import annotations

import random

import pytest
import torch

from mixkvq.errors import ConfigError
from mixkvq.kv.quantizer import (
    CODE_BITS, QuantSpec, dequantize, pack, pack_float, quantize, unpack, unpack_float, words_for,
)

SEED = random.randrange(2**31)


def spec(meta=torch.float32, rounding="half_even", degenerate="clamp"):
    return QuantSpec(rounding, degenerate, 1e-6, meta)


def random_groups(gen, scale=1.0):
    shape = [int(torch.randint(1, 5, (1,), generator=gen)) for _ in range(2)]
    g = int(torch.randint(2, 65, (1,), generator=gen))
    return torch.randn(*shape, g, generator=gen) * scale + torch.randn(*shape, 1, generator=gen) * 3 * scale


@pytest.mark.parametrize("bits", CODE_BITS)
@pytest.mark.parametrize("meta", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_error_is_bounded_by_the_stored_scale(bits, meta):
    gen = torch.Generator().manual_seed(SEED + bits)
    for _ in range(20):
        x = random_groups(gen)
        codes, scale, zero = quantize(x, bits, spec(meta))
        assert codes.dtype == torch.uint8 and int(codes.max()) <= (1 << bits) - 1
        err = (dequantize(codes, scale, zero, torch.float32) - x).abs()
        s, z = scale.float().unsqueeze(-1), zero.float().unsqueeze(-1)
        top = z + ((1 << bits) - 1) * s
        # Inside [zero, top] rounding costs at most half a step; outside, the clamp costs the distance to the edge
        # (the min/max rounded to the metadata dtype can land just inside the group's range).
        bound = s / 2 + (z - x).clamp_min(0) + (x - top).clamp_min(0) + 1e-6 * x.abs().clamp_min(1)
        assert bool((err <= bound).all()), f"seed {SEED}: max excess {(err - bound).max()}"


@pytest.mark.parametrize("bits", CODE_BITS)
@pytest.mark.parametrize("degenerate", ["clamp", "unit_scale"])
def test_constant_groups_reconstruct_exactly_without_nan(bits, degenerate):
    x = torch.tensor([[3.25] * 32, [0.0] * 32, [-7.5] * 32])
    codes, scale, zero = quantize(x, bits, spec(degenerate=degenerate))
    out = dequantize(codes, scale, zero, torch.float32)
    assert torch.isfinite(scale).all() and torch.isfinite(out).all()
    assert torch.equal(out, x)


@pytest.mark.parametrize("bits", CODE_BITS)
def test_extreme_groups_stay_finite_and_ordered(bits):
    x = torch.tensor([[-6.0e4, 6.0e4] + [0.0] * 30, [1e-30, 2e-30] + [1.5e-30] * 30])
    codes, scale, zero = quantize(x, bits, spec(torch.float16))
    out = dequantize(codes, scale, zero, torch.float32)
    assert torch.isfinite(out).all()
    assert out[0, 0] < out[0, 2] < out[0, 1]  # min, middle, max keep their order
    assert (out[1] - x[1]).abs().max() <= 1e-6  # a tiny range falls under min_scale: one level, error < scale


def test_rounding_modes_differ_only_on_ties():
    x = torch.tensor([[0.0, 0.5, 1.5, 2.5, 3.0]])  # step 1 at 2 bits: ties at .5
    even, _, _ = quantize(x, 2, spec(rounding="half_even"))
    away, _, _ = quantize(x, 2, spec(rounding="half_away"))
    assert even.tolist() == [[0, 0, 2, 2, 3]]
    assert away.tolist() == [[0, 1, 2, 3, 3]]


@pytest.mark.parametrize("bits", CODE_BITS)
def test_pack_unpack_round_trip_with_partial_words(bits):
    gen = torch.Generator().manual_seed(SEED + 100 + bits)
    for n in (1, 7, 31, 32, 33, 128, int(torch.randint(1, 300, (1,), generator=gen))):
        codes = torch.randint(0, 1 << bits, (3, 2, n), generator=gen, dtype=torch.uint8)
        words = pack(codes, bits)
        assert words.dtype == torch.int32 and words.shape[-1] == words_for(n, bits)
        assert torch.equal(unpack(words, bits, n), codes)


def test_three_bit_codes_use_ten_per_word():
    assert words_for(128, 3) == 13 and words_for(128, 2) == 8 and words_for(128, 4) == 16 and words_for(128, 8) == 32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n", [1, 2, 5, 128])
def test_full_precision_values_pack_bit_exactly(dtype, n):
    x = (torch.randn(4, n) * 1000).to(dtype)
    x[0, 0] = float("-inf") if n > 1 else x[0, 0]
    assert torch.equal(unpack_float(pack_float(x), n, dtype).view(torch.uint8), x.view(torch.uint8))


def test_bad_quant_settings_are_config_errors():
    from omegaconf import OmegaConf

    good = dict(rounding="half_even", degenerate_group="clamp", min_scale=1e-6, meta_dtype="model")
    for key, bad in [("rounding", "stochastic"), ("degenerate_group", "nan"), ("meta_dtype", "int8"), ("min_scale", 0)]:
        with pytest.raises(ConfigError, match=str(bad)):
            QuantSpec.from_config(OmegaConf.create({**good, key: bad}), torch.bfloat16)
    assert QuantSpec.from_config(OmegaConf.create(good), torch.bfloat16).meta_dtype == torch.bfloat16
