"""Packed layouts as data: what a store holds and in what order, for stores, kernels and the reference alike.

Every store answers two questions; the fused kernels (kernels/) read a store through these alone (the PyTorch
reference asks the store to dequantize itself: `ragged(start)`, `version`):
- `layout()`: a `Layout`, a frozen and hashable value: the `PackingFormat` and the numbers that locate codes
  (code width, group, block, word packing, page layout). It does not change while the store lives.
- `buffers()`: the store's tensors now, by name (`BUFFERS` lists the names of each format); valid until its next
  write, which may reallocate them. Every format has `lens`, tokens stored per row (int64 [B], on the host).
  - DENSE: `values` [B, H, T, D] in the model dtype (dequantized tokens: storage=fake).
  - CHANNEL_GROUPS: `codes` int32 [B, H, words], one pool per (row, head); `scale`, `zero` [B, H, blocks, D,
    block / group]. One width (`bits`): block k, channel d holds w = ceil(block / codes_per_word) words at
    (k * D + d) * w. Mixed widths (`bits` None) add `widths` uint8 [B, H, blocks, D] (0: full
    precision, raw model-dtype bits) and `offsets` int64 [B, H, blocks] (each block's first word; a block's
    channels follow one another, each taking the words of its own width).
  - TOKEN_GROUPS: `codes` int32 [B, H, T, words_for(D, bits)]; `scale`, `zero` [B, H, T, D / group].
  - ROW_WIDTH_TOKEN_GROUPS: as TOKEN_GROUPS, with `row_bits` int64 [B] (host): row b's width; its tokens use the
    first words_for(D, row_bits[b]) words of a `codes` row (the widest row's words).
  - FRAGMENT_PAGES: `pages` int32 [B, H, pages, page_words], shared by a layer's key and value stores.
  - TIERED_FRAGMENT_PAGES: `pool` int32 [B, H, words], one pool per (row, head) of variable-size blocks, and
    `offsets` int64 [B, H, blocks] (each block's first word); a block's bytes: `TieredPageLayout`.
Codes are `bits` wide, `codes_per_word` to an int32 word, the first in the lowest bits (mixkvq/kv/quantizer.py).

`FragmentPageLayout` is the layout made for the CUDA decode kernel (kernels/cuda): per (row, KV head, 32-token
page) one contiguous page holding the page's key codes, key scales and zeros, value codes, value scales and zeros.
Codes are written in the order a warp's tensor-core fragments read them, so the kernel loads each thread's share of
a 16-token tile with one vector load and converts it in registers. `code_order` is the single definition of that
order; the packer, the unpacker and the kernel's generic path (kernels/cuda/fragment_decode.cuh) follow it.

The fragments are those of `mma.sync.m16n8k16` with 16-bit A operands: thread `lane` (g = lane // 4,
t = lane % 4) holds four 32-bit registers per 16x16 A tile, register `reg` holding the element pair
(row g + 8 * (reg & 1), columns 2t + 8 * (reg >> 1) + {0, 1}). Keys are the A operand with tokens as rows and
channels as columns (one tile per 16 channels: a "k-step"); values are the A operand transposed (channels as rows,
tokens as columns; one tile per 16 channels: an "m-tile").

`TieredPageLayout` holds MixKVQ's mixed-width keys for a kernel of the same kind: per block, the key channels are
permuted into their tiers (full precision, 4-bit, 2-bit) and each tier is a uniform key tile of its own channel
count, in `code_order` with `channel_meta_order` scales and zeros, so a kernel runs one uniform loop per tier.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from functools import lru_cache

import torch

from mixkvq.kv.quantizer import PACK11


class PackingFormat(enum.Enum):
    """How a store lays out its codes (one entry per store kind; `Layout.format`)."""

    CHANNEL_GROUPS = "channel_groups"  # per-channel groups of G tokens in blocks of P tokens (KIVI/MixKVQ/KVmix keys)
    TOKEN_GROUPS = "token_groups"  # per-token groups of G channels, one width (values; per-token keys)
    ROW_WIDTH_TOKEN_GROUPS = "row_width_token_groups"  # token groups at one width per batch row (PM-KVQ)
    DENSE = "dense"  # dequantized tokens in the model dtype (storage=fake)
    FRAGMENT_PAGES = "fragment_pages"  # keys and values of 32 tokens per page in fragment order (CUDA kernel)
    TIERED_FRAGMENT_PAGES = "tiered_fragment_pages"  # mixed-width key blocks as per-tier fragment tiles (MixKVQ)


@dataclass(frozen=True)
class Layout:
    """A store's packing format and the numbers that locate its codes (its tensors: the store's `buffers()`)."""

    format: PackingFormat
    bits: int | None = None  # one code width (None: mixed per block and channel, or per row)
    group: int | None = None  # tokens (channel groups) or channels (token groups) per scale and zero
    block: int | None = None  # tokens per block (channel groups)
    pack11: bool = False  # KVmix's 3-bit words: 11 codes per word, the 11th of 2 bits (in bits 30-31)
    page: "FragmentPageLayout | None" = None  # FRAGMENT_PAGES only
    tiers: "TieredPageLayout | None" = None  # TIERED_FRAGMENT_PAGES only
    read_unit: int = 1  # stored tokens decode in runs starting at multiples of this (whole blocks, whole pages)

    @property
    def codes_per_word(self) -> int | None:
        """Codes per int32 word at the one width (None: widths differ per block and channel, or per row)."""
        if self.bits is None:
            return None
        return PACK11 if self.pack11 and self.bits == 3 else 32 // self.bits

    def buffer_names(self) -> tuple[str, ...]:
        """The names `buffers()` answers for this layout."""
        mixed = ("widths", "offsets") if self.format is PackingFormat.CHANNEL_GROUPS and self.bits is None else ()
        return BUFFERS[self.format] + mixed + ("lens",)


# Tensors every store of a format answers in `buffers()` (mixed-width channel groups add `widths`, `offsets`; every
# format adds `lens`); what each holds: the module docstring.
BUFFERS: dict[PackingFormat, tuple[str, ...]] = {
    PackingFormat.DENSE: ("values",),
    PackingFormat.CHANNEL_GROUPS: ("codes", "scale", "zero"),
    PackingFormat.TOKEN_GROUPS: ("codes", "scale", "zero"),
    PackingFormat.ROW_WIDTH_TOKEN_GROUPS: ("codes", "scale", "zero", "row_bits"),
    PackingFormat.FRAGMENT_PAGES: ("pages",),
    PackingFormat.TIERED_FRAGMENT_PAGES: ("pool", "offsets"),
}


PAGE_TOKENS = 32  # tokens per page: one key group (per-channel scales) and two 16-token tiles
TILE_TOKENS = 16  # tokens per tensor-core tile (the K dimension of the value product, the M of the key product)
PAGE_BITS = (2, 4)  # code widths the fragment order packs (a register pair per lop3 conversion)
# Key code widths stored in the slots of a wider page format (the kernel reads them as that format: a code is its
# value, whatever the width it was quantized to). The bits accounting keeps the code width; the bytes are the slots'.
PAGE_CONTAINERS = {3: 4}


def page_container(bits: int | None) -> int | None:
    """The page format's width that holds codes of `bits` bits."""
    return PAGE_CONTAINERS.get(bits, bits)
PAGE_HEAD_DIMS = (64, 128)


@dataclass(frozen=True)
class FragmentPageLayout:
    """One page: [key codes | key scale | key zero | value codes | value scale | value zero], 16-byte sections.

    - key codes: two 16-token tiles; tile m, lane l: `key_words_per_lane` int32 words (fragment order).
    - key scale and zero: `head_dim` values each (one 32-token group per channel), in `channel_meta_order`.
    - value codes: two 16-token tiles (k-steps of the value product) in fragment order, likewise.
    - value scale and zero: 32 tokens x `head_dim // value_group` groups each, in `token_meta_order`.
    Scales and zeros are in the model dtype (16-bit), which the kernel multiplies into its operands.
    `key_bits` None: pages of values only, the keys being held in another layout (MixKVQ's `TieredPageLayout`).
    """

    head_dim: int
    key_bits: int | None
    value_bits: int
    value_group: int  # channels per value scale (per-token groups)
    meta_bytes: int = 2

    def __post_init__(self):
        problems = check_page_layout(self.head_dim, self.key_bits, self.value_bits, self.value_group)
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def value_groups(self) -> int:
        return self.head_dim // self.value_group

    @staticmethod
    def words_per_lane(head_dim: int, bits: int) -> int:
        return head_dim * bits // 64  # 16 tokens x head_dim codes over 32 lanes, 32 bits per word

    @property
    def key_words_per_lane(self) -> int:
        return self.words_per_lane(self.head_dim, self.key_bits) if self.key_bits is not None else 0

    @property
    def value_words_per_lane(self) -> int:
        return self.words_per_lane(self.head_dim, self.value_bits)

    def sections(self) -> dict[str, tuple[int, int]]:
        """name -> (byte offset, bytes) within a page."""
        d, m = self.head_dim, self.meta_bytes
        dk, kb = (d, self.key_bits) if self.key_bits is not None else (0, 0)  # no key part: empty key sections
        sizes = [("key_codes", PAGE_TOKENS * dk * kb // 8), ("key_scale", dk * m), ("key_zero", dk * m),
                 ("value_codes", PAGE_TOKENS * d * self.value_bits // 8),
                 ("value_scale", PAGE_TOKENS * self.value_groups * m), ("value_zero", PAGE_TOKENS * self.value_groups * m)]
        out, at = {}, 0
        for name, n in sizes:
            out[name] = (at, n)
            at += -(-n // 16) * 16
        return out

    @property
    def page_bytes(self) -> int:
        off, n = list(self.sections().values())[-1]
        return off + -(-n // 16) * 16

    @property
    def page_words(self) -> int:
        return self.page_bytes // 4

    def key_bytes(self) -> int:
        """Bytes of a page's key part (codes, scales, zeros): what the key store accounts for."""
        s = self.sections()
        return sum(s[k][1] for k in ("key_codes", "key_scale", "key_zero"))

    def value_bytes_per_token(self) -> int:
        return self.head_dim * self.value_bits // 8 + 2 * self.value_groups * self.meta_bytes


def check_page_layout(head_dim: int, key_bits: int | None, value_bits: int, value_group: int) -> list[str]:
    """Why these numbers have no fragment page layout (empty when they do; key_bits None: values only)."""
    out = []
    if head_dim not in PAGE_HEAD_DIMS:
        out.append(f"head_dim {head_dim} is not one of {list(PAGE_HEAD_DIMS)}")
    for what, bits in (("key", key_bits), ("value", value_bits)):
        if bits not in PAGE_BITS and not (what == "key" and bits is None):
            out.append(f"{what} width {bits} is not one of {list(PAGE_BITS)}")
    if value_group % 16 or head_dim % value_group:
        out.append(f"value group {value_group} is not a multiple of 16 dividing head_dim {head_dim}")
    return out


# ---- tiered pages: MixKVQ's mixed-width key blocks ------------------------------------------------------------

TIER_WIDTHS = (0, 4, 2)  # a block's tiers in order, by width code (0: full precision, raw model-dtype bits)
TIER_BITS = (16, 4, 2)  # bits per element of each tier
TIER_STEP = 16  # a tier's channels are padded to whole k-steps
TIER_SECTIONS = ("fp_values", "k4_codes", "k2_codes")  # each tier's first section in a page (its others follow)


def tier_channels(count):
    """Channels of a tier of `count` channels as stored: whole k-steps (ints or int64 tensors alike)."""
    return -(-count // TIER_STEP) * TIER_STEP


def tile_channels(count, bits: int):
    """Channels a tier's code tile spans: `tier_channels` rounded up to whole int32 words per lane (2-bit: a word
    holds two k-steps, so 32 channels); the extra channels' codes are zero."""
    return -(-tier_channels(count) * bits // 64) * 64 // bits


@dataclass(frozen=True)
class TieredPageLayout:
    """One MixKVQ key block per (row, KV head, `block` tokens), contiguous, 16-byte aligned sections:

        header: perm uint8 [head_dim] | counts uint8 [16]: (full precision, 4-bit, 2-bit), then zeros
        page j (j < block / 32, 32 tokens each):
            fp_values | k4_codes | k4_scale | k4_zero | k2_codes | k2_scale | k2_zero

    `perm` lists the block's channels by tier (full precision, 4-bit, 2-bit in `TIER_WIDTHS` order; ascending within
    a tier): tier t's channel i is perm[start_t + i], start_t the sum of the counts before it, so a kernel gathers
    the query's columns once per block. A tier of n channels is a uniform key tile of c = `tier_channels(n)`
    channels (whole k-steps; padding channels hold zero values, codes, scales and zeros, so whatever query column
    meets them adds 0):
    - fp_values: the raw model-dtype bits in `code_order(c, 16, "key")`: the MMA's A fragments as they are;
    - kB_codes: two 16-token tiles in `code_order(c', B, "key")`, c' = `tile_channels(n, B)` (c at 4 bits; at 2 bits
      a word holds two k-steps, so an odd number of k-steps leaves the upper half of each lane's last word zero);
    - kB_scale, kB_zero: the c channels' scales and zeros of the page's 32-token group, in `channel_meta_order(c)`.
    A tier without channels has empty sections.

    Blocks lie at variable offsets, each right after the one before in its (row, head) pool, found through one
    offset per block: a block's size follows from its counts (`block_bytes`), whereas a fixed capacity would be
    sized for the worst case (every channel at full precision, 16 bits) and hold about six times what a 2.3-bit mix
    needs. Within a block no offset is stored: every section's place follows from the counts (`page_sections`).
    What is counted is what is stored: header, every section with its padding channels, the 8-byte offset.
    """

    head_dim: int
    block: int
    value_bytes: int = 2  # raw full-precision values, scales and zeros: the model dtype (bf16 / fp16)

    def __post_init__(self):
        problems = check_tiered_layout(self.head_dim, self.block, self.value_bytes)
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def pages(self) -> int:
        return self.block // PAGE_TOKENS

    @property
    def header_bytes(self) -> int:
        return self.head_dim + 16

    def page_sections(self, counts) -> dict:
        """name -> (byte offset within a page, bytes) for tier counts (full precision, 4-bit, 2-bit): three ints, or
        three int64 tensors of one shape (a block each)."""
        n_fp, n4, n2 = counts
        m = self.value_bytes
        sizes = [("fp_values", PAGE_TOKENS * tier_channels(n_fp) * m)]
        for name, n, bits in (("k4", n4, 4), ("k2", n2, 2)):
            c = tier_channels(n)
            sizes += [(f"{name}_codes", PAGE_TOKENS * tile_channels(n, bits) * bits // 8), (f"{name}_scale", c * m),
                      (f"{name}_zero", c * m)]
        out, at = {}, 0
        for name, n in sizes:
            out[name] = (at, n)
            at = at + n
        return out

    def page_bytes(self, counts):
        off, n = self.page_sections(counts)["k2_zero"]
        return off + n

    def block_bytes(self, counts):
        """Bytes of a block in the pool (header and pages; its offset is held apart, in `offsets`)."""
        return self.header_bytes + self.pages * self.page_bytes(counts)


def check_tiered_layout(head_dim: int, block: int, value_bytes: int = 2) -> list[str]:
    """Why these numbers have no tiered page layout (empty when they do)."""
    out = []
    if head_dim not in PAGE_HEAD_DIMS:
        out.append(f"head_dim {head_dim} is not one of {list(PAGE_HEAD_DIMS)}")
    if block <= 0 or block % PAGE_TOKENS:
        out.append(f"block {block} is not a positive multiple of {PAGE_TOKENS}")
    if value_bytes != 2:
        out.append(f"{8 * value_bytes}-bit model dtype: tiers hold 16-bit values, scales and zeros")
    return out


# ---- the fragment order ------------------------------------------------------------------------------------


def register_element(lane: int, reg: int, half: int) -> tuple[int, int]:
    """(row, column) within a 16x16 A tile of the element in half `half` of register `reg` of thread `lane`."""
    g, t = lane // 4, lane % 4
    return g + 8 * (reg & 1), 2 * t + 8 * (reg >> 1) + half


@lru_cache(maxsize=None)
def code_order(head_dim: int, bits: int, kind: str) -> torch.Tensor:
    """For one 16-token tile: the (token, channel) of every code slot, as an int64 tensor [32, W, R, 2, 2].

    Slot (lane, word, j, half) is bits [16 * half + j * bits, ... + bits) of word `word` of lane `lane`'s
    W = head_dim * bits / 64 words; its register index is r = word * R + j (R = 16 / bits registers per word),
    the tile's k-step (keys) or m-tile (values) is r // 4 and the fragment register r % 4. `kind` is "key"
    (rows are tokens, columns channels) or "value" (rows are channels, columns tokens).
    """
    if kind not in ("key", "value"):
        raise ValueError(f"kind={kind!r}: 'key' or 'value'")
    w = FragmentPageLayout.words_per_lane(head_dim, bits)
    rpw = 16 // bits
    out = torch.empty(32, w, rpw, 2, 2, dtype=torch.int64)
    for lane in range(32):
        for word in range(w):
            for j in range(rpw):
                r = word * rpw + j
                tile, reg = r // 4, r % 4
                for half in range(2):
                    row, col = register_element(lane, reg, half)
                    if kind == "key":
                        token, chan = row, 16 * tile + col
                    else:
                        token, chan = col, 16 * tile + row
                    out[lane, word, j, half] = torch.tensor([token, chan])
    return out


@lru_cache(maxsize=None)
def _flat_order(head_dim: int, bits: int, kind: str, device: torch.device) -> torch.Tensor:
    # One copy per device: a copy at every call would synchronize the stream at every key flush.
    o = code_order(head_dim, bits, kind)
    return (o[..., 0] * head_dim + o[..., 1]).reshape(-1).to(device)  # slot -> token * head_dim + channel


def pack_tile(codes: torch.Tensor, bits: int, kind: str) -> torch.Tensor:
    """Codes [..., 16, head_dim] (integers < 2**bits) -> int32 words [..., 32 * W] in fragment order."""
    d = codes.shape[-1]
    flat = codes.reshape(*codes.shape[:-2], TILE_TOKENS * d).to(torch.int64)
    slots = flat[..., _flat_order(d, bits, kind, codes.device)]  # [..., 32*W*R*2]
    w, rpw = FragmentPageLayout.words_per_lane(d, bits), 16 // bits
    slots = slots.reshape(*codes.shape[:-2], 32 * w, rpw, 2)
    shift = (torch.arange(rpw, device=codes.device)[:, None] * bits
             + 16 * torch.arange(2, device=codes.device)[None, :])
    words = (slots << shift).sum(dim=(-1, -2))
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def unpack_tile(words: torch.Tensor, head_dim: int, bits: int, kind: str) -> torch.Tensor:
    """Inverse of `pack_tile`: int32 words [..., 32 * W] -> codes [..., 16, head_dim] (int64)."""
    rpw = 16 // bits
    w = words.to(torch.int64) & 0xFFFFFFFF
    shift = (torch.arange(rpw, device=words.device)[:, None] * bits
             + 16 * torch.arange(2, device=words.device)[None, :])
    slots = ((w[..., None, None] >> shift) & ((1 << bits) - 1)).reshape(*words.shape[:-1], -1)
    out = torch.empty_like(slots)
    out[..., _flat_order(head_dim, bits, kind, words.device)] = slots
    return out.reshape(*words.shape[:-1], TILE_TOKENS, head_dim)


@lru_cache(maxsize=None)
def token_slots(head_dim: int, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each code of one token of a value tile goes: (word within the tile, bit shift), each [16, head_dim].

    Row c is the token in column c of the tile, so a token's codes are written into words that already hold other
    tokens' codes by adding `code << shift` at `word` (the slots are disjoint): no tile needs repacking.
    """
    order = code_order(head_dim, bits, "value")  # [32, W, R, 2, 2]: (token, channel) of each slot
    w, rpw = order.shape[1], order.shape[2]
    lane, word, j, half = torch.meshgrid(torch.arange(32), torch.arange(w), torch.arange(rpw), torch.arange(2),
                                         indexing="ij")
    word_idx, shift = torch.empty(16, head_dim, dtype=torch.int64), torch.empty(16, head_dim, dtype=torch.int64)
    token, chan = order[..., 0], order[..., 1]
    word_idx[token, chan] = lane * w + word
    shift[token, chan] = j * bits + 16 * half
    return word_idx, shift


@lru_cache(maxsize=None)
def channel_meta_order(head_dim: int) -> torch.Tensor:
    """Key scales and zeros of a page: position i holds channel order[i].

    Quad t (lanes with lane % 4 == t) reads head_dim / 4 contiguous values: for each k-step kk the channels
    16 kk + 2t + {0, 1} and 16 kk + 2t + 8 + {0, 1}: the B-operand rows of its query fragment, and the A-operand
    columns of the zero row that yields the key bias.
    """
    t = torch.arange(4)[:, None, None]
    kk = torch.arange(head_dim // 16)[None, :, None]
    i = torch.arange(4)[None, None, :]
    return (16 * kk + 2 * t + (i & 1) + 8 * (i >> 1)).reshape(-1)


@lru_cache(maxsize=None)
def token_meta_order(value_groups: int) -> torch.Tensor:
    """Value scales and zeros of a page: position i holds (token, group) = divmod(order[i], value_groups).

    For each 16-token k-step ks and quad t: every group's four tokens 16 ks + 2t + {0, 1} and 16 ks + 2t + 8 + {0, 1}
    (the B-operand rows of the probability fragment), so one vector load fetches a thread's scales of a k-step.
    """
    ks = torch.arange(2)[:, None, None, None]
    t = torch.arange(4)[None, :, None, None]
    grp = torch.arange(value_groups)[None, None, :, None]
    i = torch.arange(4)[None, None, None, :]
    token = 16 * ks + 2 * t + (i & 1) + 8 * (i >> 1)
    return (token * value_groups + grp).reshape(-1)
