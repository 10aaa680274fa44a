"""KV storage shared by every method: the quantized stores over the ragged buffers of `mixkvq.ragged`.

Two quantized layouts cover the four methods (METHODS.md §1):
- ChannelGroupStore: tokens arrive in blocks of P tokens; each channel of each block of each head has its
  own width (2/3/4/8-bit codes in groups of G tokens, or full precision). KIVI keys are the uniform case,
  MixKVQ keys the mixed case. Codes live in one int32 word pool per (row, head).
- TokenGroupStore: per-token groups of G channels at one width per store (values; PM-KVQ keys).

`packed=True` keeps real codes and metadata (the only source of memory figures); `packed=False` ("fake")
keeps the dequantized tensor, computed by the same `dequantize`, so both give identical attention inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mixkvq.layout import Layout, PackingFormat
from mixkvq.quantizer import PACK11, QuantSpec, clamp_slot11, dequantize, pack, pack11, pack_float, quantize, unpack, words_for
from mixkvq.ragged import Ragged, RaggedBuffer, from_token, grow, reserve, to_device, whole_blocks

FULL_PRECISION = 0  # width code of a channel kept in the model dtype
# Packed writes through the Triton kernels of kernels/pack.py: "auto" on CUDA tensors, "on" everywhere (CPU runs
# them in the Triton interpreter: tests), "off" never. They store the bits `quantize` + `pack` store, on CPU and on
# CUDA (both divide with IEEE division; tests/test_pack_kernels.py), so fake storage still gives the same tokens.
PACK_KERNELS = "auto"


def _pack_kernels(t: torch.Tensor) -> bool:
    return PACK_KERNELS == "on" or (PACK_KERNELS == "auto" and t.is_cuda)


def _fp_bits(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size() * 8


class ChannelGroupStore:
    """Per-channel groups along tokens, in blocks of `block` tokens with a width per (block, head, channel)."""

    def __init__(self, batch, heads, dim, block, group, dtype, device, spec: QuantSpec, packed: bool,
                 uniform_width: int | None, pack11: bool = False):
        assert block % group == 0
        # KVmix's repo layout: 3-bit channels pack 11 codes per int32, the 11th clamped to 2 bits (block % 11 == 0).
        self.pack11 = pack11
        assert not pack11 or block % PACK11 == 0
        self.b, self.h, self.d, self.p, self.g = batch, heads, dim, block, group
        self.dtype, self.device, self.spec, self.packed = dtype, device, spec, packed
        self.fp_bits = _fp_bits(dtype)
        self.uniform_width = uniform_width  # known widths need no per-block width map or offsets
        self.nblocks = torch.zeros(batch, dtype=torch.int64)
        self.code_bits = torch.zeros(batch, dtype=torch.float64)  # per row, summed over heads
        self.live_bytes = torch.zeros(batch, dtype=torch.int64)
        meta = spec.meta_dtype
        ng = block // group
        if packed:
            self.pool = torch.zeros(batch, heads, 0, dtype=torch.int32, device=device)
            self.used = torch.zeros(batch, heads, dtype=torch.int64)
            self.scale = torch.zeros(batch, heads, 0, dim, ng, dtype=meta, device=device)
            self.zero = torch.zeros(batch, heads, 0, dim, ng, dtype=meta, device=device)
            if uniform_width is None:
                self.widths = torch.zeros(batch, heads, 0, dim, dtype=torch.uint8, device=device)
                self.offsets = torch.zeros(batch, heads, 0, dtype=torch.int64, device=device)
        else:
            self.values = torch.zeros(batch, heads, 0, block, dim, dtype=dtype, device=device)
        self.tier_counts: dict[int, int] = {}
        self.version = 0  # bumped by anything that rewrites stored tokens in place (none yet)

    # -- layout arithmetic -------------------------------------------------------------------------------

    def layout(self) -> Layout:
        if not self.packed:
            return Layout(PackingFormat.DENSE)
        return Layout(PackingFormat.CHANNEL_GROUPS, bits=self.uniform_width, group=self.g, block=self.p,
                      pack11=self.pack11)

    def channel_words(self, widths: torch.Tensor) -> torch.Tensor:
        """int32 words one channel of one block occupies, per width code."""
        full = self.p * self.fp_bits // 32
        out = torch.full_like(widths, full, dtype=torch.int64)
        for w in widths.unique().tolist():
            if w != FULL_PRECISION:
                out[widths == w] = -(-self.p // PACK11) if self._is11(w) else words_for(self.p, w)
        return out

    def _is11(self, w: int) -> bool:
        return self.pack11 and w == 3

    def _code_bits(self, widths: torch.Tensor) -> torch.Tensor:
        bits = torch.where(widths == FULL_PRECISION, self.fp_bits, widths.to(torch.int64)).to(torch.float64)
        if self.pack11:  # 32 bits per 11 codes (METHODS.md §2)
            bits = torch.where(widths == 3, 32 / PACK11, bits)
        return bits * self.p

    def _bytes_per_block(self) -> int:
        meta = 2 * self.d * (self.p // self.g) * self.spec.meta_dtype.itemsize
        index = 0 if self.uniform_width is not None else self.d * 1 + 8  # width map (uint8) + pool offset
        return meta + index

    # -- writes --------------------------------------------------------------------------------------------

    def append(self, r: Ragged, widths_fn) -> None:
        """Store the released tokens of each row (a multiple of `block` per row) as whole blocks."""
        split = whole_blocks(r, self.p)
        if split is None:
            return
        nb, rows, local, blocks = split
        dev = r.data.device
        if self.uniform_width is not None:
            widths = torch.full((len(rows), self.h, self.d), self.uniform_width, dtype=torch.uint8, device=dev)
        else:
            widths = widths_fn(blocks, rows).to(torch.uint8)
        slot = self.nblocks[rows] + local  # block index within each row
        self._count(widths, rows)
        if self.packed:
            self._write_packed(blocks, widths, rows, slot)
        else:
            self._write_fake(blocks, widths, rows, slot)
        self.nblocks += nb

    def _count(self, widths: torch.Tensor, rows: torch.Tensor) -> None:
        per_block_bits = self._code_bits(widths).sum(dim=(1, 2)).to(torch.float64).cpu()
        words = self.channel_words(widths).sum(dim=2).cpu()  # [N, H]
        per_block_bytes = words.sum(1) * 4 + self.h * self._bytes_per_block()
        self.code_bits.index_add_(0, rows, per_block_bits)
        self.live_bytes.index_add_(0, rows, per_block_bytes)
        for w, c in zip(*widths.unique(return_counts=True)):
            self.tier_counts[int(w)] = self.tier_counts.get(int(w), 0) + int(c)

    def _encode(self, blocks, widths):
        """Per-width groups of channel rows: yields (mask [N,H,D], words [M, wpc], scale, zero)."""
        chans = blocks.transpose(2, 3)  # [N, H, D, P]
        for w in widths.unique().tolist():
            mask = widths == w
            x = chans[mask]  # [M, P]
            if w == FULL_PRECISION:
                yield mask, pack_float(x), None, None
            else:
                codes, scale, zero = quantize(x.reshape(len(x), -1, self.g), w, self.spec)
                codes = codes.reshape(len(x), self.p)
                yield mask, pack11(codes) if self._is11(w) else pack(codes, w), scale, zero

    def _write_packed(self, blocks, widths, rows, slot):
        dev = self.device
        wpc = self.channel_words(widths)  # [N, H, D]
        chan_off = torch.cumsum(wpc, dim=2) - wpc
        total = wpc.sum(dim=2).cpu()  # [N, H]
        # Blocks of one row are laid out one after another in that row's pool, after what is there.
        excl = torch.cumsum(total, 0) - total
        per_row = torch.bincount(rows, minlength=self.b)
        first = torch.cumsum(per_row, 0) - per_row
        start = self.used[rows] + excl - excl[first[rows]]  # [N, H]
        added = torch.zeros_like(self.used).index_add_(0, rows, total)
        need = int((self.used + added).max())
        if need > self.pool.shape[2]:
            self.pool = reserve(self.pool, 2, self._pool_need(need, int((self.nblocks + per_row).max())))
        nslots = int((slot + 1).max())
        self.scale = grow(self.scale, 2, nslots)  # (no-ops within a reservation)
        self.zero = grow(self.zero, 2, nslots)
        flat_pool = self.pool.view(self.b * self.h, -1)
        heads = torch.arange(self.h)
        row_head = to_device((rows[:, None, None] * self.h + heads[None, :, None]).expand(widths.shape), dev)
        start_d = to_device(start, dev)
        base = start_d[:, :, None] + chan_off  # [N, H, D] word offset of each channel
        rows_d, slot_d = to_device(torch.stack((rows, slot)), dev)
        if _pack_kernels(blocks) and not self.pack11:  # the kernels know the 10-per-word 3-bit layout only
            from kernels.pack import write_channel_blocks

            write_channel_blocks(self, blocks, widths, rows_d, slot_d, base)
        else:
            for mask, words, scale, zero in self._encode(blocks, widths):
                dst = base[mask][:, None] + torch.arange(words.shape[1], device=dev)[None, :]
                flat_pool[row_head[mask][:, None], dst] = words
                if scale is not None:
                    n_idx, h_idx, d_idx = mask.nonzero(as_tuple=True)
                    self.scale[rows_d[n_idx], h_idx, slot_d[n_idx], d_idx] = scale
                    self.zero[rows_d[n_idx], h_idx, slot_d[n_idx], d_idx] = zero
        if self.uniform_width is None:
            self.widths = grow(self.widths, 2, nslots)
            self.offsets = grow(self.offsets, 2, nslots)
            self.widths[rows_d, :, slot_d] = widths
            self.offsets[rows_d, :, slot_d] = start_d
        self.used += added

    def _write_fake(self, blocks, widths, rows, slot):
        dev = self.device
        self.values = grow(self.values, 2, int((slot + 1).max()))
        chans = blocks.transpose(2, 3).clone()  # [N, H, D, P]
        for w in widths.unique().tolist():
            if w != FULL_PRECISION:
                mask = widths == w
                x = chans[mask].reshape(int(mask.sum()), -1, self.g)
                codes, scale, zero = quantize(x, w, self.spec)
                if self._is11(w):
                    codes = clamp_slot11(codes.reshape(len(x), self.p)).reshape(codes.shape)
                chans[mask] = dequantize(codes, scale, zero, self.dtype).reshape(len(x), self.p)
        rows_d, slot_d = to_device(torch.stack((rows, slot)), dev)
        self.values[rows_d, :, slot_d] = chans.transpose(2, 3)

    # -- reads ---------------------------------------------------------------------------------------------

    def block_widths(self) -> torch.Tensor:
        """Width code per (row, head, block, channel) for the stored blocks (packed mode)."""
        nb = int(self.nblocks.max())
        if self.uniform_width is not None:
            return torch.full((self.b, self.h, nb, self.d), self.uniform_width, dtype=torch.uint8, device=self.device)
        return self.widths[:, :, :nb]

    def ragged(self, start: int = 0) -> Ragged:
        """Dequantized tokens of blocks start.. of every row (start counts tokens, a multiple of `block`)."""
        first = start // self.p
        nb = int(self.nblocks.max()) - first
        lens = ((self.nblocks - first) * self.p).clamp_min(0)
        if nb <= 0:
            return Ragged(torch.zeros(self.b, self.h, 0, self.d, dtype=self.dtype, device=self.device), lens)
        if not self.packed:
            return Ragged(self.values[:, :, first:first + nb].reshape(self.b, self.h, nb * self.p, self.d), lens)
        widths = self.block_widths()[:, :, first:].to(torch.int64)  # [B, H, NB, D]
        wpc = self.channel_words(widths)
        if self.uniform_width is not None:
            block_start = (torch.arange(nb, device=self.device) + first) * wpc[0, 0, 0].sum()
            block_start = block_start.expand(self.b, self.h, nb)
        else:
            block_start = self.offsets[:, :, first:first + nb]
        chan_off = block_start[..., None] + torch.cumsum(wpc, -1) - wpc
        is_fp = widths == FULL_PRECISION
        bits = torch.where(is_fp, self.fp_bits, widths)
        cpw = 32 // bits
        if self.pack11:
            cpw = torch.where(bits == 3, PACK11, cpw)
        t = torch.arange(self.p, device=self.device)
        word_idx = chan_off[..., None] + t // cpw[..., None]  # [B, H, NB, D, P]
        word_idx = word_idx.clamp_max(max(self.pool.shape[2] - 1, 0))
        words = self.pool.gather(2, word_idx.reshape(self.b, self.h, -1)).reshape(word_idx.shape)
        raw = ((words.to(torch.int64) & 0xFFFFFFFF) >> ((t % cpw[..., None]) * bits[..., None])) & (
            (1 << bits[..., None]) - 1
        )
        group = t // self.g
        scale = self.scale[:, :, first:first + nb][..., group]  # [B, H, NB, D, P]
        zero = self.zero[:, :, first:first + nb][..., group]
        quant = (raw.float() * scale.float() + zero.float()).to(self.dtype)
        if self.fp_bits == 16:
            fp = torch.where(raw >= 1 << 15, raw - (1 << 16), raw).to(torch.int16).view(self.dtype)
        else:
            fp = torch.where(raw >= 1 << 31, raw - (1 << 32), raw).to(torch.int32).view(self.dtype)
        vals = torch.where(is_fp[..., None], fp, quant)
        return Ragged(vals.transpose(3, 4).reshape(self.b, self.h, nb * self.p, self.d), lens)

    def allocated_bytes(self) -> int:
        tensors = [self.pool, self.scale, self.zero] if self.packed else [self.values]
        if self.packed and self.uniform_width is None:
            tensors += [self.widths, self.offsets]
        return sum(t.numel() * t.element_size() for t in tensors)

    def tokens(self) -> torch.Tensor:
        return self.nblocks * self.p

    def reserve(self, tokens: int) -> None:
        """Room for `tokens` tokens per row. Mixed widths (MixKVQ) cannot know their pool's final size: the pool
        then grows by extrapolating its words per block so far to the reserved blocks (`_pool_need`)."""
        blocks = -(-tokens // self.p)
        self.reserved_blocks = blocks
        if not self.packed:
            self.values = reserve(self.values, 2, blocks)
            return
        for name in ("scale", "zero") + (("widths", "offsets") if self.uniform_width is None else ()):
            setattr(self, name, reserve(getattr(self, name), 2, blocks))
        if self.uniform_width is not None:
            words = int(self.channel_words(torch.full((1, 1, self.d), self.uniform_width, dtype=torch.uint8)).sum())
            self.pool = reserve(self.pool, 2, blocks * words)

    def _pool_need(self, need: int, blocks: int) -> int:
        """Pool words to allocate for a row that needs `need` words after `blocks` blocks."""
        reserved = getattr(self, "reserved_blocks", 0)
        if reserved <= blocks:  # no reservation, or past it: amortised doubling
            return max(need, 2 * self.pool.shape[2], 16)
        return -(-need * reserved // blocks)  # the words per block so far, over every reserved block


class TokenGroupStore:
    """Per-token groups of `group` channels, one code width for the whole store."""

    def __init__(self, batch, heads, dim, group, bits, dtype, device, spec: QuantSpec, packed: bool):
        assert dim % group == 0
        self.b, self.h, self.d, self.g, self.bits = batch, heads, dim, group, bits
        self.dtype, self.spec, self.packed = dtype, spec, packed
        meta = spec.meta_dtype
        if packed:
            self.codes = RaggedBuffer(batch, heads, words_for(dim, bits), torch.int32, device)
            self.scale = RaggedBuffer(batch, heads, dim // group, meta, device)
            self.zero = RaggedBuffer(batch, heads, dim // group, meta, device)
        else:
            self.values = RaggedBuffer(batch, heads, dim, dtype, device)
        self.bytes_per_token = heads * (words_for(dim, bits) * 4 + 2 * (dim // group) * meta.itemsize)
        self.version = 0  # bumped by anything that rewrites stored tokens in place (none yet)

    def append(self, r: Ragged, widths_fn=None) -> None:
        if self.packed and _pack_kernels(r.data):
            from kernels.pack import append_tokens

            return append_tokens(self, r)
        lead = r.data.shape[:3]
        codes, scale, zero = quantize(r.data.reshape(*lead, self.d // self.g, self.g), self.bits, self.spec)
        if self.packed:
            self.codes.append(Ragged(pack(codes.reshape(*lead, self.d), self.bits), r.lens, r.common))
            self.scale.append(Ragged(scale, r.lens, r.common))
            self.zero.append(Ragged(zero, r.lens, r.common))
        else:
            self.values.append(Ragged(dequantize(codes, scale, zero, self.dtype).reshape(*lead, self.d), r.lens,
                                      r.common))

    def tokens(self) -> torch.Tensor:
        return (self.codes if self.packed else self.values).lens

    def reserve(self, tokens: int) -> None:
        for buf in [self.codes, self.scale, self.zero] if self.packed else [self.values]:
            buf.reserve(tokens)

    def layout(self) -> Layout:
        return Layout(PackingFormat.TOKEN_GROUPS, bits=self.bits, group=self.g) if self.packed \
            else Layout(PackingFormat.DENSE)

    @property
    def code_bits(self) -> torch.Tensor:
        return self.tokens().to(torch.float64) * self.h * self.d * self.bits

    @property
    def live_bytes(self) -> torch.Tensor:
        return self.tokens() * self.bytes_per_token

    def ragged(self, start: int = 0) -> Ragged:
        """Dequantized tokens start.. of every row."""
        if not self.packed:
            return from_token(self.values.view(), start)
        codes, scale, zero = (from_token(buf.view(), start) for buf in (self.codes, self.scale, self.zero))
        lead = codes.data.shape[:3]
        q = unpack(codes.data, self.bits, self.d).reshape(*lead, self.d // self.g, self.g)
        return Ragged(dequantize(q, scale.data, zero.data, self.dtype).reshape(*lead, self.d), codes.lens)

    def allocated_bytes(self) -> int:
        bufs = [self.codes, self.scale, self.zero] if self.packed else [self.values]
        return sum(b.allocated_bytes() for b in bufs)


SHRINK_RULES = ("equivalent", "direct", "modified")


def shrink_codes(codes: torch.Tensor, bits: int, rule: str) -> torch.Tensor:
    """Map 2b-bit codes to b-bit codes with integer arithmetic only (PM-KVQ §6.2; `bits` is the new b).

    equivalent: X_b = ((2^{2b} - 2^b + 1)·(X_2b + 2^{b-1})) >> 3b, i.e. round(X_2b / (2^b + 1)), the exact
    dequantize-then-requantize under Z_b = Z_2b, S_b = (2^b + 1)·S_2b. direct / modified keep the top b bits
    (Table 3 ablation).
    """
    x = codes.to(torch.int64)
    b = bits
    if rule == "equivalent":
        y = (((1 << 2 * b) - (1 << b) + 1) * (x + (1 << (b - 1)))) >> (3 * b)
    else:
        y = x >> b
    return y.clamp_(0, (1 << b) - 1).to(codes.dtype)


def shrink_scale_factor(bits: int, rule: str) -> int:
    """S_b / S_2b for a shrink to b bits: 2^b + 1 (equivalent, direct) or 2^b (modified)."""
    return (1 << bits) if rule == "modified" else (1 << bits) + 1


class ProgressiveTokenStore(TokenGroupStore):
    """PM-KVQ's main cache: per-token groups whose code width β (16 -> 8 -> 4 -> 2) shrinks over time, per row.

    Layout as TokenGroupStore (codes, scale, zero RaggedBuffers). `row_bits[b]` is row b's current width; the
    codes buffer is words_for(D, max β) int32 words wide, and a row at a smaller β uses the first
    words_for(D, β) words of each token (the rest are zero). When the widest row shrinks the buffer is
    narrowed, so allocated memory follows. `shrink` rewrites the stored tokens in place and bumps `version`.
    Fake storage keeps the dequantized tokens (`values`, what kernels read densely) plus the codes unpacked
    ([B, H, T, D] int32), and re-quantizes in float64 on a shrink; the tests check that this equals the packed
    integer shift for every code, so both give the same tokens.
    """

    def __init__(self, batch, heads, dim, group, bits, dtype, device, spec: QuantSpec, packed: bool):
        super().__init__(batch, heads, dim, group, bits, dtype, device, spec, packed)
        self.row_bits = torch.full((batch,), bits, dtype=torch.int64)
        if not packed:  # fake: the dense tokens kernels read (`values`), plus unpacked codes for shrinking
            self.codes = RaggedBuffer(batch, heads, dim, torch.int32, device)
            self.scale = RaggedBuffer(batch, heads, dim // group, spec.meta_dtype, device)
            self.zero = RaggedBuffer(batch, heads, dim // group, spec.meta_dtype, device)

    def reserve(self, tokens: int) -> None:
        """Nothing: the store's width falls as it shrinks, so room reserved at its starting width (16 bits)
        would outlive the shrink; its buffers grow as needed and the layer budget bounds them."""

    @property
    def bits(self) -> int:
        """The store's one code width, as TokenGroupStore readers expect; 0 while rows differ (no single width)."""
        rb = getattr(self, "row_bits", None)
        if rb is None:
            return self._bits
        return int(rb[0]) if bool((rb == rb[0]).all()) else 0

    @bits.setter
    def bits(self, value: int) -> None:
        self._bits = value

    @property
    def container_bits(self) -> int:
        return int(self.row_bits.max())

    def layout(self) -> Layout:
        return Layout(PackingFormat.ROW_WIDTH_TOKEN_GROUPS, group=self.g) if self.packed \
            else Layout(PackingFormat.DENSE)

    def _width(self, bits: int) -> int:
        return words_for(self.d, bits) if self.packed else self.d

    def append(self, r: Ragged, widths_fn=None) -> None:
        if int(r.lens.max()) == 0:
            return
        lead = r.data.shape[:3]
        codes_out = torch.zeros(*lead, self._width(self.container_bits), dtype=torch.int32, device=r.data.device)
        scale_out = torch.zeros(*lead, self.d // self.g, dtype=self.spec.meta_dtype, device=r.data.device)
        zero_out = torch.zeros_like(scale_out)
        for bits in self.row_bits.unique().tolist():
            rows = to_device((self.row_bits == bits).nonzero(as_tuple=True)[0], r.data.device)
            x = r.data[rows].reshape(len(rows), *lead[1:], self.d // self.g, self.g)
            codes, scale, zero = quantize(x, bits, self.spec)
            codes = codes.reshape(len(rows), *lead[1:], self.d)
            words = pack(codes, bits) if self.packed else codes.to(torch.int32)
            codes_out[rows, ..., : words.shape[-1]] = words
            scale_out[rows], zero_out[rows] = scale, zero
        self.codes.append(Ragged(codes_out, r.lens))
        self.scale.append(Ragged(scale_out, r.lens))
        self.zero.append(Ragged(zero_out, r.lens))
        if not self.packed:
            self.values.append(self._dequantized(Ragged(codes_out, r.lens), Ragged(scale_out, r.lens),
                                                 Ragged(zero_out, r.lens)))

    def tokens(self) -> torch.Tensor:
        return self.codes.lens

    @property
    def code_bits(self) -> torch.Tensor:
        return self.tokens().to(torch.float64) * self.h * self.d * self.row_bits

    @property
    def live_bytes(self) -> torch.Tensor:
        words = torch.tensor([words_for(self.d, int(b)) for b in self.row_bits], dtype=torch.int64)
        meta = 2 * (self.d // self.g) * self.spec.meta_dtype.itemsize
        return self.tokens() * self.h * (words * 4 + meta)

    def shrink(self, rows: torch.Tensor, rule: str) -> None:
        """Halve the width of these rows' whole stored history (β -> β/2) without dequantizing (packed)."""
        rows = rows.to("cpu")
        for bits in self.row_bits[rows].unique().tolist():
            sel = rows[self.row_bits[rows] == bits]
            new = bits // 2
            dev_rows = sel.to(self.codes.data.device)
            t = int(self.codes.lens[sel].max())
            if t:
                stored = self.codes.data[dev_rows, :, :t]
                if self.packed:  # integer shift on the unpacked fields of each word, then repack
                    codes = unpack(stored[..., : words_for(self.d, bits)], bits, self.d)
                    words = pack(shrink_codes(codes, new, rule), new)
                    out = torch.zeros_like(stored)
                    out[..., : words.shape[-1]] = words
                elif rule == "equivalent":  # dequantize, requantize with Z kept and S·(2^b + 1), in float64
                    scale = self.scale.data[dev_rows, :, :t].double().repeat_interleave(self.g, dim=-1)
                    x = stored.double() * scale  # x̂ - Z: exact for codes up to 16 bits
                    out = torch.round(x / (scale * shrink_scale_factor(new, rule)))
                    out = out.clamp_(0, (1 << new) - 1).to(torch.int32)
                else:
                    out = shrink_codes(stored, new, rule)
                self.codes.data[dev_rows, :, :t] = out
                s = self.scale.data[dev_rows, :, :t]
                self.scale.data[dev_rows, :, :t] = (s.float() * shrink_scale_factor(new, rule)).to(s.dtype)
                if not self.packed:
                    lens = self.codes.lens[sel]
                    self.values.data[dev_rows, :, :t] = self._dequantized(
                        Ragged(out, lens), Ragged(self.scale.data[dev_rows, :, :t], lens),
                        Ragged(self.zero.data[dev_rows, :, :t], lens)).data
            self.row_bits[sel] = new
        if self.packed:  # narrow the container to the widest row's words: the memory is given back
            width = words_for(self.d, self.container_bits)
            if width < self.codes.data.shape[-1]:
                self.codes.data = self.codes.data[..., :width].clone()
        self.version += 1

    def _dequantized(self, codes: Ragged, scale: Ragged, zero: Ragged, row_bits: torch.Tensor | None = None) -> Ragged:
        """Tokens from codes at each row's width (`codes` rows are all of the store's rows, or rows of `row_bits`)."""
        row_bits = self.row_bits if row_bits is None else row_bits
        lead = codes.data.shape[:3]
        q = torch.zeros(*lead, self.d, dtype=torch.int32, device=codes.data.device)
        if self.packed:
            for bits in row_bits.unique().tolist():
                rows = to_device((row_bits == bits).nonzero(as_tuple=True)[0], q.device)
                q[rows] = unpack(codes.data[rows][..., : words_for(self.d, bits)], bits, self.d).to(torch.int32)
        else:
            q = codes.data.to(torch.int32)
        q = q.reshape(*lead, self.d // self.g, self.g)
        return Ragged(dequantize(q, scale.data, zero.data, self.dtype).reshape(*lead, self.d), codes.lens)

    def ragged(self, start: int = 0) -> Ragged:
        if not self.packed:
            return from_token(self.values.view(), start)
        codes, scale, zero = (from_token(buf.view(), start) for buf in (self.codes, self.scale, self.zero))
        return self._dequantized(codes, scale, zero)

    def allocated_bytes(self) -> int:
        bufs = [self.codes, self.scale, self.zero] + ([] if self.packed else [self.values])
        return sum(b.allocated_bytes() for b in bufs)
