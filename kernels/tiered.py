"""MixKVQ's tiered key blocks (mixkvq/kv/layout.py `TieredPageLayout`): the CUDA decode kernel over them
(kernels/cuda/tiered_decode.cuh, registered as `cuda-tiered`), and its math in PyTorch.

`tiered_scores` is the key product the kernel is to do, read from a store's `layout()` and `buffers()` alone, so
that the kernel has a statement to be tested against. Per (row, KV head, block): the block's permutation gathers the
GQA group's query columns once (tier order); per 32-token page each tier then runs as a uniform key tile into the
same score accumulator, as the fragment kernel does for one width (kernels/cuda/fragment_decode.cuh):
- full precision: q . k over the tier's raw values;
- 4-bit and 2-bit: scores = (q * s) . codes + q . z, the scales folded into the query (q' = q * s per channel) and
  the zeros giving one bias per head (z . q), never a dequantized key.
A tier's padding channels hold zero values, codes, scales and zeros, so the query columns they meet (the next
tier's, or zeros past the last) add nothing.

`kernel_numerics=False` computes in float64 without rounding (the fold itself, exactly); True rounds as the kernel
does: q' to the model dtype (one 16-bit multiply per pair), products summed in fp32.

The kernel (`tiered_decode`, an extension of its own, built at its first use; sm_90a, no spills at 3 CTAs per SM)
serves MixKVQ layers whose values fit values-only fragment pages (2/4-bit, groups of 32): `attention.decode_kernel`
`auto` picks it for them on CUDA. tests/test_tiered_kernel.py checks it against fp64 on the GPU. In a step a CUDA
graph records it reads the stores' device counts, as the fragment kernel does.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from kernels import fragment
from mixkvq.kv.layout import (PAGE_TOKENS, TIER_BITS, TIER_SECTIONS, TIER_STEP, TIER_WIDTHS, Layout, PackingFormat,
                              channel_meta_order, tier_channels, tile_channels, unpack_tile)


def tiered_scores(query: torch.Tensor, layout: Layout, buffers: dict, kernel_numerics: bool = False) -> torch.Tensor:
    """q . k of every stored token: query [B, Hq, 1, D] -> [B, Hq, T] (T: the longest row's tokens; 0 past a
    row's `lens`), float64, or fp32 with `kernel_numerics`. Query head i reads KV head i // (Hq / H)."""
    if layout.format is not PackingFormat.TIERED_FRAGMENT_PAGES:
        raise ValueError(f"layout {layout.format.value} is not tiered pages")
    lay = layout.tiers
    pool, offsets, lens = buffers["pool"].cpu(), buffers["offsets"].cpu(), buffers["lens"]
    b_n, h_n, d = pool.shape[0], pool.shape[1], lay.head_dim
    g = query.shape[1] // h_n
    acc_dtype = torch.float32 if kernel_numerics else torch.float64
    out = torch.zeros(b_n, query.shape[1], int(lens.max()), dtype=acc_dtype)
    hw = lay.header_bytes // 4
    for b in range(b_n):
        for h in range(h_n):
            q = query[b, h * g:(h + 1) * g, 0].cpu()  # [g, D]
            if not kernel_numerics:
                q = q.double()
            for k in range(int(lens[b]) // lay.block):
                base = int(offsets[b, h, k])
                header = pool[b, h, base:base + hw].view(torch.uint8)
                perm, counts = header[:d].long(), header[d:d + len(TIER_WIDTHS)].tolist()
                # The block's query columns in tier order, gathered once; padding slots past D read zeros.
                qp = torch.cat((q[:, perm], q.new_zeros(g, TIER_STEP)), dim=1)
                sec = {name: off // 4 for name, (off, _) in lay.page_sections(counts).items()}
                page_words = lay.page_bytes(counts) // 4
                starts = [sum(counts[:t]) for t in range(len(counts))]
                for j in range(lay.pages):
                    page = pool[b, h, base + hw + j * page_words:base + hw + (j + 1) * page_words]
                    acc = torch.zeros(g, PAGE_TOKENS, dtype=acc_dtype)
                    for t, name in enumerate(TIER_SECTIONS):
                        if counts[t]:
                            c = tier_channels(counts[t])
                            acc += _tier_scores(qp[:, starts[t]:starts[t] + c], page[sec[name]:], t, c,
                                                query.dtype, kernel_numerics)
                    out[b, h * g:(h + 1) * g, k * lay.block + j * PAGE_TOKENS:][:, :PAGE_TOKENS] = acc
    return out


def _tier_scores(q: torch.Tensor, words: torch.Tensor, t: int, c: int, dtype: torch.dtype,
                 kernel_numerics: bool) -> torch.Tensor:
    """One tier of one page: q [g, c] (tier order) against the tier's sections from words[0] on -> [g, 32].
    `dtype`: the model dtype (raw values, scales and zeros)."""
    acc = torch.float32 if kernel_numerics else torch.float64
    if TIER_WIDTHS[t] == 0:  # raw 16-bit values, two 16-token tiles
        raw = unpack_tile(words[:2 * 32 * c // 4].reshape(2, -1), c, 16, "key").reshape(PAGE_TOKENS, c)
        keys = torch.where(raw >= 1 << 15, raw - (1 << 16), raw).to(torch.int16).view(dtype)
        return q.to(acc) @ keys.to(acc).T
    bits = TIER_BITS[t]
    cw = tile_channels(c, bits)
    nw = 2 * 32 * cw * bits // 64  # two tiles, 32 lanes
    codes = unpack_tile(words[:nw].reshape(2, -1), cw, bits, "key").reshape(PAGE_TOKENS, cw)[:, :c].to(acc)
    inv = torch.argsort(channel_meta_order(c))
    s, z = (words[nw + i * c // 2:nw + (i + 1) * c // 2].contiguous().view(torch.int16)[inv].view(dtype)
            for i in (0, 1))
    if kernel_numerics:  # q' = q * s rounded to the model dtype (a 16-bit multiply); z . q as one more MMA row
        return (q * s).to(acc) @ codes.T + (q.to(acc) @ z.to(acc))[:, None]
    return (q * s.to(acc)) @ codes.T + (q @ z.to(acc))[:, None]


# ---- the CUDA kernel -------------------------------------------------------------------------------------------

TIERED_VALUE_FORMATS = ((2, 32), (4, 32))  # (value bits, value group) the kernel is built for
TIERED_HEAD_DIMS = (64, 128)
# The split planner's input: three resident CTAs per SM (tiered_decode.cu CTAS).
TUNING = replace(fragment.DEFAULT_TUNING, ctas_per_sm=3)


def ring_key_cap(head_dim: int) -> int:
    """Bytes of a key page the kernel stages in shared memory (tiered_decode.cuh TieredSmem::KEY_CAP); a page over
    it (a block of many full-precision channels) is read from global memory where it lies."""
    return head_dim * PAGE_TOKENS


def _on_tiers(layer) -> bool:
    lay = layer.key_stream.store.layout() if layer.key_stream.store is not None else None
    return lay is not None and lay.format is PackingFormat.TIERED_FRAGMENT_PAGES


def supports(layer) -> str | None:
    """Why the tiered CUDA kernel cannot serve this layer (None: it can, after `prepare`)."""
    from mixkvq.kv.tiered import tiered_problems, value_page_problems  # not at import: kernels load no stores

    if not _on_tiers(layer):
        problems = tiered_problems(layer) + value_page_problems(layer)
        if problems:
            return "; ".join(problems)
        if int(layer.key_stream.tokens().max()) > 0:
            return fragment.FILLED_BEFORE_BIND
    ks, vs = layer.key_stream, layer.value_stream
    vpl = vs.store.layout().page if _on_tiers(layer) else None
    bits, group = (vpl.value_bits, vpl.value_group) if vpl is not None else (vs.store.bits, vs.store.g)
    if (bits, group) not in TIERED_VALUE_FORMATS:
        return f"values of {bits} bits in groups of {group} (the kernel is built for {list(TIERED_VALUE_FORMATS)})"
    if layer.dim not in TIERED_HEAD_DIMS:
        return f"head_dim {layer.dim} is not one of {list(TIERED_HEAD_DIMS)}"
    if (ks.sink is None) != (vs.sink is None):
        return "keys and values need the same sink"
    groups = getattr(layer, "query_groups", None)
    if groups is not None and groups > fragment.MAX_GQA:
        return f"{groups} query heads per KV head (the kernel holds at most {fragment.MAX_GQA})"
    if len(layer.pad) > fragment.MAX_ROWS:
        return f"batch {len(layer.pad)} is over {fragment.MAX_ROWS} rows"
    if not ks.window.data.is_cuda:
        return "the cache is not on a CUDA device"
    if not fragment.compiler_available():
        return "no CUDA compiler (nvcc) to build the kernel"
    return None


def prepare(layer) -> None:
    """Put a fresh MixKVQ layer's keys into tiered blocks and its values into values-only pages (once, when bound)."""
    if not _on_tiers(layer):
        from mixkvq.kv.tiered import to_tiered_pages

        to_tiered_pages(layer)


def tiered_decode(query: torch.Tensor, layer, scaling: float, tuning=None) -> torch.Tensor:
    """query [B, Hq, 1, D] -> [B, 1, Hq, D] over the layer's tiered key blocks and value pages."""
    tuning = tuning or TUNING
    ks, vs = layer.key_stream, layer.value_stream
    kb, vb = ks.store.buffers(), vs.store.buffers()
    vpl = vs.store.layout().page
    block = ks.store.layout().block
    sink = ks.sink
    device_counts, bounds = [], []
    if layer.graph_tokens is not None:  # a step a CUDA graph records: counts from the device, splits for the bucket
        device_counts = [ks.store.device_count, vs.store.device_count, ks.window.device_lens]
        if sink is not None:
            device_counts.append(sink.device_lens)
        # the tail: sink, the longest window such a step attends over, and a partial block
        window = max(ks.quiet_below, vs.quiet_below)
        bounds = [layer.graph_tokens // block, ks.sink_tokens + window + block - 1]
    return fragment.build_extension("tiered_decode", "tiered_decode.cu", query.device).tiered_decode(
        query, kb["pool"], kb["offsets"], vb["pages"], ks.window.data, vs.window.data,
        sink.data if sink is not None else None, vs.sink.data if sink is not None else None,
        sink.lens if sink is not None else None, kb["lens"], vb["lens"], ks.window.lens, scaling * fragment.LOG2E,
        block, vpl.value_bits, vpl.value_group, [tuning.ctas_per_sm, tuning.max_splits, tuning.tail_tokens_min],
        device_counts, bounds)


def decode_attention(module, query: torch.Tensor, layer, scaling: float) -> torch.Tensor:
    """The registered `cuda-tiered` decode kernel (same signature as the PyTorch reference)."""
    return tiered_decode(query, layer, scaling)
