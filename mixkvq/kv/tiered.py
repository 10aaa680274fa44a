"""Tiered pages: MixKVQ's mixed-width key blocks in the layout of a per-tier fragment kernel (mixkvq/kv/layout.py
`TieredPageLayout`).

`TieredPagedKeyStore` stands in for a mixed-width `ChannelGroupStore` (MixKVQ's keys): each released block, with the
widths MixKVQ picks for it (`widths_fn`, the same call as for the store it replaces), is permuted into its tiers and
written as one block of its (row, head) pool. It quantizes with the same `quantize` call and dequantizes with the
same `dequantize`, so codes, scales, zeros and the tokens of `ragged()` are bit for bit those of the store it
replaces, and so is `code_bits` (the paper's measure); `live_bytes` counts the blocks as stored, padding included.

`to_tiered_pages(layer)` swaps a fresh MixKVQ layer's key store, and its value store for values-only fragment pages
(`PagedValueStore`) when its format fits them. No decode kernel reads tiered pages yet: the reference decoder reads
`ragged()`, and kernels/tiered.py states the kernel's math in PyTorch.
"""

from __future__ import annotations

from functools import cached_property

import torch
import torch.nn.functional as F

from mixkvq.kv.layout import (PAGE_TOKENS, TIER_BITS, TIER_SECTIONS, TIER_STEP, TIER_WIDTHS, TILE_TOKENS,
                              FragmentPageLayout, Layout, PackingFormat, TieredPageLayout, channel_meta_order,
                              check_page_layout, check_tiered_layout, code_order, pack_tile, tier_channels,
                              tile_channels, unpack_tile)
from mixkvq.kv.paged import FragmentPages, PagedValueStore
from mixkvq.kv.quantizer import QuantSpec, dequantize, quantize
from mixkvq.kv.ragged import Ragged, grow, reserve, to_device, whole_blocks
from mixkvq.kv.storage import FULL_PRECISION, ChannelGroupStore, CountedOnDevice, TokenGroupStore, pool_starts

OFFSET_BYTES = 8  # a block's entry in `offsets` (int64)


class TieredPagedKeyStore(CountedOnDevice):
    """Mixed-width per-channel key groups of 32 tokens, in blocks of `layout.block` tokens, as tiered pages."""

    def __init__(self, batch: int, heads: int, layout: TieredPageLayout, dtype: torch.dtype, spec: QuantSpec,
                 device):
        self.tiers = layout
        self.b, self.h, self.d, self.p, self.g = batch, heads, layout.head_dim, layout.block, PAGE_TOKENS
        self.dtype, self.spec, self.device = dtype, spec, device
        self.packed = True
        self.fp_bits = 8 * layout.value_bytes
        self.nblocks = torch.zeros(batch, dtype=torch.int64)
        self.used = torch.zeros(batch, heads, dtype=torch.int64)  # words of each pool in use
        self.pool = torch.zeros(batch, heads, 0, dtype=torch.int32, device=device)
        self.offsets = torch.zeros(batch, heads, 0, dtype=torch.int64, device=device)
        self.code_bits = torch.zeros(batch, dtype=torch.float64)  # per row, summed over heads
        self.live_bytes = torch.zeros(batch, dtype=torch.int64)
        self.tier_counts: dict[int, int] = {}
        self.version = 0
        self._init_device_count(batch, device)
        tier_of = torch.full((256,), -1, dtype=torch.int64)
        tier_of[list(TIER_WIDTHS)] = torch.arange(len(TIER_WIDTHS))
        self._tier_of = to_device(tier_of, device)  # width code -> tier (-1: none)
        for c in range(TIER_STEP, self.d + 1, TIER_STEP):  # the order tables (Python loops), built here, not at a flush
            channel_meta_order(c)
            for bits in TIER_BITS:
                code_order(tile_channels(c, bits), bits, "key")

    def layout(self) -> Layout:
        return self._layout

    @cached_property
    def _layout(self) -> Layout:  # fixed for the store's life: made once
        return Layout(PackingFormat.TIERED_FRAGMENT_PAGES, group=PAGE_TOKENS, block=self.p, tiers=self.tiers,
                      read_unit=self.p)

    def buffers(self) -> dict[str, torch.Tensor]:
        return {"pool": self.pool, "offsets": self.offsets, "lens": self.tokens()}

    # -- writes --------------------------------------------------------------------------------------------

    def append(self, r: Ragged, widths_fn) -> None:
        """Store the released tokens of each row (a multiple of `block` per row) as whole tiered blocks."""
        split = whole_blocks(r, self.p)
        if split is None:
            return
        nb, rows, local, blocks = split  # blocks [N, H, P, D]
        dev = blocks.device
        widths = widths_fn(blocks, rows).to(torch.uint8)  # [N, H, D]
        tier = self._tier_of[widths.long()]
        if bool((tier < 0).any()):
            bad = sorted(set(widths.unique().tolist()) - set(TIER_WIDTHS))
            raise ValueError(f"widths {bad} have no tier: tiered blocks hold widths {list(TIER_WIDTHS)}")
        n, d = len(rows), self.d
        perm = torch.argsort(tier * d + torch.arange(d, device=dev), dim=-1)  # by tier, ascending within one
        counts = F.one_hot(tier, len(TIER_WIDTHS)).sum(dim=2)  # [N, H, 3]
        self._count(widths, counts, rows)
        lay = self.tiers
        per_tier = tuple(counts.unbind(-1))
        total = (lay.block_bytes(per_tier) // 4).cpu()  # [N, H] words
        start, added, per_row = pool_starts(self.used, rows, total)
        need = int((self.used + added).max())
        if need > self.pool.shape[2]:
            self.pool = reserve(self.pool, 2, self._pool_need(need, int((self.nblocks + per_row).max())))
        slot = self.nblocks[rows] + local
        self.offsets = grow(self.offsets, 2, int((slot + 1).max()))
        rows_d, slot_d = to_device(torch.stack((rows, slot)), dev)
        start_d = to_device(start, dev)
        self.offsets[rows_d, :, slot_d] = start_d
        flat = self.pool.view(self.b * self.h, -1)
        row_head = rows_d[:, None] * self.h + torch.arange(self.h, device=dev)  # [N, H]
        header = torch.zeros(n, self.h, lay.header_bytes, dtype=torch.uint8, device=dev)
        header[..., :d] = perm.to(torch.uint8)
        header[..., d:d + len(TIER_WIDTHS)] = counts.to(torch.uint8)
        hw = lay.header_bytes // 4
        flat[row_head[..., None], start_d[..., None] + torch.arange(hw, device=dev)] = header.view(torch.int32)
        # Each tier of every block, one pass per padded channel count (at most head_dim / 16 per tier).
        sec = _section_words(lay, per_tier)
        page_words = lay.page_bytes(per_tier) // 4
        pages = torch.arange(lay.pages, device=dev)
        tier_start = torch.cumsum(counts, -1) - counts
        for t, name in enumerate(TIER_SECTIONS):
            padded = tier_channels(counts[..., t])
            for c in padded.unique().tolist():
                if c == 0:
                    continue
                ni, hi = (padded == c).nonzero(as_tuple=True)
                ch, valid = self._tier_channels(perm[ni, hi], tier_start[ni, hi, t], counts[ni, hi, t], c)
                x = blocks[ni, hi].gather(2, ch[:, None, :].expand(-1, self.p, -1))  # [M, P, c]
                x = torch.where(valid[:, None, :], x, torch.zeros((), dtype=x.dtype, device=dev))
                words = self._encode(x, valid, t, c)  # [M, pages, words]
                at = start_d[ni, hi] + hw + sec[name][ni, hi]
                at = at[:, None] + pages * page_words[ni, hi][:, None]  # [M, pages]
                dst = at[..., None] + torch.arange(words.shape[-1], device=dev)
                flat[row_head[ni, hi][:, None, None], dst] = words
        self.used += added
        self.nblocks += nb
        self._counted()

    @staticmethod
    def _tier_channels(perm, start, count, c):
        """Channels of a tier's c slots [M, c] (padding slots: any channel, masked) and which slots hold one."""
        slots = torch.arange(c, device=perm.device)
        valid = slots < count[:, None]
        return perm.gather(1, (start[:, None] + slots).clamp_max(perm.shape[1] - 1)), valid

    def _encode(self, x: torch.Tensor, valid: torch.Tensor, t: int, c: int) -> torch.Tensor:
        """A tier's keys x [M, P, c] (padding channels zero) -> its sections' words of each page [M, pages, words]."""
        m, pages = len(x), self.tiers.pages
        if TIER_WIDTHS[t] == FULL_PRECISION:
            raw = x.contiguous().view(torch.int16).to(torch.int64) & 0xFFFF
            return pack_tile(raw.reshape(m, self.p // TILE_TOKENS, TILE_TOKENS, c), 16, "key").reshape(m, pages, -1)
        bits = TIER_BITS[t]
        codes, scale, zero = quantize(x.transpose(1, 2).reshape(m, c, pages, PAGE_TOKENS), bits, self.spec)
        keep = valid[:, :, None]  # padding channels: zero codes, scales and zeros
        codes = codes.to(torch.int64) * keep[..., None]
        scale, zero = (torch.where(keep, v, torch.zeros((), dtype=v.dtype, device=v.device)) for v in (scale, zero))
        cw = tile_channels(c, bits)
        tiles = F.pad(codes.permute(0, 2, 3, 1), (0, cw - c)).reshape(m, pages, 2, TILE_TOKENS, cw)
        code_words = pack_tile(tiles, bits, "key").reshape(m, pages, -1)
        order = channel_meta_order(c).to(x.device)
        meta = [v.transpose(1, 2)[..., order].contiguous().view(torch.int16).view(torch.int32) for v in (scale, zero)]
        return torch.cat([code_words, *meta], dim=-1)

    def _count(self, widths: torch.Tensor, counts: torch.Tensor, rows: torch.Tensor) -> None:
        bits = torch.where(widths == FULL_PRECISION, self.fp_bits, widths.to(torch.int64)).to(torch.float64)
        self.code_bits.index_add_(0, rows, (bits * self.p).sum(dim=(1, 2)).cpu())
        stored = self.tiers.block_bytes(tuple(counts.unbind(-1))) + OFFSET_BYTES  # [N, H]
        self.live_bytes.index_add_(0, rows, stored.sum(1).cpu())
        for w, k in zip(*widths.unique(return_counts=True)):
            self.tier_counts[int(w)] = self.tier_counts.get(int(w), 0) + int(k)

    # -- reads ---------------------------------------------------------------------------------------------

    def ragged(self, start: int = 0) -> Ragged:
        """Dequantized tokens of blocks start.. of every row (start counts tokens, a multiple of `block`)."""
        first = start // self.p
        nb = int(self.nblocks.max()) - first
        lens = ((self.nblocks - first) * self.p).clamp_min(0)
        dev, d, lay = self.device, self.d, self.tiers
        if nb <= 0:
            return Ragged(torch.zeros(self.b, self.h, 0, d, dtype=self.dtype, device=dev), lens)
        out = torch.zeros(self.b * self.h * nb, d, self.p, dtype=self.dtype, device=dev)  # channels, then tokens
        bi, ki = (torch.arange(nb)[None, :] < (self.nblocks - first)[:, None]).nonzero(as_tuple=True)
        bi, ki = bi.repeat_interleave(self.h), ki.repeat_interleave(self.h)
        hi = torch.arange(self.h).repeat(len(bi) // self.h)
        bi, hi, ki = to_device(torch.stack((bi, hi, ki)), dev)
        row_head = bi * self.h + hi
        base = self.offsets[bi, hi, first + ki]  # [M] each stored block's first word
        flat = self.pool.view(self.b * self.h, -1)
        hw = lay.header_bytes // 4
        header = flat[row_head[:, None], base[:, None] + torch.arange(hw, device=dev)].contiguous().view(torch.uint8)
        perm, counts = header[:, :d].long(), header[:, d:d + len(TIER_WIDTHS)].long()
        per_tier = tuple(counts.unbind(-1))
        sec = _section_words(lay, per_tier)
        page_words = lay.page_bytes(per_tier) // 4
        pages = torch.arange(lay.pages, device=dev)
        tier_start = torch.cumsum(counts, -1) - counts
        dst = row_head * nb + ki
        for t, name in enumerate(TIER_SECTIONS):
            padded = tier_channels(counts[:, t])
            for c in padded.unique().tolist():
                if c == 0:
                    continue
                sel = (padded == c).nonzero(as_tuple=True)[0]
                n_words = self._tier_words(t, c)
                at = (base[sel] + hw + sec[name][sel])[:, None] + pages * page_words[sel][:, None]
                words = flat[row_head[sel][:, None, None], at[..., None] + torch.arange(n_words, device=dev)]
                vals = self._decode(words, t, c)  # [M, c, P]
                ch, valid = self._tier_channels(perm[sel], tier_start[sel, t], counts[sel, t], c)
                mi, si = valid.nonzero(as_tuple=True)
                out[dst[sel][mi], ch[mi, si]] = vals[mi, si]
        vals = out.view(self.b, self.h, nb, d, self.p).transpose(3, 4).reshape(self.b, self.h, nb * self.p, d)
        return Ragged(vals, lens)

    def _tier_words(self, t: int, c: int) -> int:
        """int32 words of a tier's sections in one page, for a tier of c (padded) channels."""
        return self.tiers.page_bytes(tuple(c if i == t else 0 for i in range(len(TIER_WIDTHS)))) // 4

    def _decode(self, words: torch.Tensor, t: int, c: int) -> torch.Tensor:
        """A tier's sections of each page [M, pages, words] -> its keys [M, c, P] (padding channels included)."""
        m, pages = words.shape[:2]
        if TIER_WIDTHS[t] == FULL_PRECISION:
            raw = unpack_tile(words.reshape(m, 2 * pages, -1), c, 16, "key")  # [M, P / 16, 16, c]
            raw = torch.where(raw >= 1 << 15, raw - (1 << 16), raw).to(torch.int16).view(self.dtype)
            return raw.reshape(m, self.p, c).transpose(1, 2)
        bits = TIER_BITS[t]
        cw = tile_channels(c, bits)
        nw = 2 * 32 * cw * bits // 64  # code words of a page: two tiles, 32 lanes
        codes = unpack_tile(words[..., :nw].reshape(m, pages, 2, -1), cw, bits, "key")[..., :c]
        codes = codes.reshape(m, pages, PAGE_TOKENS, c).permute(0, 3, 1, 2)  # [M, c, pages, 32]
        inv = torch.argsort(channel_meta_order(c)).to(words.device)
        scale, zero = (words[..., nw + i * c // 2:nw + (i + 1) * c // 2].contiguous().view(torch.int16)[..., inv]
                       .view(self.spec.meta_dtype).transpose(1, 2) for i in (0, 1))  # [M, c, pages]
        return dequantize(codes, scale, zero, self.dtype).reshape(m, c, self.p)

    def tokens(self) -> torch.Tensor:
        return self.nblocks * self.p

    def block_tier_counts(self) -> torch.Tensor:
        """Channels per tier (full precision, 4-bit, 2-bit) of every stored block, from its header: int64 [B, H,
        blocks, 3] on the host, zeros past a row's blocks."""
        nb = int(self.nblocks.max())
        words = torch.gather(self.pool, 2, self.offsets[:, :, :nb] + self.d // 4).cpu().long()  # the counts word
        counts = (words[..., None] >> (8 * torch.arange(len(TIER_WIDTHS)))) & 0xFF
        stored = torch.arange(nb)[None, :] < self.nblocks[:, None]  # [B, blocks]
        return counts * stored[:, None, :, None]

    def reserve(self, tokens: int) -> None:
        """Room for `tokens` tokens per row: the offsets exactly; the pool, whose final size the widths decide,
        grows by extrapolating its words per block so far to the reserved blocks (as ChannelGroupStore's)."""
        blocks = -(-tokens // self.p)
        self.reserved_blocks = blocks
        self.offsets = reserve(self.offsets, 2, blocks)

    def _pool_need(self, need: int, blocks: int) -> int:
        """Words per pool: whole 16-byte units, so that every (row, head) pool, and so every block, starts 16-byte
        aligned (the CUDA kernel reads blocks with vector loads)."""
        reserved = getattr(self, "reserved_blocks", 0)
        words = max(need, 2 * self.pool.shape[2], 16) if reserved <= blocks else -(-need * reserved // blocks)
        return -(-words // 4) * 4

    def allocated_bytes(self) -> int:
        return self.pool.numel() * 4 + self.offsets.numel() * OFFSET_BYTES


def _section_words(lay: TieredPageLayout, per_tier: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
    """Word offset within a page of each section, per block (counts per tier: tensors of one shape)."""
    like = per_tier[0]
    return {name: torch.as_tensor(off, device=like.device).expand(like.shape) // 4
            for name, (off, _) in lay.page_sections(per_tier).items()}


def tiered_problems(layer) -> list[str]:
    """Why this layer's key store has no tiered page layout (empty when it has)."""
    ks = layer.key_stream.store
    if type(ks) is not ChannelGroupStore or not ks.packed or ks.uniform_width is not None or ks.pack11:
        return ["keys are not packed mixed-width per-channel groups (MixKVQ)"]
    out = []
    if ks.g != PAGE_TOKENS:
        out.append(f"key group {ks.g} is not {PAGE_TOKENS} tokens")
    if ks.spec.meta_dtype != ks.dtype or ks.dtype not in (torch.bfloat16, torch.float16):
        out.append("scales are not in the model dtype, or the model dtype is not bf16/fp16")
    return out + check_tiered_layout(layer.dim, ks.p)


def value_page_problems(layer) -> list[str]:
    """Why this layer's value store has no values-only fragment page layout (empty when it has)."""
    vs = layer.value_stream.store
    if type(vs) is not TokenGroupStore or not vs.packed:
        return ["values are not packed per-token groups of one width"]
    out = []
    if vs.spec.meta_dtype != vs.dtype or vs.dtype not in (torch.bfloat16, torch.float16):
        out.append("scales are not in the model dtype, or the model dtype is not bf16/fp16")
    return out + check_page_layout(layer.dim, None, vs.bits, vs.g)


def to_tiered_pages(layer) -> None:
    """Replace a fresh MixKVQ layer's key store by tiered pages (`tiered_problems` must be empty), and its value
    store by values-only fragment pages when `value_page_problems` finds none (else the values stay as they are)."""
    ks, vs = layer.key_stream.store, layer.value_stream.store
    assert not tiered_problems(layer) and int(ks.nblocks.max()) == 0 and int(vs.tokens().max()) == 0
    layer.key_stream.store = TieredPagedKeyStore(ks.b, ks.h, TieredPageLayout(layer.dim, ks.p), ks.dtype, ks.spec,
                                                 ks.device)
    if not value_page_problems(layer):
        pl = FragmentPageLayout(layer.dim, None, vs.bits, vs.g, vs.spec.meta_dtype.itemsize)
        layer.value_stream.store = PagedValueStore(FragmentPages(vs.b, vs.h, pl, ks.device), vs.b, vs.h, vs.g,
                                                   vs.bits, vs.dtype, vs.spec, vs.pack_kernel)
    for stream in (layer.key_stream, layer.value_stream):
        if stream.reserved_tokens is not None:  # reserved before the swap: the new stores take its place
            stream.store.reserve(stream.reserved_tokens)
