"""PM-KVQ's progressive store (METHODS.md §6.2): per-token groups whose code width shrinks over time, per row.

The store subclass, its shrink rule and its kernel-facing layout (`PackingFormat.ROW_WIDTH_TOKEN_GROUPS`: a code
width per batch row) belong to PM-KVQ alone; the shared stores they build on are in `mixkvq/kv/storage.py`.
"""

from __future__ import annotations

from functools import cached_property

import torch

from mixkvq.kv.layout import Layout, PackingFormat
from mixkvq.kv.quantizer import QuantSpec, dequantize, pack, quantize, unpack, words_for
from mixkvq.kv.ragged import Ragged, RaggedBuffer, from_token, to_device
from mixkvq.kv.storage import TokenGroupStore

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
        # The rows' widths on the device too, copied in place after each shrink: a replayed step's kernel reads them.
        self.device_row_bits = self.row_bits.to(device)
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

    @cached_property
    def _layout(self) -> Layout:  # widths change per row, the layout does not
        return Layout(PackingFormat.ROW_WIDTH_TOKEN_GROUPS, group=self.g) if self.packed \
            else Layout(PackingFormat.DENSE)

    def buffers(self) -> dict[str, torch.Tensor]:
        out = super().buffers()
        if self.packed:
            out["row_bits"] = self.row_bits
        return out

    def replay_buffers(self) -> list[torch.Tensor]:
        return [t for name, t in self.buffers().items() if name not in ("lens", "row_bits")] + \
            [self.device_count, self.device_row_bits]

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
        self.codes.append(Ragged(codes_out, r.lens, r.common))
        self.scale.append(Ragged(scale_out, r.lens, r.common))
        self.zero.append(Ragged(zero_out, r.lens, r.common))
        if not self.packed:
            self.values.append(self._dequantized(Ragged(codes_out, r.lens), Ragged(scale_out, r.lens),
                                                 Ragged(zero_out, r.lens)))
        self._counted()

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
        self.device_row_bits.copy_(to_device(self.row_bits, self.device_row_bits.device))
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
