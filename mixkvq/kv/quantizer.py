"""Quantizer primitives shared by every method (METHODS.md §1).

Asymmetric uniform quantization of a group x of b bits:
    m = min(x), M = max(x), s = (M - m) / (2^b - 1), q = clamp(round((x - m) / s), 0, 2^b - 1), x̂ = m + q·s
Every step is an fp32 operation rounded once (s and q by IEEE division, on every device). The scale and zero
are rounded to the metadata dtype *before* they are used to quantize, so the codes, the stored metadata and
every dequantization (fake storage, packed storage, kernels) agree exactly.

Groups always lie along the last dimension: the caller arranges per-channel key groups (G tokens of one
channel) or per-token groups (G channels of one token) so that the group is the last axis.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mixkvq.errors import ConfigError

CODE_BITS = (2, 3, 4, 8)
ROUNDINGS = ("half_even", "half_away")
DEGENERATE = ("clamp", "unit_scale")
META_DTYPES = {"model": None, "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class QuantSpec:
    """The numerics every method shares (config group `quant`)."""

    rounding: str
    degenerate_group: str
    min_scale: float
    meta_dtype: torch.dtype

    @classmethod
    def from_config(cls, cfg, model_dtype: torch.dtype) -> "QuantSpec":
        for key, value, allowed in (
            ("quant.rounding", cfg.rounding, ROUNDINGS),
            ("quant.degenerate_group", cfg.degenerate_group, DEGENERATE),
            ("quant.meta_dtype", cfg.meta_dtype, META_DTYPES),
        ):
            if value not in allowed:
                raise ConfigError(f"{key}={value!r} is not valid; choose one of {list(allowed)}")
        if not float(cfg.min_scale) > 0:
            raise ConfigError(f"quant.min_scale={cfg.min_scale!r} must be a positive number")
        meta = META_DTYPES[cfg.meta_dtype] or model_dtype
        return cls(cfg.rounding, cfg.degenerate_group, float(cfg.min_scale), meta)


def check_bits(bits: int, what: str) -> int:
    if bits not in CODE_BITS:
        raise ConfigError(f"{what}={bits!r} is not a supported code width; choose one of {list(CODE_BITS)}")
    return int(bits)


def code_dtype(bits: int) -> torch.dtype:
    """uint8 holds codes up to 8 bits; PM-KVQ's 16-bit stage needs a wider integer."""
    return torch.uint8 if bits <= 8 else torch.int32


def _round(x: torch.Tensor, rounding: str) -> torch.Tensor:
    # x is non-negative here, so half-away-from-zero is floor(x + 0.5).
    return torch.round(x) if rounding == "half_even" else torch.floor(x + 0.5)


def quantize(x: torch.Tensor, bits: int, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize groups along the last dim. Returns (codes [..., G] (`code_dtype`), scale [...], zero [...])."""
    xf = x.float()
    lo = xf.amin(dim=-1)
    hi = xf.amax(dim=-1)
    levels = (1 << bits) - 1
    # Divide by a tensor, not a Python number: ATen computes `t / number` as t * fp32(1/number) on CUDA but as a
    # true division on CPU, so scales would differ in the last bit between devices (and from the pack kernels).
    scale = (hi - lo) / torch.full_like(hi, levels)
    if spec.degenerate_group == "clamp":
        scale = scale.clamp_min(spec.min_scale)
    else:  # unit_scale: a constant group gets s = 1 and every code 0
        scale = torch.where(hi > lo, scale, torch.ones_like(scale))
    scale = scale.to(spec.meta_dtype)
    zero = lo.to(spec.meta_dtype)
    q = _round((xf - zero.float().unsqueeze(-1)) / scale.float().unsqueeze(-1), spec.rounding)
    codes = q.clamp_(0, levels).to(code_dtype(bits))
    return codes, scale, zero


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x̂ = zero + codes·scale, computed in fp32 and rounded once to `dtype`."""
    return (codes.float() * scale.float().unsqueeze(-1) + zero.float().unsqueeze(-1)).to(dtype)


def fake_quantize(x: torch.Tensor, bits: int, spec: QuantSpec) -> torch.Tensor:
    codes, scale, zero = quantize(x, bits, spec)
    return dequantize(codes, scale, zero, x.dtype)


# ---- packing: floor(32 / b) codes per int32 word, first code in the lowest bits -------------------------


def codes_per_word(bits: int) -> int:
    return 32 // bits


def words_for(n: int, bits: int) -> int:
    """int32 words holding n codes of `bits` bits (3-bit: 10 per word, 2 bits of padding)."""
    cpw = codes_per_word(bits)
    return -(-n // cpw)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes [..., n] into int32 words [..., words_for(n, bits)] along the last dim."""
    cpw = codes_per_word(bits)
    n = codes.shape[-1]
    nw = words_for(n, bits)
    c = codes.to(torch.int64)
    if nw * cpw != n:
        c = torch.nn.functional.pad(c, (0, nw * cpw - n))
    c = c.reshape(*codes.shape[:-1], nw, cpw)
    shifts = torch.arange(cpw, device=codes.device, dtype=torch.int64) * bits
    words = (c << shifts).sum(dim=-1)
    # Reinterpret the unsigned 32-bit pattern as int32.
    words = torch.where(words >= 1 << 31, words - (1 << 32), words)
    return words.to(torch.int32)


def unpack(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack`: int32 words [..., nw] -> codes [..., n] (`code_dtype`)."""
    cpw = codes_per_word(bits)
    w = words.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(cpw, device=words.device, dtype=torch.int64) * bits
    c = (w.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return c.reshape(*words.shape[:-1], words.shape[-1] * cpw)[..., :n].to(code_dtype(bits))


def pack_float(x: torch.Tensor) -> torch.Tensor:
    """Full-precision values [..., n] (16 or 32 bit) as int32 words, so mixed-width blocks share one pool."""
    if x.element_size() == 4:
        return x.contiguous().view(torch.int32)
    bits16 = x.contiguous().view(torch.int16).to(torch.int32) & 0xFFFF
    if x.shape[-1] % 2:
        bits16 = torch.nn.functional.pad(bits16, (0, 1))
    pairs = bits16.reshape(*x.shape[:-1], -1, 2)
    words = pairs[..., 0].to(torch.int64) | (pairs[..., 1].to(torch.int64) << 16)
    words = torch.where(words >= 1 << 31, words - (1 << 32), words)
    return words.to(torch.int32)


def unpack_float(words: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    if torch.empty((), dtype=dtype).element_size() == 4:
        return words.contiguous().view(dtype)[..., :n]
    w = words.to(torch.int64) & 0xFFFFFFFF
    halves = torch.stack((w & 0xFFFF, w >> 16), dim=-1).reshape(*words.shape[:-1], 2 * words.shape[-1])[..., :n]
    halves = torch.where(halves >= 1 << 15, halves - (1 << 16), halves)
    return halves.to(torch.int16).view(dtype)


# ---- KVmix's 3-bit layout: 11 codes per int32 (ten 3-bit codes, then one 2-bit code in bits 30-31) -------

PACK11 = 11  # codes per word


def clamp_slot11(codes: torch.Tensor) -> torch.Tensor:
    """The 11th code of every word has 2 bits: clamp it to [0, 3] while the group scale keeps qmax = 7."""
    c = codes.clone()
    c[..., PACK11 - 1 :: PACK11] = c[..., PACK11 - 1 :: PACK11].clamp(max=3)
    return c


def pack11(codes: torch.Tensor) -> torch.Tensor:
    """3-bit codes [..., n] (n a multiple of 11) -> int32 words [..., n / 11], first code in the lowest bits."""
    n = codes.shape[-1]
    assert n % PACK11 == 0, "the 11-per-word layout packs whole groups of 11 codes"
    c = clamp_slot11(codes).to(torch.int64).reshape(*codes.shape[:-1], n // PACK11, PACK11)
    shifts = torch.arange(PACK11, device=codes.device, dtype=torch.int64) * 3
    words = (c << shifts).sum(dim=-1)
    words = torch.where(words >= 1 << 31, words - (1 << 32), words)
    return words.to(torch.int32)


def unpack11(words: torch.Tensor, n: int) -> torch.Tensor:
    w = words.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(PACK11, device=words.device, dtype=torch.int64) * 3
    c = (w.unsqueeze(-1) >> shifts) & 7  # slot 11 sits in bits 30-31, so `& 7` reads its 2 bits
    return c.reshape(*words.shape[:-1], words.shape[-1] * PACK11)[..., :n].to(torch.uint8)
