"""Fused decode attention over a layer's packed stores (Triton), flash-decoding style.

One program per (row, KV head, split of the sequence): it reads each KV tile once for all the query heads of
its GQA group, dequantizes in registers, and keeps an online softmax; a second kernel merges the splits by
log-sum-exp. Every row has its own lengths (sink, key store, value store, total), so rows of different
lengths cost no padding work.

A row's tokens are, in order: sink (full precision) | store (quantized) | window (full precision). Keys and
values leave their windows under different rules (KIVI: keys in R-blocks, values one by one), so the two
streams are located independently for each token: position u after the sink is in the key store iff
u < key_store_len[b], and likewise for values.

The launcher reads each store through its layout and buffers (mixkvq/kv/layout.py), looked up by `Layout.format` in
`STORE_FORMATS`; it knows no store class. Store formats (constexprs `K_FMT` / `V_FMT`, one per stream; `K_FAST` /
`V_FAST` when whole tiles unpack without gathers):
- channel: per-channel groups of G tokens in blocks of P tokens (KIVI/MixKVQ/KVmix keys); a block's channel d
  holds words_for(P, w) int32 words, w per (block, channel) when widths are mixed (MixKVQ tiers, full precision
  channels stored raw; P a multiple of the 32-token tile), else one width for the store (any P: the generic
  path finds each token's block). `PACK11`: KVmix's 3-bit layout, 11-token blocks and groups, 11 codes per
  word (ten 3-bit codes, then a 2-bit one in bits 30-31).
- token: per-token groups of G channels, one width (values; per-token keys), or with `ROW_BITS` one width per
  batch row (PM-KVQ's progressive store: 16/8/4/2 bits, shrinking; row b's width comes with its lengths and
  its tokens use the first words_for(D, w) words of a row of the codes buffer).
- dense: the store holds dequantized tokens in the model dtype (`storage=fake`).

Codes of 2/3/4/8 (and, per row, 16) bits, floor(32/w) codes per word, first code in the lowest bits
(mixkvq/kv/quantizer.py). The dequantized value is rounded to the model dtype before use, as the PyTorch reference
does. Per-row widths, KVmix's 11-per-word keys and channel blocks that are not a multiple of the tile take the
generic (masked) path only.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import partial
from typing import Callable

import numpy as np
import torch
import triton
import triton.language as tl

from kernels.pack import on_device_of
from mixkvq.kv.layout import Layout, PackingFormat
from mixkvq.kv.quantizer import CODE_BITS, PACK11
from mixkvq.kv.ragged import to_device

_F_NONE, _F_CHANNEL, _F_TOKEN, _F_DENSE = 0, 1, 2, 3
TILE_TOKENS = 32  # tokens per tile: divides every mixed-width channel block (P is a multiple of the group, >= 32)
# Columns of the per-row `lens` tensor (`_lens`): sink, key store, value store, total tokens, key and value code
# widths (the widths of per-row-width stores; 0 for the others).
LENS_COLS = tl.constexpr(6)


@dataclass(frozen=True)
class TritonTuning:
    """How a call is split and compiled: values, not globals (benchmarks pass their own). No setting changes the
    result beyond the summation order of the splits."""

    # The sequence is split until there are about this many programs per SM (CUDA): many short programs leave
    # little of the last wave idle (H200, B=64, L=32k, KIVI-2 in the two-kernel form: 1742 us at 4, 1618 us at 32).
    split_programs_per_sm: int = 32
    max_splits: int = 256
    num_warps: int = 4
    max_registers: int | None = None  # registers per thread of the split kernel (None: the compiler's, up to 255)
    # Whole tiles go to a kernel of their own (PART 1, no generic path: with the word-major unpack 128 instead of
    # 255 registers for KIVI, so 4 programs per SM instead of 2) and the rest to a second one (PART 2) when the
    # layer holds at least this many whole tiles over its rows and KV heads; None: never. On an H200 at B=64,
    # L=32k (262144 tiles) it takes KIVI-2 from 1906 to 1618 us; at B=1 its second launch costs more than it saves
    # (results/bench/sweeps-2026-12-02b).
    lean_min_tiles: int | None = 65536
    lean_max_registers: int | None = None  # registers per thread of the whole-tile kernel


DEFAULT_TUNING = TritonTuning()


@triton.jit
def _fp_tile_t(ptr, sb, sh, st, b, h, idx, d, mask):
    """Full-precision tokens as a [D, BT] tile (keys, transposed for the score product)."""
    p = ptr + b * sb + h * sh + idx[None, :] * st + d[:, None]
    return tl.load(p, mask=mask[None, :], other=0.0).to(tl.float32)


@triton.jit
def _fp_tile(ptr, sb, sh, st, b, h, idx, d, mask):
    """Full-precision tokens as a [BT, D] tile (values)."""
    p = ptr + b * sb + h * sh + idx[:, None] * st + d[None, :]
    return tl.load(p, mask=mask[:, None], other=0.0).to(tl.float32)


# On a GPU, `a * b + c` compiles to one fused multiply-add, which rounds once; torch's dequantize (fake storage and
# the reference path) rounds the product, then the sum. A rounded multiply keeps the two paths bit-identical.
_ROUNDED_MUL = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") != "1")


@triton.jit
def _dequant(raw, sc, zr, MODEL_DTYPE: tl.constexpr):
    """zero + code * scale in fp32 with separately rounded operations, rounded to (and left in) the model dtype.

    Left in the model dtype: the dots take it as is.
    """
    raw = raw.to(tl.float32)
    if _ROUNDED_MUL:
        prod = tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=r,r,r", [raw, sc], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        prod = raw * sc
    return (prod + zr).to(MODEL_DTYPE)


@triton.jit
def _channel_tile_t(codes, c_sb, c_sh, scale, zero, s_sb, s_sh, s_st, widths, w_sb, w_sh, w_st, offsets, o_sb, o_sh,
                    o_st, b, h, u0, u, d, mask, tile_in_store,
                    BITS: tl.constexpr, MIXED: tl.constexpr, P: tl.constexpr, G: tl.constexpr, NG: tl.constexpr,
                    FP_BITS: tl.constexpr, MODEL_DTYPE: tl.constexpr, D: tl.constexpr, PACK11: tl.constexpr):
    """Per-channel-group tokens u as a dequantized [D, BT] tile.

    Mixed widths: the tile lies in block u0 // P (P is a multiple of the tile). One width: each token's own block
    (a tile may span several, e.g. KVmix's 11-token blocks); `PACK11`: 11 codes per word, the 11th of 2 bits.
    """
    t_in = u % P  # [BT]
    if MIXED:
        blk = u0 // P
        wcode = tl.load(widths + b * w_sb + h * w_sh + blk * w_st + d, mask=(d < D) & tile_in_store, other=2)
        wcode = wcode.to(tl.int32)
        is_fp = wcode == 0
        bits = tl.where(is_fp, FP_BITS, wcode)  # [D]
        cpw = 32 // bits
        wpc = (P + cpw - 1) // cpw
        chan_off = tl.cumsum(wpc, 0) - wpc
        base = tl.load(offsets + b * o_sb + h * o_sh + blk * o_st, mask=tile_in_store, other=0)
    else:
        CPW: tl.constexpr = 11 if PACK11 else 32 // BITS
        WPC: tl.constexpr = (P + CPW - 1) // CPW
        blk = u // P  # [BT]
        bits = tl.full([D], BITS, tl.int32)
        cpw = tl.full([D], CPW, tl.int32)
        chan_off = d * WPC
        base = (blk * (D * WPC))[None, :]
    word_idx = base + chan_off[:, None] + t_in[None, :] // cpw[:, None]  # [D, BT]
    m2 = mask[None, :] & (d[:, None] < D)
    word = tl.load(codes + b * c_sb + h * c_sh + word_idx, mask=m2, other=0)
    shift = (t_in[None, :] % cpw[:, None]) * bits[:, None]
    low_bits = tl.minimum(bits, 16)  # full-precision lanes: 16-bit halves; 32-bit words are used whole
    raw = (word >> shift) & ((1 << low_bits[:, None]) - 1)
    if PACK11:  # the 11th code sits in bits 30-31 and `>>` on int32 is arithmetic: keep its 2 bits only
        raw = tl.where(shift == 30, raw & 3, raw)
    g = t_in[None, :] // G
    s_off = b * s_sb + h * s_sh + blk * s_st + d[:, None] * NG + g
    sc = tl.load(scale + s_off, mask=m2, other=0.0).to(tl.float32)
    zr = tl.load(zero + s_off, mask=m2, other=0.0).to(tl.float32)
    val = _dequant(raw, sc, zr, MODEL_DTYPE)
    if MIXED:
        if FP_BITS == 32:
            fp = word.to(tl.float32, bitcast=True)
        else:
            fp = raw.to(tl.int16).to(MODEL_DTYPE, bitcast=True).to(tl.float32)
        val = tl.where(is_fp[:, None], fp.to(val.dtype), val)
    return val


@triton.jit
def _token_tile(codes, c_sb, c_sh, c_st, scale, zero, s_sb, s_sh, s_st, b, h, idx, d, mask, row_bits,
                BITS: tl.constexpr, G: tl.constexpr, MODEL_DTYPE: tl.constexpr, ROW_BITS: tl.constexpr):
    """Per-token-group tokens at store positions idx as a dequantized [BT, D] tile.

    `ROW_BITS`: the code width is the row's (`row_bits`, a runtime scalar of up to 16 bits), else BITS.
    """
    if ROW_BITS:
        bits = row_bits
        cpw = 32 // row_bits
    else:
        bits: tl.constexpr = BITS
        cpw: tl.constexpr = 32 // BITS
    row = b * c_sb + h * c_sh + idx[:, None] * c_st
    word = tl.load(codes + row + (d // cpw)[None, :], mask=mask[:, None], other=0)
    raw = (word >> ((d % cpw) * bits)[None, :]) & ((1 << bits) - 1)
    s_off = b * s_sb + h * s_sh + idx[:, None] * s_st + (d // G)[None, :]
    sc = tl.load(scale + s_off, mask=mask[:, None], other=0.0).to(tl.float32)
    zr = tl.load(zero + s_off, mask=mask[:, None], other=0.0).to(tl.float32)
    return _dequant(raw, sc, zr, MODEL_DTYPE)


@triton.jit
def _channel_load(codes, c_sb, c_sh, scale, zero, s_sb, s_sh, s_st, widths, w_sb, w_sh, w_st, offsets, o_sb, o_sh,
                  o_st, b, h, u0, d, valid,
                  BITS: tl.constexpr, MIXED: tl.constexpr, P: tl.constexpr, G: tl.constexpr, NG: tl.constexpr,
                  FP_BITS: tl.constexpr, D: tl.constexpr, BT: tl.constexpr):
    """Raw words, scales, zeros (and width codes) of a whole channel-group tile; decoded by `_channel_decode`.

    Split from the decode so the main loop can fetch the next tile while it computes this one.
    """
    NGT: tl.constexpr = BT // G if BT > G else 1  # scale groups the tile spans
    blk = u0 // P
    t0 = u0 % P
    if MIXED or G % (32 // BITS) != 0:
        s_off = b * s_sb + h * s_sh + blk * s_st + d[:, None] * NG + t0 // G + tl.arange(0, NGT)[None, :]
    else:  # one scale and zero per word, in the words' shape [D, NW] (see `_word_major`)
        s_off = b * s_sb + h * s_sh + blk * s_st + d[:, None] * NG + \
            (t0 + tl.arange(0, BT // (32 // BITS)) * (32 // BITS))[None, :] // G
    sc = tl.load(scale + s_off, mask=valid, other=0.0)
    zr = tl.load(zero + s_off, mask=valid, other=0.0)
    if MIXED:
        t_in = t0 + tl.arange(0, BT)
        wcode = tl.load(widths + b * w_sb + h * w_sh + blk * w_st + d, mask=valid, other=2).to(tl.int32)
        bits = tl.where(wcode == 0, FP_BITS, wcode)  # full-precision channels: raw 16- or 32-bit values
        is3 = bits == 3
        # log2 of codes per word (32 / bits), a power of two except for 3-bit codes (10 per word)
        lg = tl.where(bits == 2, 4, tl.where(bits == 4, 3, tl.where(bits == 8, 2, tl.where(bits == 16, 1, 0))))
        wpc = tl.where(is3, (P + 9) // 10, P >> lg)
        chan_off = tl.cumsum(wpc, 0) - wpc
        base = tl.load(offsets + b * o_sb + h * o_sh + blk * o_st, mask=valid, other=0)
        word_in = tl.where(is3[:, None], t_in[None, :] // 10, t_in[None, :] >> lg[:, None])
        word = tl.load(codes + b * c_sb + h * c_sh + base + chan_off[:, None] + word_in, mask=valid, other=0)
    else:
        CPW: tl.constexpr = 32 // BITS
        NW: tl.constexpr = BT // CPW
        WPC: tl.constexpr = P // CPW
        w_idx = blk * (D * WPC) + d[:, None] * WPC + t0 // CPW + tl.arange(0, NW)[None, :]
        word = tl.load(codes + b * c_sb + h * c_sh + w_idx, mask=valid, other=0)  # [D, NW]
        wcode = d
    return word, sc, zr, wcode


@triton.jit
def _word_major(word, sc, zr, BITS: tl.constexpr, MODEL_DTYPE: tl.constexpr):
    """[R, W] words with one scale and zero each -> dequantized [R, W * 32 // BITS], first code lowest.

    Unpacked along a leading code axis, then permuted: each thread keeps the codes of the words it loaded in its
    own registers, with their one scale and zero. (Codes along a trailing axis put a word's codes on 32 // BITS
    threads, each converting its own copy of the scale and zero: about a third of the loop's instructions.)
    """
    CPW: tl.constexpr = 32 // BITS
    raw = (word[None, :, :] >> (tl.arange(0, CPW) * BITS)[:, None, None]) & ((1 << BITS) - 1)
    val = _dequant(raw, sc.to(tl.float32)[None, :, :], zr.to(tl.float32)[None, :, :], MODEL_DTYPE)
    val = tl.permute(val, (1, 2, 0))
    return tl.reshape(val, [val.shape[0], val.shape[1] * CPW])


@triton.jit
def _channel_decode(word, sc, zr, wcode, u0,
                    BITS: tl.constexpr, MIXED: tl.constexpr, P: tl.constexpr, G: tl.constexpr, FP_BITS: tl.constexpr,
                    MODEL_DTYPE: tl.constexpr, D: tl.constexpr, BT: tl.constexpr):
    """A whole tile of a channel-group store as a dequantized [D, BT] tile (word-major when every word lies in one
    group and the width is uniform)."""
    NGT: tl.constexpr = BT // G if BT > G else 1
    if MIXED:
        t_in = u0 % P + tl.arange(0, BT)
        is_fp = wcode == 0
        bits = tl.where(is_fp, FP_BITS, wcode)
        is3 = bits == 3
        lg = tl.where(bits == 2, 4, tl.where(bits == 4, 3, tl.where(bits == 8, 2, tl.where(bits == 16, 1, 0))))
        pos = tl.where(is3[:, None], t_in[None, :] % 10, t_in[None, :] & ((1 << lg[:, None]) - 1))
        raw = (word >> (pos * bits[:, None])) & ((1 << tl.minimum(bits, 16)[:, None]) - 1)
        if FP_BITS == 32:
            fp = word.to(tl.float32, bitcast=True)
        else:
            fp = raw.to(tl.int16).to(MODEL_DTYPE, bitcast=True).to(tl.float32)
        val = _group_dequant(raw, sc, zr, MODEL_DTYPE, D, NGT, BT)
        val = tl.where(is_fp[:, None], fp.to(val.dtype), val)
    elif G % (32 // BITS) == 0:
        val = _word_major(word, sc, zr, BITS, MODEL_DTYPE)
    else:
        raw = (word[:, :, None] >> (tl.arange(0, 32 // BITS) * BITS)[None, None, :]) & ((1 << BITS) - 1)
        val = _group_dequant(raw, sc, zr, MODEL_DTYPE, D, NGT, BT)
    return val


@triton.jit
def _group_dequant(raw, sc, zr, MODEL_DTYPE: tl.constexpr, R: tl.constexpr, NG: tl.constexpr, C: tl.constexpr):
    """Codes [R, C] (any shape of R * C elements) with scales and zeros [R, NG] (groups of C // NG along C)."""
    raw = tl.reshape(raw, [R, NG, C // NG])
    sc3 = tl.broadcast_to(sc.to(tl.float32)[:, :, None], [R, NG, C // NG])
    zr3 = tl.broadcast_to(zr.to(tl.float32)[:, :, None], [R, NG, C // NG])
    return tl.reshape(_dequant(raw, sc3, zr3, MODEL_DTYPE), [R, C])


@triton.jit
def _token_load(codes, c_sb, c_sh, c_st, scale, zero, s_sb, s_sh, s_st, b, h, u0, valid,
                BITS: tl.constexpr, G: tl.constexpr, NG: tl.constexpr, D: tl.constexpr, BT: tl.constexpr):
    """Raw words, scales and zeros of a whole per-token tile (power-of-two codes per word)."""
    WPT: tl.constexpr = D // (32 // BITS)
    idx = u0 + tl.arange(0, BT)
    word = tl.load(codes + b * c_sb + h * c_sh + idx[:, None] * c_st + tl.arange(0, WPT)[None, :], mask=valid,
                   other=0)
    if G % (32 // BITS) == 0:  # one scale and zero per word, in the words' shape [BT, WPT] (`_word_major`)
        s_off = b * s_sb + h * s_sh + idx[:, None] * s_st + (tl.arange(0, WPT) * (32 // BITS) // G)[None, :]
    else:
        s_off = b * s_sb + h * s_sh + idx[:, None] * s_st + tl.arange(0, NG)[None, :]
    sc = tl.load(scale + s_off, mask=valid, other=0.0)
    zr = tl.load(zero + s_off, mask=valid, other=0.0)
    return word, sc, zr


@triton.jit
def _token_decode(word, sc, zr, BITS: tl.constexpr, G: tl.constexpr, NG: tl.constexpr, MODEL_DTYPE: tl.constexpr,
                  D: tl.constexpr, BT: tl.constexpr):
    """A whole per-token tile as a dequantized [BT, D] tile (word-major when every word lies in one group)."""
    if G % (32 // BITS) == 0:
        val = _word_major(word, sc, zr, BITS, MODEL_DTYPE)
    else:
        raw = (word[:, :, None] >> (tl.arange(0, 32 // BITS) * BITS)[None, None, :]) & ((1 << BITS) - 1)
        val = _group_dequant(raw, sc, zr, MODEL_DTYPE, BT, NG, D)
    return val


@triton.jit
def _attend(qv, kt, vt, ok, m_i, l_i, acc, sm_scale_log2, DOT_DTYPE: tl.constexpr):
    """Online-softmax update with one tile (exp2 domain; fully masked tiles leave the state unchanged)."""
    if DOT_DTYPE == tl.float32:
        sc = tl.dot(qv, kt.to(tl.float32), input_precision="ieee")
    else:
        sc = tl.dot(qv, kt.to(DOT_DTYPE))
    sc = tl.where(ok[None, :], sc * sm_scale_log2, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(sc, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(sc - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if DOT_DTYPE == tl.float32:
        acc = acc * alpha[:, None] + tl.dot(p, vt.to(tl.float32), input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), vt.to(DOT_DTYPE))
    return m_new, l_i, acc


@triton.jit
def _decode_split_kernel(
    q, q_sb, q_sh, lens, o_part, lse_part, sm_scale_log2, split_tokens, n_splits,
    # keys: sink, window, store (codes, scale, zero, widths, offsets)
    ks, ks_sb, ks_sh, ks_st, kw, kw_sb, kw_sh, kw_st,
    kc, kc_sb, kc_sh, kc_st, ksc, kzr, ksc_sb, ksc_sh, ksc_st, kwid, kwid_sb, kwid_sh, kwid_st, koff, koff_sb, koff_sh,
    koff_st,
    # values: the same
    vs, vs_sb, vs_sh, vs_st, vw, vw_sb, vw_sh, vw_st,
    vc, vc_sb, vc_sh, vc_st, vsc, vzr, vsc_sb, vsc_sh, vsc_st, vwid, vwid_sb, vwid_sh, vwid_st, voff, voff_sb, voff_sh,
    voff_st,
    GQ: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BT: tl.constexpr, HAS_SINK: tl.constexpr,
    K_FMT: tl.constexpr, K_BITS: tl.constexpr, K_MIXED: tl.constexpr, K_P: tl.constexpr, K_G: tl.constexpr,
    K_NG: tl.constexpr, K_FAST: tl.constexpr,
    V_FMT: tl.constexpr, V_BITS: tl.constexpr, V_MIXED: tl.constexpr, V_P: tl.constexpr, V_G: tl.constexpr,
    V_NG: tl.constexpr, V_FAST: tl.constexpr,
    FP_BITS: tl.constexpr, MODEL_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, N_KV: tl.constexpr,
    K_ROW_BITS: tl.constexpr, K_PACK11: tl.constexpr, V_ROW_BITS: tl.constexpr, V_PACK11: tl.constexpr,
    PART: tl.constexpr,
):
    """PART 0: split s of a row's tokens, whole tiles and the rest. PART 1: only the whole tiles of split s
    (no generic path compiled in: fewer registers, more programs per SM). PART 2: one program per (row, head) for
    the rest (sink, and the tokens after the last whole tile), written as the last split."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    if PART == 2:
        s = n_splits - 1
    else:
        s = tl.program_id(2)
    n_sink = tl.load(lens + b * LENS_COLS + 0)
    k_store = tl.load(lens + b * LENS_COLS + 1)
    v_store = tl.load(lens + b * LENS_COLS + 2)
    total = tl.load(lens + b * LENS_COLS + 3)
    k_bits = tl.load(lens + b * LENS_COLS + 4)  # this row's code widths (per-row-width stores only)
    v_bits = tl.load(lens + b * LENS_COLS + 5)
    d = tl.arange(0, D)
    gi = tl.arange(0, GP)
    g_ok = gi < GQ
    hq = h * GQ + gi
    qv = tl.load(q + b * q_sb + hq[:, None] * q_sh + d[None, :], mask=g_ok[:, None], other=0.0).to(DOT_DTYPE)

    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    t_ar = tl.arange(0, BT)
    all_ok = t_ar < BT

    if HAS_SINK and PART != 1:
        if s == 0 or PART == 2:
            for t0 in range(0, n_sink, BT):
                t = t0 + t_ar
                ok = t < n_sink
                kt = _fp_tile_t(ks, ks_sb, ks_sh, ks_st, b, h, t, d, ok)
                vt = _fp_tile(vs, vs_sb, vs_sh, vs_st, b, h, t, d, ok)
                m_i, l_i, acc = _attend(qv, kt, vt, ok, m_i, l_i, acc, sm_scale_log2, DOT_DTYPE)

    n_after = total - n_sink
    # Main region: whole tiles whose keys and values are both in the stores (no windows, no masks).
    both = tl.minimum(k_store, v_store)
    whole = both - both % BT
    if PART == 2:
        u_lo = whole
        u_hi = n_after
    else:
        u_lo = s * split_tokens
        u_hi = tl.minimum(u_lo + split_tokens, n_after)
    main_end = tl.maximum(tl.minimum(u_hi, whole), u_lo)
    if K_FAST and V_FAST and PART != 2:
        # Software pipelining by hand: the packed words of tile i+1 are in flight while tile i is decoded.
        first = u_lo < main_end
        if K_FMT == 1:
            kw_, ks_, kz_, kx_ = _channel_load(kc, kc_sb, kc_sh, ksc, kzr, ksc_sb, ksc_sh, ksc_st, kwid, kwid_sb, kwid_sh,
                                               kwid_st, koff, koff_sb, koff_sh, koff_st, b, h, u_lo, d, first,
                                               K_BITS, K_MIXED, K_P, K_G, K_NG, FP_BITS, D, BT)
        else:
            kw_, ks_, kz_ = _token_load(kc, kc_sb, kc_sh, kc_st, ksc, kzr, ksc_sb, ksc_sh, ksc_st, b, h, u_lo, first,
                                        K_BITS, K_G, K_NG, D, BT)
        if V_FMT == 2:
            vw_, vs_, vz_ = _token_load(vc, vc_sb, vc_sh, vc_st, vsc, vzr, vsc_sb, vsc_sh, vsc_st, b, h, u_lo, first,
                                        V_BITS, V_G, V_NG, D, BT)
        else:
            vw_, vs_, vz_, vx_ = _channel_load(vc, vc_sb, vc_sh, vsc, vzr, vsc_sb, vsc_sh, vsc_st, vwid, vwid_sb,
                                               vwid_sh, vwid_st, voff, voff_sb, voff_sh, voff_st, b, h, u_lo, d, first,
                                               V_BITS, V_MIXED, V_P, V_G, V_NG, FP_BITS, D, BT)
        for u0 in range(u_lo, main_end, BT):
            nxt = u0 + BT
            more = nxt < main_end
            if K_FMT == 1:
                kt = _channel_decode(kw_, ks_, kz_, kx_, u0, K_BITS, K_MIXED, K_P, K_G, FP_BITS, MODEL_DTYPE, D, BT)
                kw_, ks_, kz_, kx_ = _channel_load(kc, kc_sb, kc_sh, ksc, kzr, ksc_sb, ksc_sh, ksc_st, kwid, kwid_sb,
                                                   kwid_sh, kwid_st, koff, koff_sb, koff_sh, koff_st, b, h, nxt, d,
                                                   more, K_BITS, K_MIXED, K_P, K_G, K_NG, FP_BITS, D, BT)
            else:
                kt = tl.trans(_token_decode(kw_, ks_, kz_, K_BITS, K_G, K_NG, MODEL_DTYPE, D, BT))
                kw_, ks_, kz_ = _token_load(kc, kc_sb, kc_sh, kc_st, ksc, kzr, ksc_sb, ksc_sh, ksc_st, b, h, nxt,
                                            more, K_BITS, K_G, K_NG, D, BT)
            if V_FMT == 2:
                vt = _token_decode(vw_, vs_, vz_, V_BITS, V_G, V_NG, MODEL_DTYPE, D, BT)
                vw_, vs_, vz_ = _token_load(vc, vc_sb, vc_sh, vc_st, vsc, vzr, vsc_sb, vsc_sh, vsc_st, b, h, nxt,
                                            more, V_BITS, V_G, V_NG, D, BT)
            else:
                vt = tl.trans(_channel_decode(vw_, vs_, vz_, vx_, u0, V_BITS, V_MIXED, V_P, V_G, FP_BITS,
                                              MODEL_DTYPE, D, BT))
                vw_, vs_, vz_, vx_ = _channel_load(vc, vc_sb, vc_sh, vsc, vzr, vsc_sb, vsc_sh, vsc_st, vwid, vwid_sb,
                                                   vwid_sh, vwid_st, voff, voff_sb, voff_sh, voff_st, b, h, nxt, d,
                                                   more, V_BITS, V_MIXED, V_P, V_G, V_NG, FP_BITS, D, BT)
            m_i, l_i, acc = _attend(qv, kt, vt, all_ok, m_i, l_i, acc, sm_scale_log2, DOT_DTYPE)
    else:
        main_end = u_lo
    # The rest: any mix of store and window per token, per stream.
    if PART != 1:
        for u0 in range(main_end, u_hi, BT):
            u = u0 + t_ar
            ok = u < u_hi
            k_in = u < k_store
            kt = _fp_tile_t(kw, kw_sb, kw_sh, kw_st, b, h, u - k_store, d, ok & (u >= k_store))
            if K_FMT == 1:
                kq = _channel_tile_t(kc, kc_sb, kc_sh, ksc, kzr, ksc_sb, ksc_sh, ksc_st, kwid, kwid_sb, kwid_sh,
                                     kwid_st, koff, koff_sb, koff_sh, koff_st, b, h, u0, u, d, ok & k_in, u0 < k_store,
                                     K_BITS, K_MIXED, K_P, K_G, K_NG, FP_BITS, MODEL_DTYPE, D, K_PACK11)
                kt = tl.where(k_in[None, :], kq, kt)
            elif K_FMT == 2:
                kq = tl.trans(_token_tile(kc, kc_sb, kc_sh, kc_st, ksc, kzr, ksc_sb, ksc_sh, ksc_st, b, h, u, d,
                                          ok & k_in, k_bits, K_BITS, K_G, MODEL_DTYPE, K_ROW_BITS))
                kt = tl.where(k_in[None, :], kq, kt)
            elif K_FMT == 3:
                kq = _fp_tile_t(kc, kc_sb, kc_sh, kc_st, b, h, u, d, ok & k_in)
                kt = tl.where(k_in[None, :], kq, kt)
            v_in = u < v_store
            vt = _fp_tile(vw, vw_sb, vw_sh, vw_st, b, h, u - v_store, d, ok & (u >= v_store))
            if V_FMT == 1:
                vq = tl.trans(_channel_tile_t(vc, vc_sb, vc_sh, vsc, vzr, vsc_sb, vsc_sh, vsc_st, vwid, vwid_sb,
                                              vwid_sh, vwid_st, voff, voff_sb, voff_sh, voff_st, b, h, u0, u, d,
                                              ok & v_in, u0 < v_store, V_BITS, V_MIXED, V_P, V_G, V_NG, FP_BITS,
                                              MODEL_DTYPE, D, V_PACK11))
                vt = tl.where(v_in[:, None], vq, vt)
            elif V_FMT == 2:
                vq = _token_tile(vc, vc_sb, vc_sh, vc_st, vsc, vzr, vsc_sb, vsc_sh, vsc_st, b, h, u, d, ok & v_in,
                                 v_bits, V_BITS, V_G, MODEL_DTYPE, V_ROW_BITS)
                vt = tl.where(v_in[:, None], vq, vt)
            elif V_FMT == 3:
                vq = _fp_tile(vc, vc_sb, vc_sh, vc_st, b, h, u, d, ok & v_in)
                vt = tl.where(v_in[:, None], vq, vt)
            m_i, l_i, acc = _attend(qv, kt, vt, ok, m_i, l_i, acc, sm_scale_log2, DOT_DTYPE)

    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    row = (b * N_KV * GQ + hq) * n_splits + s
    tl.store(o_part + row[:, None] * D + d[None, :], out, mask=g_ok[:, None])
    tl.store(lse_part + row, lse, mask=g_ok)


@triton.jit
def _merge_splits_kernel(o_part, lse_part, out, n_splits, D: tl.constexpr, SP: tl.constexpr,
                         OUT_DTYPE: tl.constexpr):
    """out[bh] = sum_s w_s o_s / sum_s w_s with w_s = 2^(lse_s - max lse): the exact softmax over all splits."""
    bh = tl.program_id(0)
    s = tl.arange(0, SP)
    d = tl.arange(0, D)
    ok = s < n_splits
    lse = tl.load(lse_part + bh * n_splits + s, mask=ok, other=float("-inf"))
    m = tl.max(lse, 0)
    w = tl.where(ok, tl.exp2(lse - m), 0.0)
    o = tl.load(o_part + (bh * n_splits + s)[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)
    res = tl.sum(o * w[:, None], 0) / tl.sum(w, 0)
    tl.store(out + bh * D + d, res.to(OUT_DTYPE))


# ---- launcher -----------------------------------------------------------------------------------------------

_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}
_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few splits, so the merge is exercised
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def _strided(t: torch.Tensor) -> list:
    """A [B, H, T, X] tensor (X contiguous) with its three outer strides."""
    assert t.stride(3) == 1
    return [t, t.stride(0), t.stride(1), t.stride(2)]


def _buffer_args(buf, dummy) -> list:
    return _strided(buf.data if buf is not None else dummy)


_NO_CONSTS = dict(BITS=2, MIXED=False, P=TILE_TOKENS, G=TILE_TOKENS, NG=1, FAST=False, ROW_BITS=False, PACK11=False)
_POW2_BITS = (2, 4, 8)  # codes per word a power of two: whole tiles unpack by broadcasting
# Widths a per-row-width store may hold: PM-KVQ's ladder (the token path unpacks any width up to 16 bits whose
# codes per word, 32 // w, are as `pack` writes them; these are the ones tested).
ROW_WIDTHS = (2, 4, 8, 16)


def _unused(dummy) -> list:
    return [dummy, 0, 0, 0]


def _dense_args(lay: Layout, buf: dict, dummy) -> tuple[list, dict]:
    """Dequantized tokens in the model dtype (fake storage), read like a window."""
    return [*_strided(buf["values"]), dummy, dummy, 0, 0, 0, *_unused(dummy), *_unused(dummy)], \
        dict(FMT=_F_DENSE, **_NO_CONSTS)


def _channel_args(lay: Layout, buf: dict, dummy) -> tuple[list, dict]:
    sc, zr = buf["scale"], buf["zero"]  # [B, H, NB, D, P/G]
    assert sc.stride() == zr.stride() and sc.stride(3) == sc.shape[4] and sc.stride(4) == 1
    mixed = lay.bits is None
    wid = [buf["widths"], *buf["widths"].stride()[:3]] if mixed else _unused(dummy)
    off = [buf["offsets"], *buf["offsets"].stride()] if mixed else _unused(dummy)
    codes = buf["codes"]
    pack11 = lay.codes_per_word == PACK11
    fast = lay.block % TILE_TOKENS == 0 and (mixed or lay.bits in _POW2_BITS) and not pack11
    consts = dict(FMT=_F_CHANNEL, BITS=lay.bits or 2, MIXED=mixed, P=lay.block, G=lay.group,
                  NG=lay.block // lay.group, FAST=fast, ROW_BITS=False, PACK11=pack11)
    return [codes, codes.stride(0), codes.stride(1), 0, sc, zr, *sc.stride()[:3], *wid, *off], consts


def _token_args(lay: Layout, buf: dict, dummy, row_bits: bool = False) -> tuple[list, dict]:
    """Per-token groups; `row_bits`: a width per row (PM-KVQ), from `lens` (see `_lens`), generic path only. BITS
    is then unused and fixed, so shrinks do not recompile the kernel."""
    codes, sc, zr = buf["codes"], buf["scale"], buf["zero"]  # [B, H, T, X]
    assert sc.stride() == zr.stride() and sc.stride(3) == 1
    bits = 2 if row_bits else lay.bits
    consts = dict(FMT=_F_TOKEN, BITS=bits, MIXED=False, P=TILE_TOKENS, G=lay.group, NG=sc.shape[3],
                  FAST=not row_bits and bits in _POW2_BITS, ROW_BITS=row_bits, PACK11=False)
    return [*_strided(codes), sc, zr, *sc.stride()[:3], *_unused(dummy), *_unused(dummy)], consts


def _channel_problem(lay: Layout, buf: dict) -> str | None:
    if lay.bits is None and lay.pack11:
        return "KVmix's 11-codes-per-word 3-bit layout in a mixed-width store has no kernel format"
    if lay.bits is None and lay.block % TILE_TOKENS:
        return f"mixed-width channel block {lay.block} is not a multiple of {TILE_TOKENS} tokens"
    return None


def _token_problem(lay: Layout, buf: dict) -> str | None:
    return None if lay.bits in CODE_BITS else f"token width {lay.bits} is not one of {CODE_BITS}"


def _row_width_problem(lay: Layout, buf: dict) -> str | None:
    widths = sorted(set(buf["row_bits"].tolist()))
    return None if set(widths) <= set(ROW_WIDTHS) else f"per-row token widths {widths} are not all in {ROW_WIDTHS}"


@dataclass(frozen=True)
class StoreFormat:
    """How the kernel reads one packing format."""

    args: Callable[[Layout, dict, torch.Tensor], tuple[list, dict]]  # (tensor args, constexprs) of one stream
    problem: Callable[[Layout, dict], str | None] = lambda lay, buf: None  # why a store is out of reach, or None


# The formats this kernel reads (mixkvq/kv/layout.py); a store of any other format is refused by `supports`.
STORE_FORMATS = {
    PackingFormat.DENSE: StoreFormat(_dense_args),
    PackingFormat.CHANNEL_GROUPS: StoreFormat(_channel_args, _channel_problem),
    PackingFormat.TOKEN_GROUPS: StoreFormat(_token_args, _token_problem),
    PackingFormat.ROW_WIDTH_TOKEN_GROUPS: StoreFormat(partial(_token_args, row_bits=True), _row_width_problem),
}


def _read(store) -> tuple[Layout | None, dict | None]:
    return (None, None) if store is None else (store.layout(), store.buffers())


def _store_args(lay: Layout | None, buf: dict | None, dummy) -> tuple[list, dict]:
    """(tensor args, constexprs) locating one stream's quantized store for the kernel."""
    if lay is None:
        return [*_unused(dummy), dummy, dummy, 0, 0, 0, *_unused(dummy), *_unused(dummy)], \
            dict(FMT=_F_NONE, **_NO_CONSTS)
    return STORE_FORMATS[lay.format].args(lay, buf, dummy)


def supports(layer) -> str | None:
    """Why the fused kernel cannot serve this layer, or None when it can."""
    ks, vs = layer.key_stream, layer.value_stream
    for st in (ks.store, vs.store):
        if st is None:
            continue
        lay = st.layout()
        fmt = STORE_FORMATS.get(lay.format)
        if fmt is None:
            return (f"layout {lay.format.value} has no reader in this kernel "
                    f"(it reads {[f.value for f in STORE_FORMATS]})")
        why = fmt.problem(lay, st.buffers())
        if why is not None:
            return why
    if (ks.sink is None) != (vs.sink is None):
        return "keys and values need the same sink"
    if layer.dim & (layer.dim - 1) or layer.dim < 16:
        return f"head_dim {layer.dim} is not a power of two >= 16"
    return None


def _lens(layer, k: tuple, v: tuple) -> torch.Tensor:
    """Per row (LENS_COLS): sink, key store, value store and total tokens, key and value row widths."""
    ks, vs = layer.key_stream, layer.value_stream
    sink = ks.sink.lens if ks.sink is not None else torch.zeros_like(ks.window.lens)
    if vs.sink is not None and not torch.equal(vs.sink.lens, sink):
        raise RuntimeError("keys and values hold different numbers of sink tokens")
    kq = k[1]["lens"] if k[0] is not None else torch.zeros_like(sink)
    vq = v[1]["lens"] if v[0] is not None else torch.zeros_like(sink)
    total = ks.tokens()
    cols = [sink, kq, vq, total, _row_bits(*k, sink), _row_bits(*v, sink)]  # LENS_COLS
    return torch.stack(cols, dim=1).to(torch.int32)


def _device_lens(layer) -> torch.Tensor:
    """`_lens` of a step a CUDA graph replays, from device tensors alone: the windows' and sink's device lengths, the
    stores' device counts (`Stream.replay_release`) and a per-row-width store's device widths (PM-KVQ)."""
    ks, vs = layer.key_stream, layer.value_stream
    window = ks.window.device_lens
    zero = torch.zeros_like(window)
    sink = ks.sink.device_lens if ks.sink is not None else zero
    kq = ks.store.device_count if ks.store is not None else zero
    vq = vs.store.device_count if vs.store is not None else zero
    kb, vb = (_device_row_bits(s.store, zero) for s in (ks, vs))
    return torch.stack((sink, kq, vq, sink + kq + window, kb, vb), dim=1).to(torch.int32)


def _device_row_bits(store, zero: torch.Tensor) -> torch.Tensor:
    if store is not None and store.layout().format is PackingFormat.ROW_WIDTH_TOKEN_GROUPS:
        return store.device_row_bits
    return zero


def _row_bits(lay: Layout | None, buf: dict | None, like: torch.Tensor) -> torch.Tensor:
    """Each row's code width in a per-row-width store (PM-KVQ, packed), else zeros (the kernel ignores them)."""
    if lay is not None and lay.format is PackingFormat.ROW_WIDTH_TOKEN_GROUPS:
        return buf["row_bits"]
    return torch.zeros_like(like)


@dataclass(frozen=True, eq=False)
class SplitPlan:
    """One call's split-kernel launches, in order: (grid, keyword arguments) each, over the same arguments."""

    args: list
    launches: list[tuple[tuple[int, int, int], dict]]
    o_part: torch.Tensor  # per split: output and log-sum-exp, merged by `_merge_splits_kernel`
    lse_part: torch.Tensor
    num_splits: int


def split_plan(query: torch.Tensor, layer, scaling: float, num_splits: int | None = None, lean: bool | None = None,
               tuning: TritonTuning = DEFAULT_TUNING) -> SplitPlan:
    """The split kernel's launches for `query` over the layer (see `fused_decode`), without launching them."""
    # `supports(layer)` was checked when the kernel was bound to the layer (kernels.resolve_decode_kernel).
    bsz, hq, qlen, dim = query.shape
    assert qlen == 1 and query.stride(-1) == 1
    n_kv = layer.heads
    gq = hq // n_kv
    ks, vs = layer.key_stream, layer.value_stream
    dev = query.device
    k, v = _read(ks.store), _read(vs.store)  # (layout, buffers) of each stream's store
    planned = layer.graph_tokens  # a step a CUDA graph records: device lengths, splits planned for this many tokens
    if planned is None:
        lens_host = _lens(layer, k, v)
        lens = to_device(lens_host, dev)  # through pinned memory: a pageable copy would synchronise the stream
        ln = lens_host.numpy()  # host arithmetic in numpy: a few microseconds less per call than torch ops
        whole = np.minimum(ln[:, 1], ln[:, 2])
        whole = whole - whole % TILE_TOKENS  # per row: tokens in whole tiles of both stores
    else:
        lens, whole = _device_lens(layer), np.zeros(1, dtype=np.int64)
    dummy = ks.window.data
    k_args, kc = _store_args(*k, dummy)
    v_args, vc = _store_args(*v, dummy)
    if lean is None:
        lean = tuning.lean_min_tiles is not None and \
            int(whole.sum()) // TILE_TOKENS * n_kv >= tuning.lean_min_tiles
    lean = bool(lean and kc["FAST"] and vc["FAST"] and int(whole.max()) > 0)
    # Splits cover the tokens after the sink (one kernel) or the whole tiles (lean; the rest is one more split).
    n_split = int(whole.max()) if lean else int((ln[:, 3] - ln[:, 0]).max()) if planned is None else planned
    tiles = max(1, -(-n_split // TILE_TOKENS))
    if num_splits is None:
        per_sm = tuning.split_programs_per_sm if dev.type == "cuda" else 4  # the interpreter: a few splits
        want = -(-per_sm * _sm_count(dev) // (bsz * n_kv))
        num_splits = max(1, min(tiles, want, tuning.max_splits))
    split_tokens = -(-tiles // num_splits) * TILE_TOKENS
    num_splits = max(1, -(-n_split // split_tokens)) + int(lean)
    o_part = torch.empty(bsz, hq, num_splits, dim, dtype=torch.float32, device=dev)
    lse_part = torch.empty(bsz, hq, num_splits, dtype=torch.float32, device=dev)
    model_dtype = ks.window.data.dtype
    # The interpreter's bf16 dot is wrong (DESIGN.md "Kernels"): it multiplies in fp32.
    dot_dtype = _TL_DTYPES[model_dtype] if _ROUNDED_MUL else tl.float32
    fp_bits = torch.empty((), dtype=model_dtype).element_size() * 8
    args = [query, query.stride(0), query.stride(1), lens, o_part, lse_part, scaling * math.log2(math.e),
            split_tokens, num_splits,
            *_buffer_args(ks.sink, dummy), *_buffer_args(ks.window, dummy), *k_args,
            *_buffer_args(vs.sink, dummy), *_buffer_args(vs.window, dummy), *v_args]
    consts = dict(GQ=gq, GP=max(16, triton.next_power_of_2(gq)), D=dim, BT=TILE_TOKENS, HAS_SINK=ks.sink is not None,
                  **{f"K_{k}": v for k, v in kc.items()}, **{f"V_{k}": v for k, v in vc.items()},
                  FP_BITS=fp_bits, MODEL_DTYPE=_TL_DTYPES[model_dtype], DOT_DTYPE=dot_dtype, N_KV=n_kv,
                  num_warps=tuning.num_warps, num_stages=1)  # the loop prefetches by hand; stages only cost smem
    regs = {} if tuning.max_registers is None else dict(maxnreg=tuning.max_registers)
    if lean:
        lean_regs = {} if tuning.lean_max_registers is None else dict(maxnreg=tuning.lean_max_registers)
        launches = [((bsz, n_kv, num_splits - 1), dict(consts, PART=1, **lean_regs)),
                    ((bsz, n_kv, 1), dict(consts, PART=2, **regs))]
    else:
        launches = [((bsz, n_kv, num_splits), dict(consts, PART=0, **regs))]
    return SplitPlan(args, launches, o_part, lse_part, num_splits)


def fused_decode(query: torch.Tensor, layer, scaling: float, num_splits: int | None = None,
                 out: torch.Tensor | None = None, lean: bool | None = None,
                 tuning: TritonTuning = DEFAULT_TUNING) -> torch.Tensor:
    """query [B, Hq, 1, D] -> [B, 1, Hq, D] over the layer's sink + store + window.

    `num_splits` overrides the split count picked from the device's SM count; `out` receives the result; `lean`
    forces (True) or forbids (False) the two-kernel split of whole tiles and the rest (None: `lean_min_tiles`).
    """
    plan = split_plan(query, layer, scaling, num_splits, lean, tuning)
    for grid, kwargs in plan.launches:
        _decode_split_kernel[grid](*plan.args, **kwargs)
    bsz, hq, _, dim = query.shape
    if out is None:
        out = torch.empty(bsz, 1, hq, dim, dtype=query.dtype, device=query.device)
    _merge_splits_kernel[(bsz * hq,)](plan.o_part, plan.lse_part, out, plan.num_splits, D=dim,
                                      SP=max(2, triton.next_power_of_2(plan.num_splits)),
                                      OUT_DTYPE=_TL_DTYPES[query.dtype])
    return out


def decode_attention(module, query: torch.Tensor, layer, scaling: float) -> torch.Tensor:
    """The registered `triton` decode kernel (same signature as the PyTorch reference)."""
    with on_device_of(query):  # layers spread over GPUs: launch on this layer's
        return fused_decode(query, layer, scaling)
