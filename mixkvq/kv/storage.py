"""KV storage shared by every method: the quantized stores over the ragged buffers of `mixkvq.kv.ragged`.

Two quantized layouts cover the four methods (METHODS.md §1):
- ChannelGroupStore: tokens arrive in blocks of P tokens; each channel of each block of each head has its
  own width (2/3/4/8-bit codes in groups of G tokens, or full precision). KIVI keys are the uniform case,
  MixKVQ keys the mixed case. Codes live in one int32 word pool per (row, head).
- TokenGroupStore: per-token groups of G channels at one width per store (values; PM-KVQ keys).
A store only one method uses lives beside that method (PM-KVQ's progressive store: `baselines/pmkvq_store.py`).

`packed=True` keeps real codes and metadata (the only source of memory figures); `packed=False` ("fake")
keeps the dequantized tensor, computed by the same `dequantize`, so both give identical attention inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from mixkvq.errors import ConfigError
from mixkvq.kv.layout import Layout, PackingFormat
from mixkvq.kv.quantizer import PACK11, QuantSpec, clamp_slot11, dequantize, pack, pack11, pack_float, quantize, unpack, words_for
from mixkvq.kv.ragged import Ragged, RaggedBuffer, from_token, grow, reserve, to_device, whole_blocks

FULL_PRECISION = 0  # width code of a channel kept in the model dtype
# Who quantizes and packs a packed store's writes (`quant.pack_kernel`, a store's `pack_kernel`): "triton", the
# kernels of kernels/pack.py (a CPU runs them in the Triton interpreter: tests); "torch", `quantize` + `pack`;
# "auto", Triton on CUDA tensors. Both store the same bits on CPU and CUDA (IEEE divisions;
# tests/test_pack_kernels.py), so the choice changes speed only, and fake storage still gives the same tokens.
PACK_KERNEL_CHOICES = ("auto", "triton", "torch")


def check_pack_kernel(value: str, key: str = "quant.pack_kernel") -> str:
    if value not in PACK_KERNEL_CHOICES:
        raise ConfigError(f"{key}={value!r} is not valid; choose one of {list(PACK_KERNEL_CHOICES)}")
    return value


def uses_pack_kernels(pack_kernel: str, t: torch.Tensor) -> bool:
    """Whether a write of `t` goes through the Triton pack kernels under this choice."""
    return pack_kernel == "triton" or (pack_kernel == "auto" and t.is_cuda)


def pool_starts(used: torch.Tensor, rows: torch.Tensor, words: torch.Tensor):
    """Where new blocks go in their rows' word pools: a row's new blocks follow what its pool holds (`used` [B, H]),
    one after another. `rows` [N]: each block's row; `words` [N, H]: its size. Returns (first word of each block
    [N, H], words added per row [B, H], blocks added per row [B])."""
    excl = torch.cumsum(words, 0) - words
    per_row = torch.bincount(rows, minlength=len(used))
    first = torch.cumsum(per_row, 0) - per_row
    start = used[rows] + excl - excl[first[rows]]
    added = torch.zeros_like(used).index_add_(0, rows, words)
    return start, added, per_row


def _fp_bits(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size() * 8


class CountedOnDevice:
    """A store's tokens per row kept on its device too (`device_count`), so that a decode step a CUDA graph replays
    reads them there (the decode kernels' lengths). Each write at host positions copies the host's counts over it, in
    place (a recorded step that reads it stays valid)."""

    device_count: torch.Tensor | None = None

    def _init_device_count(self, batch: int, device) -> None:
        self.device_count = torch.zeros(batch, dtype=torch.int64, device=device)

    def _counted(self) -> None:
        if self.device_count is not None:
            self.device_count.copy_(to_device(self.tokens(), self.device_count.device))

    def replay_buffers(self) -> list[torch.Tensor]:
        """The device tensors a decode step reads: what the kernels read (`buffers()`) and the device counts."""
        return [t for name, t in self.buffers().items() if name != "lens"] + [self.device_count]


class ChannelGroupStore(CountedOnDevice):
    """Per-channel groups along tokens, in blocks of `block` tokens with a width per (block, head, channel)."""

    def __init__(self, batch, heads, dim, block, group, dtype, device, spec: QuantSpec, packed: bool,
                 uniform_width: int | None, pack11: bool = False, pack_kernel: str = "auto"):
        assert block % group == 0
        self.pack_kernel = check_pack_kernel(pack_kernel, "pack_kernel")
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
        self._init_device_count(batch, device)

    # -- layout arithmetic -------------------------------------------------------------------------------

    def layout(self) -> Layout:
        return self._layout

    @cached_property
    def _layout(self) -> Layout:  # fixed for the store's life, read at every decode step: made once
        if not self.packed:
            return Layout(PackingFormat.DENSE, read_unit=self.p)
        return Layout(PackingFormat.CHANNEL_GROUPS, bits=self.uniform_width, group=self.g, block=self.p,
                      pack11=self.pack11, read_unit=self.p)

    def buffers(self) -> dict[str, torch.Tensor]:
        """The tensors of `layout()` (mixkvq/kv/layout.py)."""
        if not self.packed:
            return {"values": self.values.flatten(2, 3), "lens": self.tokens()}
        out = {"codes": self.pool, "scale": self.scale, "zero": self.zero, "lens": self.tokens()}
        if self.uniform_width is None:
            out.update(widths=self.widths, offsets=self.offsets)
        return out

    def channel_words(self, widths: torch.Tensor) -> torch.Tensor:
        """int32 words one channel of one block occupies, per width code."""
        if self.uniform_width is not None:  # known on the host: no look at the device's widths
            return torch.full_like(widths, self._words_of(self.uniform_width), dtype=torch.int64)
        out = torch.full_like(widths, self._words_of(FULL_PRECISION), dtype=torch.int64)
        for w in widths.unique().tolist():
            if w != FULL_PRECISION:
                out[widths == w] = self._words_of(w)
        return out

    def _words_of(self, w: int) -> int:
        if w == FULL_PRECISION:
            return self.p * self.fp_bits // 32
        return -(-self.p // PACK11) if self._is11(w) else words_for(self.p, w)

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
        if self._in_lockstep(r):
            return self._append_lockstep(r)
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
        if self.uniform_width is not None and self.packed:  # what `_in_lockstep` reads next time
            self._lockstep = len(set(self.nblocks.tolist())) == 1
        self._counted()

    # Every row holds as many blocks as the others (rows of one prompt, or of prompts of one length) and releases the
    # same whole blocks: a uniform-width store then writes them by slices at host offsets, without the per-block
    # index tensors, host copies and host-side arithmetic of the general path (a release out of a CUDA-graph step
    # costs its host time). The same bits, scales, zeros and counts (tests/test_channel_group_store.py).
    _lockstep = True

    def _in_lockstep(self, r: Ragged) -> bool:
        return (self._lockstep and self.packed and self.uniform_width is not None and r.common is not None
                and r.common > 0 and r.common % self.p == 0)

    def _append_lockstep(self, r: Ragged) -> None:
        b, h, d, p = self.b, self.h, self.d, self.p
        nb, n0, w = r.common // p, int(self.nblocks[0]), self.uniform_width
        wpc = self._words_of(w)
        wpb = d * wpc  # words per block of a (row, head) pool; a uniform pool holds its blocks one after another
        u0 = n0 * wpb
        blocks = r.data[:, :, :nb * p].reshape(b, h, nb, p, d).transpose(1, 2).reshape(b * nb, h, p, d)
        if u0 + nb * wpb > self.pool.shape[2]:
            self.pool = reserve(self.pool, 2, self._pool_need(u0 + nb * wpb, n0 + nb))
        self.scale = grow(self.scale, 2, n0 + nb)  # (no-ops within a reservation)
        self.zero = grow(self.zero, 2, n0 + nb)
        if uses_pack_kernels(self.pack_kernel, blocks) and not self.pack11:  # they pack 3-bit codes 10 per word
            from kernels.pack import quantize_pack_channel_blocks

            rows, local = self._lockstep_index(nb)
            base = (local * wpb + u0)[:, None].expand(b * nb, h)
            quantize_pack_channel_blocks(blocks, w, self.g, self.spec, self.pool, self.scale, self.zero, rows,
                                         local + n0, base)
        else:
            _, words, scale, zero = next(self._encode(blocks, None))  # [N H D, wpc], [N H D, groups] in (n, h, d)
            self.pool[:, :, u0:u0 + nb * wpb].view(b, h, nb, d, wpc).copy_(
                words.view(b, nb, h, d, wpc).transpose(1, 2))
            for dst, src in ((self.scale, scale), (self.zero, zero)):
                dst[:, :, n0:n0 + nb] = src.view(b, nb, h, d, -1).transpose(1, 2)
        per_block_bits = float(self._code_bits(torch.tensor(w)) * (h * d))  # as `_count` computes it
        per_block_bytes = h * wpb * 4 + h * self._bytes_per_block()
        for _ in range(nb):  # block by block, as the general path sums them (float64 order)
            self.code_bits += per_block_bits
            self.live_bytes += per_block_bytes
        self.tier_counts[w] = self.tier_counts.get(w, 0) + b * nb * h * d
        self.nblocks += nb
        self.used += nb * wpb
        self._counted()

    def _lockstep_index(self, nb: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, index among the row's new blocks) of each of B x nb new blocks, on the device, made once per nb."""
        cache = self.__dict__.setdefault("_lockstep_indices", {})
        if nb not in cache:
            n = torch.arange(self.b * nb, device=self.device)
            cache[nb] = (n // nb, n % nb)
        return cache[nb]

    def _count(self, widths: torch.Tensor, rows: torch.Tensor) -> None:
        if self.uniform_width is not None:  # from host numbers alone (a mixed store reads its widths back)
            n, w = len(rows), self.uniform_width
            chans = self.h * self.d
            per_block_bits = torch.full((n,), float(self._code_bits(torch.tensor(w)) * chans), dtype=torch.float64)
            words = torch.full((n, self.h), self.d * self._words_of(w), dtype=torch.int64)
            self.tier_counts[w] = self.tier_counts.get(w, 0) + n * chans
        else:
            per_block_bits = self._code_bits(widths).sum(dim=(1, 2)).to(torch.float64).cpu()
            words = self.channel_words(widths).sum(dim=2).cpu()  # [N, H]
            for w, c in zip(*widths.unique(return_counts=True)):
                self.tier_counts[int(w)] = self.tier_counts.get(int(w), 0) + int(c)
        per_block_bytes = words.sum(1) * 4 + self.h * self._bytes_per_block()
        self.code_bits.index_add_(0, rows, per_block_bits)
        self.live_bytes.index_add_(0, rows, per_block_bytes)

    def _encode(self, blocks, widths):
        """Per-width groups of channel rows: yields (mask [N,H,D], words [M, wpc], scale, zero); one width: mask
        None, every channel row in (n, h, d) order, with no boolean indexing (it would wait for the device)."""
        chans = blocks.transpose(2, 3)  # [N, H, D, P]
        uniform = self.uniform_width
        for w in [uniform] if uniform is not None else widths.unique().tolist():
            mask = widths == w if uniform is None else None
            x = chans[mask] if mask is not None else chans.reshape(-1, self.p)  # [M, P]
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
        total = (wpc.sum(dim=2).cpu() if self.uniform_width is None  # [N, H]
                 else torch.full((len(rows), self.h), self.d * self._words_of(self.uniform_width)))
        start, added, per_row = pool_starts(self.used, rows, total)
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
        if uses_pack_kernels(self.pack_kernel, blocks) and not self.pack11:  # they pack 3-bit codes 10 per word
            from kernels.pack import quantize_pack_channel_blocks

            uniform = self.uniform_width
            quantize_pack_channel_blocks(blocks, uniform if uniform is not None else widths, self.g, self.spec,
                                         self.pool, self.scale, self.zero, rows_d, slot_d, base)
        else:
            for mask, words, scale, zero in self._encode(blocks, widths):
                sel = (lambda t: t[mask]) if mask is not None else (lambda t: t.reshape(-1))
                dst = sel(base)[:, None] + torch.arange(words.shape[1], device=dev)[None, :]
                flat_pool[sel(row_head)[:, None], dst] = words
                if scale is None:
                    continue
                if mask is not None:
                    n_idx, h_idx, d_idx = mask.nonzero(as_tuple=True)
                    at = (rows_d[n_idx], h_idx, slot_d[n_idx], d_idx)
                else:  # every channel of every block: broadcast indices, (n, h, d) order as the rows are
                    n, h, d = widths.shape
                    at = (rows_d[:, None, None], torch.arange(h, device=dev)[None, :, None], slot_d[:, None, None],
                          torch.arange(d, device=dev)[None, None, :])
                    scale, zero = scale.reshape(n, h, d, -1), zero.reshape(n, h, d, -1)
                self.scale[at] = scale
                self.zero[at] = zero
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


class TokenGroupStore(CountedOnDevice):
    """Per-token groups of `group` channels, one code width for the whole store."""

    def __init__(self, batch, heads, dim, group, bits, dtype, device, spec: QuantSpec, packed: bool,
                 pack_kernel: str = "auto"):
        assert dim % group == 0
        self.pack_kernel = check_pack_kernel(pack_kernel, "pack_kernel")
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
        self._init_device_count(batch, device)

    def append(self, r: Ragged, widths_fn=None) -> None:
        self._append(r)
        self._counted()

    def _append(self, r: Ragged) -> None:
        if self.packed and uses_pack_kernels(self.pack_kernel, r.data):
            from kernels.pack import append_tokens

            return append_tokens(r, self.bits, self.g, self.spec, self.codes, self.scale, self.zero)
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
        return self._layout

    @cached_property
    def _layout(self) -> Layout:  # fixed for the store's life, read at every decode step: made once
        return Layout(PackingFormat.TOKEN_GROUPS, bits=self.bits, group=self.g) if self.packed \
            else Layout(PackingFormat.DENSE)

    def buffers(self) -> dict[str, torch.Tensor]:
        """The tensors of `layout()` (mixkvq/kv/layout.py)."""
        if not self.packed:
            return {"values": self.values.data, "lens": self.tokens()}
        return {"codes": self.codes.data, "scale": self.scale.data, "zero": self.zero.data, "lens": self.tokens()}

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
