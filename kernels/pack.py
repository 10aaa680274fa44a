"""Triton quantize-and-pack kernels for the cache's flush paths, bit-identical to `quantize` + `pack`.

Two layouts of mixkvq/kv/layout.py, written into buffers the store hands over:
- per-token groups (TOKEN_GROUPS): one program per (token tile, head, row) quantizes G-channel groups of each
  token and writes codes [W words], scale and zero [D/G] straight into the store's RaggedBuffers at each
  row's current length: a released token costs one launch and no intermediate tensor.
- per-channel groups along tokens (CHANNEL_GROUPS): one program per (block, head, channel tile) quantizes
  G-token groups of each channel of a P-token block and writes each channel's words at its pool offset,
  full-precision channels (width code 0) as raw 16/32-bit patterns (`pack_float`), so one launch per width
  present covers the uniform (KIVI) and mixed (MixKVQ) cases.

Bit-exactness with the PyTorch path (`quantize`, on any device) rests on doing the same fp32 operations in the same
order, each rounded once:
- both divisions, (hi - lo) / levels and (x - zero) / scale, are IEEE divisions. `quantize` divides by a tensor on
  every device (ATen turns a division by a Python scalar into a multiply by the fp32 reciprocal on CUDA only, which
  made CUDA scales differ from CPU ones in the last bit); compiled here they are `div.rn.f32` in inline PTX, so the
  compiler can neither approximate them, flush subnormals nor rewrite them as a reciprocal multiply;
- the one product that feeds a sum (the parity test of half-to-even rounding) is exact on integers, so a fused
  multiply-add cannot change it;
- scale and zero are rounded to the metadata dtype to nearest-even; bf16 by integer arithmetic on the fp32
  bits, because the interpreter truncates bf16 casts while the GPU rounds;
- half-to-even rounding of the codes is built from floor (no rint in the interpreter), exact for any fp32.
Importing this module imports Triton but never touches CUDA.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

from mixkvq.kv.quantizer import QuantSpec, check_bits, words_for
from mixkvq.kv.ragged import Ragged, RaggedBuffer, grow

_META = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_MAX_TILE = 4096  # elements of a program's tile: keeps the fp32 tile in registers
# Compiled: divisions in inline PTX (the interpreter runs no PTX; its numpy division is IEEE already).
_PTX_DIV = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") != "1")


@triton.jit
def _div(a, b):
    """a / b, IEEE round-to-nearest with subnormals kept: what torch computes for a tensor divisor on CPU and CUDA."""
    if _PTX_DIV:
        return tl.inline_asm_elementwise("div.rn.f32 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return tl.math.div_rn(a, b)


@triton.jit
def _to_meta(v, META: tl.constexpr):
    """fp32 -> the fp32 value of its round-to-nearest-even metadata-dtype version."""
    if META == 1:
        v = v.to(tl.float16).to(tl.float32)
    elif META == 2:
        b = v.to(tl.uint32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
        v = b.to(tl.float32, bitcast=True)
    return v


@triton.jit
def _round(v, HALF_EVEN: tl.constexpr):
    if HALF_EVEN:
        r = tl.math.floor(v)
        f = v - r  # exact
        odd = (r - 2.0 * tl.math.floor(r * 0.5)) == 1.0
        return tl.where((f > 0.5) | ((f == 0.5) & odd), r + 1.0, r)
    else:
        return tl.math.floor(v + 0.5)  # the same fp32 add as the reference


@triton.jit
def _scale_zero(lo, hi, min_scale, LEVELS: tl.constexpr, UNIT_SCALE: tl.constexpr, META: tl.constexpr):
    """Scale and zero of groups with these min/max, as fp32 values of the meta dtype."""
    s = _div(hi - lo, tl.zeros_like(hi) + LEVELS)
    if UNIT_SCALE:
        s = tl.where(hi > lo, s, 1.0)
    else:
        s = tl.maximum(s, min_scale)
    return _to_meta(s, META), _to_meta(lo, META)


@triton.jit
def _codes(x, scale, zero, valid, LEVELS: tl.constexpr, HALF_EVEN: tl.constexpr):
    q = _round(_div(x - zero, scale), HALF_EVEN)
    q = tl.minimum(tl.maximum(q, 0.0), LEVELS)
    return tl.where(valid, q.to(tl.int32), 0)


@triton.jit
def _tokens_kernel(
    x_ptr, sxb, sxh, sxt, sxd,
    codes_ptr, scb, sch, sct,
    scale_ptr, zero_ptr, ssb, ssh, sst,
    start_ptr, count_ptr, start0, T,
    min_scale,
    D: tl.constexpr, G: tl.constexpr, BITS: tl.constexpr, CPW: tl.constexpr,
    NW_PAD: tl.constexpr, CPW_PAD: tl.constexpr, BT: tl.constexpr,
    HALF_EVEN: tl.constexpr, UNIT_SCALE: tl.constexpr, META: tl.constexpr,
    RAGGED: tl.constexpr,
):
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    t = tl.program_id(0).to(tl.int64) * BT + tl.arange(0, BT)  # source tokens of this program
    if RAGGED:
        live = t < tl.load(count_ptr + b)
        dst_t = t + tl.load(start_ptr + b)
    else:
        live = t < T  # every row writes all T tokens at start0
        dst_t = t + start0
    LEVELS: tl.constexpr = (1 << BITS) - 1
    # Tile [token, word, code]: channel c = word * CPW + j sits at bit j * BITS; padding is masked to code 0.
    w = tl.arange(0, NW_PAD)[None, :, None]
    j = tl.arange(0, CPW_PAD)[None, None, :]
    c = w * CPW + j
    valid = (j < CPW) & (c < D) & live[:, None, None]
    x = tl.load(x_ptr + b * sxb + h * sxh + t[:, None, None] * sxt + c * sxd, mask=valid, other=0.0)
    x = x.to(tl.float32)
    grp = c // G
    scale = tl.full((BT, NW_PAD, CPW_PAD), 1.0, tl.float32)
    zero = tl.zeros((BT, NW_PAD, CPW_PAD), tl.float32)
    meta_off = b * ssb + h * ssh + dst_t * sst
    for g in tl.static_range(D // G):
        in_g = valid & (grp == g)
        lo = tl.min(tl.min(tl.where(in_g, x, float("inf")), axis=2), axis=1)
        hi = tl.max(tl.max(tl.where(in_g, x, float("-inf")), axis=2), axis=1)
        s, z = _scale_zero(lo, hi, min_scale, LEVELS, UNIT_SCALE, META)
        tl.store(scale_ptr + meta_off + g, s, mask=live)
        tl.store(zero_ptr + meta_off + g, z, mask=live)
        scale = tl.where(in_g, s[:, None, None], scale)
        zero = tl.where(in_g, z[:, None, None], zero)
    codes = _codes(x, scale, zero, valid, LEVELS, HALF_EVEN)
    shift = tl.where(j < CPW, j * BITS, 0)
    words = tl.sum(codes << shift, axis=2)  # disjoint bit fields: the sum is their OR (int32 wraps)
    wi = tl.arange(0, NW_PAD)[None, :]
    dst = codes_ptr + b * scb + h * sch + dst_t[:, None] * sct + wi
    tl.store(dst, words, mask=(wi * CPW < D) & live[:, None])


@triton.jit
def _blocks_kernel(
    x_ptr, sxn, sxh, sxt, sxd,
    widths_ptr, base_ptr, rows_ptr, slots_ptr,
    pool_ptr, spb, sph,
    scale_ptr, zero_ptr, ssb, ssh, sss, ssd,
    min_scale,
    H: tl.constexpr, D: tl.constexpr, P: tl.constexpr, G: tl.constexpr,
    WCODE: tl.constexpr, BITS: tl.constexpr, CPW: tl.constexpr, NW: tl.constexpr,
    NW_PAD: tl.constexpr, CPW_PAD: tl.constexpr, BD: tl.constexpr,
    RAW: tl.constexpr, HAS_WIDTHS: tl.constexpr,
    HALF_EVEN: tl.constexpr, UNIT_SCALE: tl.constexpr, META: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    d = tl.program_id(2) * BD + tl.arange(0, BD)
    sel = d < D
    nhd = (n * H + h) * D + d  # widths and base are [N, H, D] contiguous
    if HAS_WIDTHS:
        sel = sel & (tl.load(widths_ptr + nhd, mask=sel, other=255) == WCODE)
    row = tl.load(rows_ptr + n)
    slot = tl.load(slots_ptr + n)
    # Token t = k * CPW + j of channel d goes to word k of that channel, at bit j * BITS.
    k = tl.arange(0, NW_PAD)[:, None, None]
    j = tl.arange(0, CPW_PAD)[None, :, None]
    t = k * CPW + j
    valid = (j < CPW) & (t < P) & sel[None, None, :]
    x = tl.load(x_ptr + n * sxn + h * sxh + t * sxt + d[None, None, :] * sxd, mask=valid, other=0.0)
    if RAW:  # full precision: the value's own bit pattern, as pack_float lays it out
        if BITS == 16:
            codes = x.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        else:
            codes = x.to(tl.int32, bitcast=True)
    else:
        LEVELS: tl.constexpr = (1 << BITS) - 1
        xf = x.to(tl.float32)
        grp = t // G
        scale = tl.full((NW_PAD, CPW_PAD, BD), 1.0, tl.float32)
        zero = tl.zeros((NW_PAD, CPW_PAD, BD), tl.float32)
        meta_off = row * ssb + h * ssh + slot * sss + d * ssd
        for g in tl.static_range(P // G):
            in_g = valid & (grp == g)
            lo = tl.min(tl.min(tl.where(in_g, xf, float("inf")), axis=1), axis=0)
            hi = tl.max(tl.max(tl.where(in_g, xf, float("-inf")), axis=1), axis=0)
            s, z = _scale_zero(lo, hi, min_scale, LEVELS, UNIT_SCALE, META)
            tl.store(scale_ptr + meta_off + g, s, mask=sel)
            tl.store(zero_ptr + meta_off + g, z, mask=sel)
            scale = tl.where(in_g, s[None, None, :], scale)
            zero = tl.where(in_g, z[None, None, :], zero)
        codes = _codes(xf, scale, zero, valid, LEVELS, HALF_EVEN)
    codes = tl.where(valid, codes, 0)
    shift = tl.where(j < CPW, j * BITS, 0)
    words = tl.sum(codes << shift, axis=1)  # [NW_PAD, BD]
    base = tl.load(base_ptr + nhd, mask=sel, other=0)
    kk = tl.arange(0, NW_PAD)[:, None]
    dst = pool_ptr + row * spb + h * sph + base[None, :] + kk
    tl.store(dst, words, mask=(kk < NW) & sel[None, :])


# ---- launchers --------------------------------------------------------------------------------------------


@triton.jit
def _bits16(v, META: tl.constexpr):
    """The 16-bit pattern of a value that is already a 16-bit metadata value (fp16 or bf16) held in fp32."""
    if META == 1:
        return v.to(tl.float16).to(tl.int16, bitcast=True)
    return (v.to(tl.uint32, bitcast=True) >> 16).to(tl.int16)  # exact: the value is a bf16 already


@triton.jit
def _page_token_kernel(
    x_ptr, sxb, sxh, sxt,
    pages_ptr, pages16_ptr, spb, sph,
    count_ptr, lens_ptr, word_at_ptr, shift_at_ptr, meta_slots_ptr, page_words,
    min_scale,
    D: tl.constexpr, G: tl.constexpr, BITS: tl.constexpr, LENS: tl.constexpr,
    HALF_EVEN: tl.constexpr, UNIT_SCALE: tl.constexpr, META: tl.constexpr,
):
    """Token t of row b, head h into its fragment page at the row's device count + t: the codes added into their
    words (slots are disjoint and start at zero, so adding is or-ing), the scales and zeros stored into their 16-bit
    slots. With LENS, rows write only their first lens[b] tokens."""
    h = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    t = tl.program_id(2).to(tl.int64)
    if LENS:
        if t >= tl.load(lens_ptr + b):
            return
    LEVELS: tl.constexpr = (1 << BITS) - 1
    pos = tl.load(count_ptr + b) + t
    in_page = pos % 32
    base = (pos // 32) * page_words  # the page's first word in this (row, head)'s pages
    c = tl.arange(0, D)
    x = tl.load(x_ptr + b * sxb + h * sxh + t * sxt + c).to(tl.float32)
    grp = c // G
    scale = tl.full((D,), 1.0, tl.float32)
    zero = tl.zeros((D,), tl.float32)
    gi = tl.arange(0, D // G)
    scales = tl.zeros((D // G,), tl.float32)
    zeros = tl.zeros((D // G,), tl.float32)
    for g in tl.static_range(D // G):
        in_g = grp == g
        lo = tl.min(tl.where(in_g, x, float("inf")), axis=0)
        hi = tl.max(tl.where(in_g, x, float("-inf")), axis=0)
        sg, zg = _scale_zero(lo, hi, min_scale, LEVELS, UNIT_SCALE, META)
        scale = tl.where(in_g, sg, scale)
        zero = tl.where(in_g, zg, zero)
        scales = tl.where(gi == g, sg, scales)
        zeros = tl.where(gi == g, zg, zeros)
    codes = _codes(x, scale, zero, c < D, LEVELS, HALF_EVEN)
    word = tl.load(word_at_ptr + in_page * D + c)
    shift = tl.load(shift_at_ptr + in_page * D + c)
    row = b * spb + h * sph + base
    tl.atomic_add(pages_ptr + row + word, codes << shift)
    meta = meta_slots_ptr + in_page * (2 * (D // G)) + gi
    tl.store(pages16_ptr + 2 * row + tl.load(meta), _bits16(scales, META))
    tl.store(pages16_ptr + 2 * row + tl.load(meta + D // G), _bits16(zeros, META))


@triton.jit
def _page_keys_kernel(
    x_ptr, sxb, sxh, sxt, sxd,
    pages_ptr, pages16_ptr, spb, sph, page_words,
    table_ptr, p0, per_row,
    slot_src_ptr, meta_at_ptr, code_off, scale_off16, zero_off16,
    min_scale,
    D: tl.constexpr, BITS: tl.constexpr, CODE_BITS: tl.constexpr, TABLE: tl.constexpr,
    HALF_EVEN: tl.constexpr, UNIT_SCALE: tl.constexpr, META: tl.constexpr,
):
    """The keys of one 32-token page (one per-channel group of each channel) of head h into their fragment page:
    quantized, codes gathered into fragment order (`slot_src`: the page token x channel of every code slot, word by
    word) and packed, scales and zeros stored into their 16-bit slots (`meta_at`: channel -> slot). The whole key
    section of the page is written (plain stores, no page content read)."""
    q = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    if TABLE:  # (source row, source token, destination page) per page
        b = tl.load(table_ptr + 3 * q)
        t0 = tl.load(table_ptr + 3 * q + 1)
        page = tl.load(table_ptr + 3 * q + 2)
    else:  # rows in lockstep: row b's pages are its tokens' pages in order, from page p0
        b = q // per_row
        t0 = (q % per_row) * 32
        page = p0 + q % per_row
    LEVELS: tl.constexpr = (1 << CODE_BITS) - 1  # codes of CODE_BITS bits in slots of BITS bits
    CPW: tl.constexpr = 32 // BITS
    t = tl.arange(0, 32)[:, None]
    c = tl.arange(0, D)[None, :]
    x = tl.load(x_ptr + b * sxb + h * sxh + (t0 + t) * sxt + c * sxd).to(tl.float32)  # [32 tokens, D]
    lo = tl.min(x, axis=0)
    hi = tl.max(x, axis=0)
    s, z = _scale_zero(lo, hi, min_scale, LEVELS, UNIT_SCALE, META)
    codes = _codes(x, s[None, :], z[None, :], t < 32, LEVELS, HALF_EVEN)
    k = tl.arange(0, CPW)[None, :]
    w = tl.arange(0, D * BITS)[:, None]  # the page's code words: 32 tokens x D codes of BITS bits
    src = tl.load(slot_src_ptr + w * CPW + k)  # [words, CPW]: the code (token * D + channel) at bit k * BITS
    slots = tl.gather(tl.reshape(codes, (32 * D,)), tl.reshape(src, (32 * D,)), 0)
    words = tl.sum(tl.reshape(slots, (D * BITS, CPW)) << (k * BITS), axis=1)  # disjoint fields: the sum is the OR
    base = b * spb + h * sph + page * page_words
    tl.store(pages_ptr + base + code_off + tl.arange(0, D * BITS), words)
    at = tl.load(meta_at_ptr + tl.arange(0, D))
    tl.store(pages16_ptr + 2 * base + scale_off16 + at, _bits16(s, META))
    tl.store(pages16_ptr + 2 * base + zero_off16 + at, _bits16(z, META))


def _numerics(spec: QuantSpec) -> dict:
    if spec.meta_dtype not in _META:
        raise ValueError(f"meta dtype {spec.meta_dtype} is not supported by the pack kernels")
    return dict(
        min_scale=float(spec.min_scale),  # an fp32 kernel argument, as torch's clamp_min casts it
        HALF_EVEN=spec.rounding == "half_even",
        UNIT_SCALE=spec.degenerate_group == "unit_scale",
        META=_META[spec.meta_dtype],
    )


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def on_device_of(t: torch.Tensor):
    # Triton launches on the current CUDA device; with layers spread over GPUs that need not be the tensor's.
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def quantize_pack_tokens_into(x: torch.Tensor, bits: int, group: int, spec: QuantSpec, codes: torch.Tensor,
                              scale: torch.Tensor, zero: torch.Tensor, starts: torch.Tensor | int = 0,
                              counts: torch.Tensor | None = None, tile_elements: int = _MAX_TILE) -> None:
    """Quantize per-token groups of x [B, H, T, D] and write them into preallocated destinations.

    codes [B, H, cap, words_for(D, bits)] int32, scale/zero [B, H, cap, D // group] (meta dtype). With
    starts/counts tensors (int64 [B], on x's device) row b writes its first counts[b] tokens at starts[b]..;
    with an int start and no counts, every row writes all T tokens at start.. (no index tensor to ship to the
    device). Nothing else of the destinations is touched. `tile_elements` bounds a program's tile (tests make it
    small, so that a few tokens span several programs)."""
    bits = check_bits(bits, "bits")
    b, h, t, d = x.shape
    if d % group:
        raise ValueError(f"group {group} does not divide head dim {d}")
    nw, cpw = words_for(d, bits), 32 // bits
    if codes.shape[-1] != nw or scale.shape[-1] != d // group or zero.stride() != scale.stride():
        raise ValueError("destination shapes do not match the layout")
    if codes.stride(-1) != 1 or scale.stride(-1) != 1 or scale.dtype != spec.meta_dtype or zero.dtype != scale.dtype:
        raise ValueError("destinations must be dense along their last dim and in the meta dtype")
    if b * h * t == 0:
        return
    ragged = counts is not None
    start0 = 0 if ragged else int(starts)
    if not ragged:
        starts = counts = codes  # placeholders, never read
    nw_pad, cpw_pad = _pow2(nw), _pow2(cpw)
    bt = min(_pow2(t), max(1, tile_elements // (nw_pad * cpw_pad)))
    with on_device_of(x):
        _tokens_kernel[(triton.cdiv(t, bt), h, b)](
            x, *x.stride(), codes, *codes.stride()[:3], scale, zero, *scale.stride()[:3], starts, counts, start0, t,
            D=d, G=group, BITS=bits, CPW=cpw, NW_PAD=nw_pad, CPW_PAD=cpw_pad, BT=bt, RAGGED=ragged,
            **_numerics(spec), num_warps=1 if bt * nw_pad * cpw_pad <= 256 else 4,
        )


def quantize_pack_tokens(x: torch.Tensor, bits: int, group: int, spec: QuantSpec, tile_elements: int = _MAX_TILE):
    """x [N, H, T, D] -> (codes int32 [N, H, T, words_for(D, bits)], scale, zero [N, H, T, D // group])."""
    n, h, t, d = x.shape
    codes = torch.empty(n, h, t, words_for(d, bits), dtype=torch.int32, device=x.device)
    scale = torch.empty(n, h, t, d // group, dtype=spec.meta_dtype, device=x.device)
    zero = torch.empty_like(scale)
    quantize_pack_tokens_into(x, bits, group, spec, codes, scale, zero, tile_elements=tile_elements)
    return codes, scale, zero


def append_tokens(r: Ragged, bits: int, group: int, spec: QuantSpec, codes: RaggedBuffer, scale: RaggedBuffer,
                  zero: RaggedBuffer) -> None:
    """Quantize per-token groups of r's rows and append them to the three buffers of a per-token store (codes,
    scale, zero) in one launch: grown as RaggedBuffer.append grows them, written in place."""
    if int(r.lens.max()) == 0:
        return
    bufs = (codes, scale, zero)
    need = int((codes.lens + r.lens).max())
    for buf in bufs:
        buf.data = grow(buf.data, 2, need)
    lens, t = codes.lens, r.data.shape[2]
    full = r.common == t if r.common is not None else bool((r.lens == t).all())  # every row appends all t tokens
    if full and codes.common is not None:  # ... at the same place (samples of one prompt): no op on the lengths
        starts, counts = codes.common, None
    else:
        starts, counts = torch.stack((lens, r.lens)).to(r.data.device, non_blocking=True)
    quantize_pack_tokens_into(r.data, bits, group, spec, codes.data, scale.data, zero.data, starts, counts)
    for buf in bufs:
        buf.lens += r.lens


def quantize_pack_channel_blocks(blocks: torch.Tensor, widths: int | torch.Tensor, group: int, spec: QuantSpec,
                                 pool: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, rows: torch.Tensor,
                                 slots: torch.Tensor, word_base: torch.Tensor) -> None:
    """Quantize per-channel groups of `group` tokens of blocks [N, H, P, D] and write them in place.

    widths: one code width for every channel (2/3/4/8), or a [N, H, D] tensor of width codes per channel,
    0 (FULL_PRECISION) stored raw as `pack_float` does. Block n goes to row rows[n], block slot slots[n]:
    channel d's words at pool[rows[n], h, word_base[n, h, d]:...] (word_base [N, H] gives the block start,
    channels then follow one another), its scale/zero at scale[rows[n], h, slots[n], d, :]. rows, slots and
    word_base live on the blocks' device. Full-precision channels leave scale/zero untouched."""
    n, h, p, d = blocks.shape
    if p % group:
        raise ValueError(f"group {group} does not divide block {p}")
    if n * h == 0:
        return
    fp_bits = blocks.element_size() * 8
    if isinstance(widths, int):
        present = [check_bits(widths, "width")]
        width_map = None
    else:
        width_map = widths.to(torch.uint8).contiguous()
        present = [int(w) for w in width_map.unique().tolist()]
    if word_base.dim() == 2:  # uniform width: channels follow one another from the block start
        word_base = word_base[:, :, None] + torch.arange(d, device=word_base.device) * words_for(p, present[0])
    word_base = word_base.to(torch.int64).contiguous()
    if pool.stride(-1) != 1 or scale.stride(-1) != 1 or zero.stride() != scale.stride():
        raise ValueError("pool and scale/zero must be dense along their last dim, scale and zero alike")
    for w in present:
        raw = w == 0
        bits = fp_bits if raw else check_bits(w, "width")
        cpw = 32 // bits
        nw = -(-p // cpw)
        nw_pad, cpw_pad = _pow2(nw), _pow2(cpw)
        bd = min(_pow2(d), max(1, _MAX_TILE // (nw_pad * cpw_pad)))
        with on_device_of(blocks):
            _blocks_kernel[(n, h, triton.cdiv(d, bd))](
                blocks, *blocks.stride(), width_map if width_map is not None else word_base, word_base, rows,
                slots, pool, *pool.stride()[:2], scale, zero, *scale.stride()[:4],
                H=h, D=d, P=p, G=group, WCODE=w, BITS=bits, CPW=cpw, NW=nw, NW_PAD=nw_pad, CPW_PAD=cpw_pad,
                BD=bd, RAW=raw, HAS_WIDTHS=width_map is not None, **_numerics(spec), num_warps=4,
            )


def append_page_tokens(x: torch.Tensor, bits: int, group: int, spec: QuantSpec, pages: torch.Tensor,
                       count: torch.Tensor, word_at: torch.Tensor, shift_at: torch.Tensor, meta_slots: torch.Tensor,
                       page_words: int, lens: torch.Tensor | None = None) -> None:
    """Tokens x [B, H, T, D] (channels dense) quantized per token into fragment pages [B, H, pages, words] from each
    row's device `count` on, in one launch (`lens` [B] on the device: row b's first lens[b] tokens only): what
    `PagedValueStore.append` writes (the tables are its own). With T = 1 a CUDA graph replays one kernel instead of
    a dozen ops. Bit for bit the PyTorch path's (tests/test_pack_kernels)."""
    bits = check_bits(bits, "bits")
    b, h, t, d = x.shape
    if x.stride(3) != 1 or not pages.is_contiguous() or spec.meta_dtype not in (torch.float16, torch.bfloat16):
        raise ValueError("page token writes need dense channels, contiguous pages and 16-bit metadata")
    flat = pages.view(b, h, -1)
    with on_device_of(x):
        _page_token_kernel[(h, b, t)](
            x, *x.stride()[:3], flat, flat.view(torch.int16), flat.stride(0), flat.stride(1),
            count, lens if lens is not None else count, word_at, shift_at, meta_slots, page_words,
            D=d, G=group, BITS=bits, LENS=lens is not None, **_numerics(spec), num_warps=1 if d <= 64 else 2,
        )


def page_key_tables(head_dim: int, bits: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(slot_src, meta_at) of `write_page_keys` for this page format, on `device`: for every code word of a page's
    key section and every code in it (at bit k * bits), its token * head_dim + channel within the page's 32
    tokens; and each channel's position among the page's 16-bit key scales (`channel_meta_order`)."""
    from mixkvq.kv.layout import FragmentPageLayout, channel_meta_order, code_order

    w, rpw = FragmentPageLayout.words_per_lane(head_dim, bits), 16 // bits
    order = code_order(head_dim, bits, "key")  # [32 lanes, W, R, 2 halves, (token, channel)]
    tile = (order[..., 0] * head_dim + order[..., 1]).reshape(32 * w, rpw, 2)  # (lane word, j, half)
    tile = tile.transpose(1, 2).reshape(32 * w, 2 * rpw)  # code k = half * rpw + j sits at bit k * bits
    slot_src = torch.cat((tile, tile + 16 * head_dim))  # the page's second 16-token tile follows the first
    meta_at = torch.argsort(channel_meta_order(head_dim))
    return slot_src.to(torch.int32).to(device), meta_at.to(torch.int32).to(device)


def write_page_keys(x: torch.Tensor, bits: int, spec: QuantSpec, pages: torch.Tensor, sections: dict,
                    tables: tuple[torch.Tensor, torch.Tensor], *, table: torch.Tensor | None = None, p0: int = 0,
                    pages_per_row: int = 0, slot_bits: int | None = None) -> None:
    """Keys x [R, H, T, D] quantized per channel over 32-token pages into fragment pages [B, H, pages, words]:
    page q of source row b (tokens 32 q ..) into page p0 + q of row b (rows in lockstep, `pages_per_row` each),
    or per `table` row (source row, source token, destination page) [N, 3] int64 on the pages' device. One launch
    for every page: what `PagedKeyStore._encode` and its writes store (tests/test_pack_kernels.py).
    `sections`: the page layout's int32 word (offset, count) of key_codes, key_scale and key_zero; codes of `bits`
    bits go into slots of `slot_bits` (default `bits`), the page format's width, and `tables` are that format's."""
    bits = check_bits(bits, "bits")
    slot_bits = bits if slot_bits is None else slot_bits
    h, d = x.shape[1], x.shape[3]
    if not pages.is_contiguous() or spec.meta_dtype not in (torch.float16, torch.bfloat16):
        raise ValueError("key page writes need contiguous pages and 16-bit metadata")
    n = len(table) if table is not None else x.shape[0] * pages_per_row
    if n == 0:
        return
    with on_device_of(x):
        _page_keys_kernel[(n, h)](
            x, *x.stride(), pages, pages.view(torch.int16), pages.stride(0), pages.stride(1), pages.shape[3],
            table if table is not None else pages, p0, max(pages_per_row, 1), *tables,
            sections["key_codes"][0], 2 * sections["key_scale"][0], 2 * sections["key_zero"][0],
            D=d, BITS=slot_bits, CODE_BITS=bits, TABLE=table is not None, **_numerics(spec), num_warps=4,
        )
