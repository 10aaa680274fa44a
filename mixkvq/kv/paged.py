"""Fragment pages: a layer's uniform-width key and value stores in the layout of the CUDA decode kernel.

`FragmentPages` is one [B, H, pages, page_words] int32 buffer (mixkvq/kv/layout.py `FragmentPageLayout`); a layer's
key stream and value stream each write their half of every page through a store of their own, so the window rules,
flush timing and byte accounting of the method are unchanged:

- `PagedKeyStore` stands in for a uniform `ChannelGroupStore` (per-channel groups of 32 tokens, blocks of P tokens):
  each released block fills P / 32 pages' key sections at once.
- `PagedValueStore` stands in for a `TokenGroupStore` (per-token groups): tokens fill a page's value section
  one by one (KIVI's sliding window releases one per step), each code added into its slot of its tile's words.

Both quantize with the same `quantize` call as the stores they replace, so codes, scales and zeros are bit for bit
the same, and `ragged()` dequantizes with the same `dequantize`: the reference decoder and fake storage see the
same tokens. `to_pages(layer)` swaps a fresh layer's stores when `page_problems(layer)` finds none.
"""

from __future__ import annotations

from functools import cached_property

import torch

from mixkvq.kv.layout import (PAGE_TOKENS, TILE_TOKENS, FragmentPageLayout, Layout, PackingFormat, channel_meta_order,
                              page_container,
                           check_page_layout, code_order, pack_tile, token_meta_order, token_slots, unpack_tile)
from mixkvq.kv.quantizer import QuantSpec, dequantize, quantize
from mixkvq.kv.ragged import Ragged, grow, reserve, to_device, whole_blocks
from mixkvq.kv.storage import ChannelGroupStore, CountedOnDevice, TokenGroupStore, check_pack_kernel, uses_pack_kernels


class FragmentPages:
    """The page buffer of one layer, shared by its key and value stores."""

    def __init__(self, batch: int, heads: int, layout: FragmentPageLayout, device):
        self.layout = layout
        self.data = torch.zeros(batch, heads, 0, layout.page_words, dtype=torch.int32, device=device)
        sec = layout.sections()
        self.words = {name: (off // 4, n // 4) for name, (off, n) in sec.items()}  # int32 offsets and sizes

    def reserve(self, pages: int, exact: bool = False) -> None:
        """Room for `pages` pages per (row, head): exactly (a known final size), or by amortised doubling."""
        self.data = (reserve if exact else grow)(self.data, 2, pages)

    def section(self, name: str) -> torch.Tensor:
        """[B, H, pages, words] view of one section of every page."""
        off, n = self.words[name]
        return self.data[..., off:off + n]

    def meta(self, name: str) -> torch.Tensor:
        """[B, H, pages, values] 16-bit view of a scale or zero section (int16 bits)."""
        return self.section(name).contiguous().view(torch.int16)


def _to_bits16(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.int16)


class _OnPages(CountedOnDevice):
    """What a store on fragment pages answers alike: its tokens per row (`count` on the host, `device_count` on the
    pages' device), room reserved as whole pages, and the paper's code bits (one width per store)."""

    def _init_counts(self, batch: int) -> None:
        self.count = torch.zeros(batch, dtype=torch.int64)
        self._init_device_count(batch, self.pages.data.device)

    def tokens(self) -> torch.Tensor:
        return self.count

    def has_room(self, k: int) -> bool:
        """Whether every row can take k more tokens without the pages growing."""
        return int(self.count.max()) + k <= self.pages.data.shape[2] * PAGE_TOKENS

    def reserve(self, tokens: int) -> None:
        self.pages.reserve(-(-tokens // PAGE_TOKENS), exact=True)

    @property
    def code_bits(self) -> torch.Tensor:
        return self.count.to(torch.float64) * self.h * self.d * self.bits


class PagedKeyStore(_OnPages):
    """Per-channel key groups of 32 tokens, in blocks of `block` tokens, written into fragment pages. Codes of
    `bits` bits; a width the page format does not pack (3) sits in the slots of a wider one (`page_container`)."""

    def __init__(self, pages: FragmentPages, batch: int, heads: int, block: int, bits: int, dtype: torch.dtype,
                 spec: QuantSpec, pack_kernel: str = "auto"):
        self.pages, self.b, self.h, self.d = pages, batch, heads, pages.layout.head_dim
        self.block, self.bits, self.dtype, self.spec = block, bits, dtype, spec
        self.slot_bits = pages.layout.key_bits  # the page format's code slots (bits, or its container)
        assert self.slot_bits == page_container(bits)
        self.pack_kernel = check_pack_kernel(pack_kernel, "pack_kernel")
        self._tables = None  # the pack kernel's tables, made at its first write
        self.p = PAGE_TOKENS  # the unit `ragged(start)` accepts (the reference decoder reads from page starts)
        self.g = PAGE_TOKENS
        self.packed = True
        self.nblocks = torch.zeros(batch, dtype=torch.int64)
        self._init_counts(batch)  # tokens per row (the kernel reads them every step)
        self.tier_counts: dict[int, int] = {}
        self.version = 0
        dev = pages.data.device
        code_order(self.d, self.slot_bits, "key")  # pack_tile's table, built once (a Python loop), not at a flush
        self._order = to_device(channel_meta_order(self.d), dev)
        self._inverse = to_device(torch.argsort(channel_meta_order(self.d)), dev)
        self._heads = torch.arange(heads, device=dev)

    def layout(self) -> Layout:
        return self._layout

    @cached_property
    def _layout(self) -> Layout:  # fixed for the store's life, read at every decode step: made once
        return Layout(PackingFormat.FRAGMENT_PAGES, bits=self.bits, group=PAGE_TOKENS, block=self.block,
                      page=self.pages.layout, read_unit=PAGE_TOKENS)

    def buffers(self) -> dict[str, torch.Tensor]:
        return {"pages": self.pages.data, "lens": self.count}

    # Rows in lockstep (every row holds as many blocks as the others and releases the same whole blocks: the
    # samples of one prompt) write one range of pages by slices, without the general path's per-block index
    # tensors and host copies; the same words (tests/test_fragment_pages.py).
    _lockstep = True

    def _lockstep_blocks(self, r: Ragged) -> int | None:
        """Blocks every row releases, when the rows are in lockstep and release the same whole blocks."""
        if self._lockstep and r.common is not None and r.common > 0 and r.common % self.block == 0:
            return r.common // self.block
        return None

    def append(self, r: Ragged, widths_fn=None) -> None:
        b, per = self.b, self.block // PAGE_TOKENS
        if uses_pack_kernels(self.pack_kernel, r.data):
            return self._append_by_kernel(r)
        nb = self._lockstep_blocks(r)
        if nb is not None:
            blocks = r.data[:, :, :nb * self.block].reshape(b, self.h, nb, self.block, self.d).transpose(1, 2)
            words, scale, zero = self._encode(blocks.reshape(b * nb, self.h, self.block, self.d))
            p0 = int(self.nblocks[0]) * per
            self.pages.reserve(p0 + nb * per)

            def write(dst, src):  # [B nb, H, per, w] in (row, block) order -> the rows' pages p0 .. p0 + nb per
                dst[:, :, p0:p0 + nb * per] = src.view(b, nb, self.h, per, -1).transpose(1, 2).reshape(
                    b, self.h, nb * per, -1)
        else:
            split = whole_blocks(r, self.block)
            if split is None:
                return
            nb, rows, local, blocks = split  # blocks [N, H, P, D]
            words, scale, zero = self._encode(blocks)
            page = (self.nblocks[rows] + local)[:, None] * per + torch.arange(per)[None, :]  # [N, per]
            self.pages.reserve(int(page.max()) + 1)
            rows_pages = to_device(torch.cat((rows[:, None], page), dim=1), r.data.device)
            row_d, page_d, head = rows_pages[:, 0, None, None], rows_pages[:, None, 1:], self._heads[None, :, None]

            def write(dst, src):
                dst[row_d, head, page_d] = src
        pg = self.pages
        for name, src in (("key_codes", words), ("key_scale", scale), ("key_zero", zero)):
            off, nw = pg.words[name]
            write(pg.data[..., off:off + nw], src)
        self._advance(nb)

    def _advance(self, nb) -> None:
        self.nblocks += nb
        self._lockstep = len(set(self.nblocks.tolist())) == 1  # (host values, no tensor op)
        self.count += nb * self.block
        self._counted()

    def _append_by_kernel(self, r: Ragged) -> None:
        """The same pages in one launch (kernels/pack.py `write_page_keys`): in lockstep from the rows' first free
        page, else by a table of (row, token, page) per page, one host-to-device copy."""
        from kernels.pack import page_key_tables, write_page_keys

        per = self.block // PAGE_TOKENS
        if self._tables is None:
            self._tables = page_key_tables(self.d, self.slot_bits, self.pages.data.device)
        pg = self.pages
        nb = self._lockstep_blocks(r)
        if nb is not None:
            p0 = int(self.nblocks[0]) * per
            pg.reserve(p0 + nb * per)
            write_page_keys(r.data, self.bits, self.spec, pg.data, pg.words, self._tables, p0=p0,
                            pages_per_row=nb * per, slot_bits=self.slot_bits)
            return self._advance(nb)
        nb = r.lens // self.block
        assert bool((nb * self.block == r.lens).all()), "key page stores take whole blocks"
        if int(nb.sum()) == 0:
            return
        rows = torch.repeat_interleave(torch.arange(self.b), nb * per)  # per page: its row, token and page
        first = torch.repeat_interleave(torch.cumsum(nb * per, 0) - nb * per, nb * per)
        j = torch.arange(len(rows)) - first  # the page's index among its row's new pages
        page = self.nblocks[rows] * per + j
        pg.reserve(int(page.max()) + 1)
        table = to_device(torch.stack((rows, j * PAGE_TOKENS, page), dim=1), r.data.device)
        write_page_keys(r.data, self.bits, self.spec, pg.data, pg.words, self._tables, table=table,
                        slot_bits=self.slot_bits)
        self._advance(nb)

    def _encode(self, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Blocks [N, H, P, D] -> per page (code words, scale bits, zero bits) as int32 [N, H, pages, words]."""
        n, per = len(blocks), self.block // PAGE_TOKENS
        chans = blocks.transpose(2, 3).reshape(n, self.h, self.d, per, PAGE_TOKENS)
        codes, scale, zero = quantize(chans, self.bits, self.spec)  # [N, H, D, per, 32], [N, H, D, per]
        # -> per page: [N, H, per, 2 tiles, 16 tokens, D]
        tiles = codes.permute(0, 1, 3, 4, 2).reshape(n, self.h, per, 2, TILE_TOKENS, self.d)
        words = pack_tile(tiles, self.slot_bits, "key").reshape(n, self.h, per, -1)
        meta = (_to_bits16(m.permute(0, 1, 3, 2)[..., self._order]).view(torch.int32)  # in channel_meta_order
                for m in (scale, zero))
        return (words, *meta)

    @property
    def live_bytes(self) -> torch.Tensor:
        return self.tokens() // PAGE_TOKENS * self.h * self.pages.layout.key_bytes()

    def ragged(self, start: int = 0) -> Ragged:
        """Dequantized tokens start.. of every row (start a multiple of 32)."""
        first = start // PAGE_TOKENS
        lens = (self.tokens() - start).clamp_min(0)
        n = int(self.tokens().max()) // PAGE_TOKENS - first
        dev = self.pages.data.device
        if n <= 0:
            return Ragged(torch.zeros(self.b, self.h, 0, self.d, dtype=self.dtype, device=dev), lens)
        pg = self.pages
        words = pg.section("key_codes")[:, :, first:first + n].reshape(self.b, self.h, n, 2, -1)
        codes = unpack_tile(words, self.d, self.slot_bits, "key").reshape(self.b, self.h, n, PAGE_TOKENS, self.d)
        inv = self._inverse
        scale, zero = (pg.meta(name)[:, :, first:first + n][..., inv].view(self.spec.meta_dtype)
                       for name in ("key_scale", "key_zero"))  # [B, H, n, D]
        vals = dequantize(codes.transpose(3, 4), scale, zero, self.dtype)  # groups along the page's tokens
        return Ragged(vals.transpose(3, 4).reshape(self.b, self.h, n * PAGE_TOKENS, self.d), lens)

    def allocated_bytes(self) -> int:
        return self.pages.data.numel() * 4  # the whole page buffer; the value store counts none of it


class PagedValueStore(_OnPages):
    """Per-token value groups written token by token into fragment pages."""

    def __init__(self, pages: FragmentPages, batch: int, heads: int, group: int, bits: int, dtype: torch.dtype,
                 spec: QuantSpec, pack_kernel: str = "auto"):
        self.pages, self.b, self.h, self.d = pages, batch, heads, pages.layout.head_dim
        self.g, self.bits, self.dtype, self.spec = group, bits, dtype, spec
        self.pack_kernel = check_pack_kernel(pack_kernel, "pack_kernel")
        self.packed = True
        self._init_counts(batch)
        self.version = 0
        self.groups = self.d // group
        dev = pages.data.device
        # Index tables on the pages' device, made once: the decode step only gathers from them.
        self._inverse = to_device(torch.argsort(token_meta_order(self.groups)), dev)  # (token*groups+group) -> slot
        self._word, self._shift = (to_device(x, dev) for x in token_slots(self.d, bits))
        self._heads = torch.arange(heads, device=dev)[None, :, None]
        self._group_ids = torch.arange(self.groups, device=dev)[None, :]
        self.bytes_per_token = heads * pages.layout.value_bytes_per_token()
        # For a decode step's one token per row (`_append_one`), per token of a page: the int32 word within the page
        # of each code, its int32 shift (a code shifted into bit 31 wraps to the word's two's-complement value, as
        # the int64 path computes it), and the 16-bit slots of the token's scales then zeros within the page.
        off, nw = pages.words["value_codes"]
        in_page = torch.arange(PAGE_TOKENS, device=dev)
        self._word_at = off + in_page[:, None] // TILE_TOKENS * (nw // 2) + self._word[in_page % TILE_TOKENS]
        self._shift_at = self._shift[in_page % TILE_TOKENS].to(torch.int32)  # [32, D]
        slots = self._inverse.view(PAGE_TOKENS, self.groups)
        off_s, off_z = 2 * pages.words["value_scale"][0], 2 * pages.words["value_zero"][0]
        self._meta_slots = torch.cat((slots + off_s, slots + off_z), dim=1)  # [32, 2 * groups]
        self._top = 0  # the longest row's count (a Python int: the one-token path reserves without an op)

    appends_one_by_device = True  # a decode step's token goes in at `device_count`: a CUDA graph can replay it

    def layout(self) -> Layout:
        return self._layout

    @cached_property
    def _layout(self) -> Layout:  # fixed for the store's life, read at every decode step: made once
        return Layout(PackingFormat.FRAGMENT_PAGES, bits=self.bits, group=self.g, page=self.pages.layout)

    def buffers(self) -> dict[str, torch.Tensor]:
        return {"pages": self.pages.data, "lens": self.count}

    def append(self, r: Ragged, widths_fn=None) -> None:
        if r.common == 1:
            return self._append_one(r)
        if int(r.lens.max()) == 0:
            return
        if uses_pack_kernels(self.pack_kernel, r.data):  # one launch from the device counts, the same bits
            return self._append_by_kernel(r)
        dev = r.data.device
        lead = r.data.shape[:3]
        codes, scale, zero = quantize(r.data.reshape(*lead, self.groups, self.g), self.bits, self.spec)
        codes = codes.reshape(*lead, self.d)
        valid = torch.arange(lead[2])[None, :] < r.lens[:, None]
        b, j = valid.nonzero(as_tuple=True)
        pos = self.count[b] + j  # position of each new token in its row's value store
        self.pages.reserve(int(pos.max()) // PAGE_TOKENS + 1)
        pg = self.pages
        bd, jd, pos = to_device(torch.stack((b, j, pos)), dev)  # one copy; the index arithmetic runs there
        # Codes: add each new code, shifted into its slot, to its word (slots are disjoint and start at zero, so
        # the sum is the bitwise OR with the codes stored before); a decode step writes B x H x D slots this way.
        col = pos % TILE_TOKENS  # the token's column in its tile
        page, in_page = pos // PAGE_TOKENS, pos % PAGE_TOKENS
        tile_base = (page * pg.layout.page_words + pg.words["value_codes"][0]
                     + in_page // TILE_TOKENS * pg.words["value_codes"][1] // 2)
        idx = tile_base[:, None] + self._word[col]  # [Nt, D] int32 word of each code in the row's flat pages
        add = codes[bd, :, jd].to(torch.int64) << self._shift[col][:, None, :]  # [Nt, H, D]
        add = torch.where(add >= 1 << 31, add - (1 << 32), add).to(torch.int32)
        flat = pg.data.view(self.b, self.h, -1)
        flat.index_put_((bd[:, None, None], self._heads, idx[:, None, :]), add, accumulate=True)
        # Scales and zeros: one 16-bit value per (token, group), at the token's slot of token_meta_order.
        flat16 = pg.data.view(self.b, self.h, -1).view(torch.int16)
        at = self._inverse[in_page[:, None] * self.groups + self._group_ids]  # [Nt, groups]
        for name, meta in (("value_scale", scale), ("value_zero", zero)):
            off, _ = pg.words[name]
            col16 = page[:, None] * (2 * pg.layout.page_words) + 2 * off + at
            flat16[bd[:, None, None], self._heads, col16[:, None, :]] = _to_bits16(meta[bd, :, jd])
        self.count += r.lens
        self._top = int(self.count.max())
        self._counted()

    def _append_one(self, r: Ragged) -> None:
        """One token per row (a sliding window's decode step): the same codes, scales and zeros as `append` writes,
        placed at each row's `device_count` by device arithmetic (no host value reaches the device, so a CUDA graph
        can replay it) and two scatters."""
        b, h = r.data.shape[:2]
        self.pages.reserve(self._top // PAGE_TOKENS + 1)  # no op when reserved
        pg = self.pages
        if uses_pack_kernels(self.pack_kernel, r.data):  # one launch (kernels/pack.py), the same bits
            from kernels.pack import append_page_tokens

            append_page_tokens(r.data[:, :, :1], self.bits, self.g, self.spec, pg.data, self.device_count,
                               self._word_at, self._shift_at, self._meta_slots, pg.layout.page_words)
            self.device_count += 1
            self.advance_host(1)
            return
        codes, scale, zero = quantize(r.data[:, :, :1].reshape(b, h, self.groups, self.g), self.bits, self.spec)
        pos = self.device_count
        in_page = pos % PAGE_TOKENS
        base = pos // PAGE_TOKENS * pg.layout.page_words  # [B]: the first word of each row's page
        # Slots are disjoint and start at zero: adding a code into its word is or-ing it in (see `append`).
        add = codes.reshape(b, h, self.d).to(torch.int32) << self._shift_at[in_page][:, None, :]
        flat = pg.data.view(b, h, -1)
        flat.scatter_add_(2, (self._word_at[in_page] + base[:, None])[:, None, :].expand(b, h, self.d), add)
        meta = torch.cat((_to_bits16(scale), _to_bits16(zero)), dim=2)  # [B, H, 2 * groups]
        slots = self._meta_slots[in_page] + 2 * base[:, None]  # [B, 2 * groups]
        flat.view(torch.int16).scatter_(2, slots[:, None, :].expand(b, h, -1), meta)
        self.device_count += 1
        self.advance_host(1)

    def _append_by_kernel(self, r: Ragged) -> None:
        from kernels.pack import append_page_tokens

        self.pages.reserve(int((self.count + r.lens).max() - 1) // PAGE_TOKENS + 1)
        pg = self.pages
        t = r.data.shape[2]
        full = r.common == t if r.common is not None else bool((r.lens == t).all())  # every row writes all t
        lens = None if full else to_device(r.lens, r.data.device)
        append_page_tokens(r.data, self.bits, self.g, self.spec, pg.data, self.device_count, self._word_at,
                           self._shift_at, self._meta_slots, pg.layout.page_words, lens)
        self.count += r.lens
        self._top = int(self.count.max())
        self._counted()  # the device counts from the host's (the kernel read them before)

    def advance_host(self, k: int) -> None:
        """The host side of k tokens per row appended at the device's counts (here, or by a replayed step)."""
        self.count += k
        self._top += k


    @property
    def live_bytes(self) -> torch.Tensor:
        return self.count * self.bytes_per_token

    def has_room(self, k: int) -> bool:
        return self._top + k <= self.pages.data.shape[2] * PAGE_TOKENS  # the host's longest count: no op

    def token_cost(self) -> tuple[int, int]:
        """(code bits, live bytes) one more token per row adds (`code_bits`, `live_bytes`)."""
        return self.h * self.d * self.bits, self.bytes_per_token

    def ragged(self, start: int = 0) -> Ragged:
        lens = (self.count - start).clamp_min(0)
        top = int(self.count.max())
        dev = self.pages.data.device
        if top <= start:
            return Ragged(torch.zeros(self.b, self.h, 0, self.d, dtype=self.dtype, device=dev), lens)
        first, last = start // PAGE_TOKENS, -(-top // PAGE_TOKENS)
        n = last - first
        pg = self.pages
        words = pg.section("value_codes")[:, :, first:last].reshape(self.b, self.h, n, 2, -1)
        codes = unpack_tile(words, self.d, self.bits, "value").reshape(self.b, self.h, n * PAGE_TOKENS, self.d)
        inv = self._inverse
        scale, zero = (pg.meta(name)[:, :, first:last][..., inv].view(self.spec.meta_dtype)
                       .reshape(self.b, self.h, n * PAGE_TOKENS, self.groups) for name in ("value_scale", "value_zero"))
        codes = codes.reshape(self.b, self.h, n * PAGE_TOKENS, self.groups, self.g)
        vals = dequantize(codes, scale, zero, self.dtype).reshape(self.b, self.h, n * PAGE_TOKENS, self.d)
        cut = start - first * PAGE_TOKENS
        return Ragged(vals[:, :, cut:top - first * PAGE_TOKENS], lens)

    def allocated_bytes(self) -> int:
        if self.pages.layout.key_bits is None:  # pages of values only: this store's alone
            return self.pages.data.numel() * 4
        return 0  # counted by the key store, which reports the whole page buffer


def page_problems(layer) -> list[str]:
    """Why this layer's stores have no fragment page layout (empty when they do)."""
    ks, vs = layer.key_stream.store, layer.value_stream.store
    out = []
    if (type(ks) is not ChannelGroupStore or not ks.packed or ks.uniform_width is None or ks.pack11
            or ks.g != PAGE_TOKENS):
        out.append("keys are not one packed width in per-channel groups of 32 tokens")
    if type(vs) is not TokenGroupStore or not vs.packed:
        out.append("values are not packed per-token groups of one width")
    if out:
        return out
    if ks.p % PAGE_TOKENS:
        out.append(f"key block {ks.p} is not a multiple of {PAGE_TOKENS}")
    if ks.spec.meta_dtype != ks.dtype or ks.dtype not in (torch.bfloat16, torch.float16):
        out.append("scales are not in the model dtype, or the model dtype is not bf16/fp16")
    out += check_page_layout(layer.dim, page_container(ks.uniform_width), vs.bits, vs.g)
    return out


def to_pages(layer) -> None:
    """Replace a fresh layer's key and value stores by fragment-page stores (`page_problems` must be empty)."""
    ks, vs = layer.key_stream.store, layer.value_stream.store
    assert not page_problems(layer) and int(ks.nblocks.max()) == 0 and int(vs.tokens().max()) == 0
    meta_bytes = ks.spec.meta_dtype.itemsize
    pl = FragmentPageLayout(layer.dim, page_container(ks.uniform_width), vs.bits, vs.g, meta_bytes)
    pages = FragmentPages(ks.b, ks.h, pl, ks.device)
    layer.key_stream.store = PagedKeyStore(pages, ks.b, ks.h, ks.p, ks.uniform_width, ks.dtype, ks.spec,
                                           ks.pack_kernel)
    layer.value_stream.store = PagedValueStore(pages, vs.b, vs.h, vs.g, vs.bits, vs.dtype, vs.spec, vs.pack_kernel)
    tokens = layer.key_stream.reserved_tokens
    if tokens is not None:  # the cache was reserved before the kernel was bound: the pages take its place
        pages.reserve(-(-tokens // PAGE_TOKENS), exact=True)
