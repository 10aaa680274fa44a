"""Tiered pages on CPU: MixKVQ's mixed-width key blocks permuted into per-tier fragment tiles.

The tiered store must hold exactly what the mixed-width ChannelGroupStore holds (codes, scales, zeros, hence the
dequantized tokens and the reference decoder's output), count the same code bits and, as bytes, what its blocks
take; kernels/tiered.py, the kernel's math, must score as attention over those keys does.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from kernels import fragment, resolve_decode_kernel
from kernels import tiered as tiered_kernel
from kernels.reference import decode_attention as reference_decode
from kernels.reference import stream_tokens
from kernels.tiered import tiered_scores
from mixkvq.errors import ConfigError
from mixkvq.kv.layout import (PAGE_TOKENS, FragmentPageLayout, PackingFormat, TieredPageLayout,
                              channel_meta_order, tier_channels, unpack_tile)
from mixkvq.kv.paged import PagedValueStore
from mixkvq.kv.quantizer import QuantSpec, quantize
from mixkvq.kv.ragged import Ragged
from mixkvq.kv.storage import ChannelGroupStore, TokenGroupStore
from mixkvq.kv.tiered import TieredPagedKeyStore, tiered_problems, to_tiered_pages, value_page_problems
from test_decode_kernel import ground_truth
from test_fragment_pages import filled_layer_into
from tiny import build, generate, left_pad, random_prompts, tiny_model

# Width codes per channel, drawn per block: (full precision, 4-bit, 2-bit) in MixKVQ's proportions and extremes.
MIXES = {"fp": (0,), "k2": (2,), "k4": (4,), "mixed": (0, 4, 4, 2, 2, 2, 2, 2, 2, 2)}
UNIT = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}  # unit roundoff of the model dtype


def widths_by_content(mix):
    """A widths_fn whose widths follow from the block's keys, so twin stores fed the same keys get the same widths."""
    table = torch.tensor(MIXES[mix], dtype=torch.uint8)

    def widths_fn(blocks, rows):
        key = (blocks[:, :, 0].float() * 997).long().abs() + (blocks[:, :, 1].float() * 31).long().abs()
        return table[key % len(table)]

    return widths_fn


def twin_stores(dtype=torch.bfloat16, heads=2, head_dim=128, block=128, batch=3):
    spec = QuantSpec("half_even", "clamp", 1e-5, dtype)
    flat = ChannelGroupStore(batch, heads, head_dim, block, PAGE_TOKENS, dtype, "cpu", spec, True, None,
                             pack_kernel="torch")
    tiered = TieredPagedKeyStore(batch, heads, TieredPageLayout(head_dim, block), dtype, spec, "cpu")
    return flat, tiered, spec


def feed(stores, mix, releases, gen, dtype=torch.bfloat16):
    """Releases of whole blocks (tokens per row each), the same keys into every store; returns every row's keys."""
    flat = stores[0]
    kept = [[] for _ in range(flat.b)]
    for lens in releases:
        x = torch.randn(flat.b, flat.h, max(lens), flat.d, generator=gen) * (1 + 4 * torch.rand(flat.d, generator=gen))
        x = (x + torch.randn(flat.d, generator=gen)).to(dtype)
        for store in stores:
            store.append(Ragged(x, torch.tensor(lens)), widths_by_content(mix))
        for row, n in enumerate(lens):
            kept[row].append(x[row, :, :n])
    return [torch.cat(k, dim=1) for k in kept]  # row -> [H, T, D]


RELEASES = [[256, 128, 0], [128, 0, 384], [0, 128, 128]]  # rows of 3, 2 and 4 blocks, appended unevenly


def read_blocks(store):
    """Every stored block, read from the pool by the layout alone: (row, head, block, perm, counts, page words)."""
    lay, buf = store.tiers, store.buffers()
    hw = lay.header_bytes // 4
    for b in range(store.b):
        for h in range(store.h):
            for k in range(int(buf["lens"][b]) // lay.block):
                base = int(buf["offsets"][b, h, k])
                header = buf["pool"][b, h, base:base + hw].view(torch.uint8)
                counts = header[lay.head_dim:lay.head_dim + 3].tolist()
                pw = lay.page_bytes(counts) // 4
                pages = [buf["pool"][b, h, base + hw + j * pw:base + hw + (j + 1) * pw] for j in range(lay.pages)]
                yield b, h, k, header[:lay.head_dim].long(), counts, header, pages


# ---- the layout ---------------------------------------------------------------------------------------------


def test_block_bytes_follow_from_the_tier_counts():
    lay = TieredPageLayout(128, 128)
    # 3 full-precision channels pad to 16, 20 4-bit to 32, 105 2-bit to 112 (codes to 128: whole words per lane).
    sec = lay.page_sections((3, 20, 105))
    assert [n for _, n in sec.values()] == [32 * 16 * 2, 32 * 32 * 4 // 8, 64, 64, 32 * 128 * 2 // 8, 224, 224]
    assert lay.header_bytes == 128 + 16 and lay.page_bytes((3, 20, 105)) == 3136
    assert lay.block_bytes((3, 20, 105)) == 144 + 4 * 3136
    assert lay.block_bytes((0, 0, 128)) == 144 + 4 * (1024 + 256 + 256)  # all 2-bit: KIVI-2's page key part
    for d in (64, 128):  # every section of every mix starts on 16 bytes
        lay = TieredPageLayout(d, 64)
        for n0 in range(d + 1):
            for n4 in range(d + 1 - n0):
                sections = lay.page_sections((n0, n4, d - n0 - n4)).values()
                assert all(off % 16 == 0 and n % 16 == 0 for off, n in sections)
    with pytest.raises(ValueError, match="head_dim 96.*block 48"):
        TieredPageLayout(96, 48)


def test_blocks_hold_their_permutation_and_tier_counts():
    flat, tiered, _ = twin_stores()
    feed([tiered], "mixed", RELEASES, torch.Generator().manual_seed(1))
    seen = 0
    for _, _, _, perm, counts, header, _ in read_blocks(tiered):
        seen += 1
        assert sorted(perm.tolist()) == list(range(128)) and header[128 + 3:].eq(0).all()
        assert sum(counts) == 128 and all(c > 0 for c in counts)  # the mix draws every tier in a block of 128
        # Channels by tier (full precision, 4-bit, 2-bit), ascending within a tier.
        starts = [0, counts[0], counts[0] + counts[1], 128]
        for t in range(3):
            part = perm[starts[t]:starts[t + 1]].tolist()
            assert part == sorted(part)
    assert seen == 2 * (3 + 2 + 4)


@pytest.mark.parametrize("mix", sorted(MIXES))
@pytest.mark.parametrize("dtype,head_dim", [(torch.bfloat16, 128), (torch.float16, 64)])
def test_tiered_blocks_hold_bit_for_bit_what_the_channel_groups_hold(mix, dtype, head_dim):
    seed = random.randrange(2**31)
    flat, tiered, spec = twin_stores(dtype, head_dim=head_dim)
    keys = feed([flat, tiered], mix, RELEASES, torch.Generator().manual_seed(seed), dtype)
    assert torch.equal(flat.tokens(), tiered.tokens()) and flat.tier_counts == tiered.tier_counts
    # every pool, and so every block, starts 16-byte aligned (the kernel's vector loads)
    assert tiered.pool.shape[2] % 4 == 0 and bool((tiered.offsets % 4 == 0).all())
    for start in (0, 128, 256):  # dequantized tokens, from any block start, bit for bit
        a, b = flat.ragged(start), tiered.ragged(start)
        assert torch.equal(a.lens, b.lens)
        for row, n in enumerate(a.lens.tolist()):
            assert torch.equal(a.data[row, :, :n].view(torch.int16), b.data[row, :, :n].view(torch.int16)), seed
    # Codes, scales and zeros, read from the pool through the layout alone, are quantize()'s and the flat store's.
    lay = tiered.tiers
    for b, h, k, perm, counts, _, pages in read_blocks(tiered):
        x = keys[b][h, k * 128:(k + 1) * 128]  # [P, D]
        starts = [0, counts[0], counts[0] + counts[1]]
        for t, (name, bits) in enumerate((("fp_values", 16), ("k4_codes", 4), ("k2_codes", 2))):
            n = counts[t]
            if not n:
                continue
            c, ch = tier_channels(n), perm[starts[t]:starts[t] + n]
            sec = lay.page_sections(counts)
            for j, page in enumerate(pages):
                words = page[sec[name][0] // 4:]
                xj = x[32 * j:32 * (j + 1), ch]  # [32, n]
                if bits == 16:
                    raw = unpack_tile(words[:16 * c].reshape(2, -1), c, 16, "key").reshape(32, c)
                    assert torch.equal(raw[:, :n], xj.view(torch.int16).long() & 0xFFFF) and raw[:, n:].eq(0).all()
                    continue
                cw = -(-c * bits // 64) * 64 // bits
                nw = cw * bits
                codes = unpack_tile(words[:nw].reshape(2, -1), cw, bits, "key").reshape(32, cw)
                q, s, z = quantize(xj.T, bits, spec)  # groups along the page's 32 tokens
                assert torch.equal(codes[:, :n], q.T.long()) and codes[:, n:].eq(0).all()
                inv = torch.argsort(channel_meta_order(c))
                for i, want in enumerate((s, z)):
                    got = words[nw + i * c // 2:nw + (i + 1) * c // 2].contiguous().view(torch.int16)[inv].view(dtype)
                    assert torch.equal(got[:n], want) and got[n:].eq(0).all()
                    flat_meta = (flat.scale, flat.zero)[i][b, h, k, ch, j]
                    assert torch.equal(got[:n], flat_meta)


def expected_block_bytes(d, counts):
    """A tiered block's bytes, counted section by section from the layout's definition (not its code)."""
    pad = [-(-n // 16) * 16 for n in counts]
    per_page = 32 * pad[0] * 2  # raw 16-bit values
    for n16, bits in zip(pad[1:], (4, 2)):
        words_per_lane = -(-n16 * bits // 64)
        per_page += 2 * 32 * words_per_lane * 4 + 2 * n16 * 2  # two tiles of 32 lanes; scale and zero
    return (d + 16) + 4 * per_page


def test_bits_are_the_channel_groups_bytes_are_what_the_blocks_take():
    flat, tiered, _ = twin_stores()
    feed([flat, tiered], "mixed", RELEASES, torch.Generator().manual_seed(2))
    assert torch.equal(flat.code_bits, tiered.code_bits)  # the paper's measure: 16/4/2 bits per element
    stored = torch.zeros(3, dtype=torch.int64)
    ends = torch.zeros(3, 2, dtype=torch.int64)
    for b, h, k, _, counts, _, _ in read_blocks(tiered):
        n = expected_block_bytes(128, counts)
        stored[b] += n + 8  # and the block's int64 offset
        ends[b, h] = max(int(ends[b, h]), int(tiered.offsets[b, h, k]) * 4 + n)
    assert torch.equal(tiered.live_bytes, stored)
    assert torch.equal(ends, tiered.used * 4)  # the blocks tile each pool, no gap and no overlap
    assert tiered.allocated_bytes() >= int(tiered.live_bytes.sum())


def test_widths_without_a_tier_are_refused():
    _, tiered, _ = twin_stores()
    x = torch.randn(3, 2, 128, 128).to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"widths \[3\]"):
        tiered.append(Ragged(x, torch.tensor([128, 128, 0])), lambda blocks, rows: torch.full((2, 2, 128), 3))


# ---- the kernel's math --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mix", ["fp", "k2", "mixed"])
@pytest.mark.parametrize("gqa", [1, 4, 7])
def test_the_fold_is_exact_on_the_quantized_keys(mix, gqa):
    # Against code * s + z in fp64 (the keys before their rounding to the model dtype): exact up to fp64 sums; the
    # kernel's rounding of q' = q * s to 16 bits and its fp32 sums stay within their own bounds.
    seed = random.randrange(2**31)
    gen = torch.Generator().manual_seed(seed)
    _, tiered, spec = twin_stores()
    keys = feed([tiered], mix, RELEASES, gen)
    widths = widths_by_content(mix)
    query = (torch.randn(3, 2 * gqa, 1, 128, generator=gen) * 2).to(torch.bfloat16)
    exact = tiered_scores(query, tiered.layout(), tiered.buffers())
    rounded = tiered_scores(query, tiered.layout(), tiered.buffers(), kernel_numerics=True)
    for b, x in enumerate(keys):
        n = x.shape[1]
        k64, scale_code = torch.empty(2, n, 128, dtype=torch.float64), torch.zeros(2, n, 128, dtype=torch.float64)
        for blk in range(n // 128):
            xb = x[:, blk * 128:(blk + 1) * 128]  # [H, P, D]
            w = widths(xb[None], torch.tensor([b]))[0]  # [H, D]
            for h in range(2):
                for d in range(128):
                    col = xb[h, :, d]
                    if w[h, d] == 0:
                        k64[h, blk * 128:(blk + 1) * 128, d] = col.double()
                        continue
                    q, s, z = quantize(col.reshape(4, 32), int(w[h, d]), spec)
                    sc = q.double() * s.double()[:, None]
                    k64[h, blk * 128:(blk + 1) * 128, d] = (sc + z.double()[:, None]).reshape(-1)
                    scale_code[h, blk * 128:(blk + 1) * 128, d] = (sc.abs() + z.double().abs()[:, None]).reshape(-1)
        q = query[b, :, 0].double()
        kk = k64.repeat_interleave(gqa, 0)
        want = torch.einsum("hd,htd->ht", q, kk)
        mag = torch.einsum("hd,htd->ht", q.abs(), kk.abs())
        assert torch.allclose(exact[b, :, :n], want, rtol=0, atol=1e-12 * float(mag.max()) + 1e-300), seed
        bound = torch.einsum("hd,htd->ht", q.abs(), scale_code.repeat_interleave(gqa, 0))
        tol = 2 * UNIT[torch.bfloat16] * bound + 256 * 2.0**-24 * (bound + mag)  # q' rounding, fp32 sums
        assert ((rounded[b, :, :n].double() - want).abs() <= tol).all(), seed


MIX_OVERRIDES = {  # MixKVQ's own tiers, pushed to each extreme by the paper's threshold rule
    "fp": ["method.tier_rule=threshold", "method.tau_bf16=1e-9", "method.tau_uint4=1e-9"],
    "k2": ["method.tier_rule=threshold", "method.tau_bf16=1e9", "method.tau_uint4=1e9"],
    "mixed": [],
}


@pytest.mark.parametrize("mix", sorted(MIX_OVERRIDES))
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("gqa", [1, 4, 7])
def test_tiered_scores_are_attention_over_the_dequantized_keys(gqa, head_dim, mix):
    # A MixKVQ layer of odd, unequal rows (sink | tiered store | window): the store's scores from the kernel's math,
    # the window's directly, then softmax; fp64 attention over the reference decoder's tokens is the ground truth.
    seed = random.randrange(2**31)
    gen = torch.Generator().manual_seed(seed)
    dtype = torch.bfloat16
    method = build("mixkvq", MIX_OVERRIDES[mix], kv_heads=2, q_heads=2 * gqa, head_dim=head_dim, dtype=dtype,
                   device="cpu")
    lengths = [301, 250, 141]  # 2, 2 and 1 blocks after 45 steps, and windows of 90, 39 and 58 tokens
    layer = method.new_cache(3, torch.tensor([301 - n for n in lengths])).layers[0]
    to_tiered_pages(layer)
    layer, query = filled_layer_into(layer, method, lengths, 45, gen)
    store = layer.key_stream.store
    counts = store.tier_counts
    if mix == "fp":
        assert set(counts) == {0}
    elif mix == "k2":
        assert set(counts) == {2}
    else:
        assert len(counts) >= 2
    keys, values = stream_tokens(layer, "key_stream"), stream_tokens(layer, "value_stream")
    window = layer.key_stream.window.view()
    scaling = head_dim**-0.5
    want = ground_truth(query, layer, scaling)
    for numerics in (False, True):
        stored = tiered_scores(query, store.layout(), store.buffers(), kernel_numerics=numerics).double()
        for b, n in enumerate(keys.lens.tolist()):
            ns = int(store.tokens()[b])
            q = query[b, :, 0].double()
            k = keys.data[b, :, :n].double().repeat_interleave(gqa, 0)  # [Hq, n, D]
            direct = torch.einsum("hd,htd->ht", q, k)
            mag = torch.einsum("hd,htd->ht", q.abs(), k.abs())
            scores = torch.cat((stored[b, :, :ns], direct[:, ns:]), dim=1)
            assert ns > 0 and n - ns == int(window.lens[b])
            u = UNIT[dtype] * (3 if numerics else 1)  # the keys' rounding to 16 bits; q' = q * s's too
            err = (scores - direct).abs()
            assert (err <= 2 * u * mag + 1e-9).all(), (seed, numerics, float(err.max()))
            if mix == "fp" and not numerics:  # raw values: the same products, only the sums' order differs
                assert (err <= 1e-12 * mag + 1e-300).all(), seed
            p = torch.softmax(scores * scaling, dim=-1)
            v = values.data[b, :, :n].double().repeat_interleave(gqa, 0)
            out = torch.einsum("ht,htd->hd", p, v)
            delta = float(err.max()) * scaling  # logits within delta: probabilities within e^(2 delta) - 1
            tol = math.expm1(2 * delta) * float(v.abs().max()) + 1e-12
            assert torch.allclose(out, want[b, 0], rtol=0, atol=tol), (seed, numerics)


# ---- the conversion -----------------------------------------------------------------------------------------


def test_a_mixkvq_layer_converts_and_says_what_it_holds():
    method = build("mixkvq", [], kv_heads=2, q_heads=8, head_dim=128, dtype=torch.bfloat16, device="cpu")
    layer = method.new_cache(2).layers[0]
    assert tiered_problems(layer) == [] and value_page_problems(layer) == []
    to_tiered_pages(layer)
    ks, vs = layer.key_stream.store, layer.value_stream.store
    assert isinstance(ks, TieredPagedKeyStore) and isinstance(vs, PagedValueStore)
    lay = ks.layout()
    assert lay.format is PackingFormat.TIERED_FRAGMENT_PAGES and lay.tiers == TieredPageLayout(128, 128)
    assert (lay.bits, lay.group, lay.block, lay.read_unit) == (None, 32, 128, 128)
    assert sorted(ks.buffers()) == sorted(lay.buffer_names())
    assert vs.layout().page == FragmentPageLayout(128, None, 2, 32)  # values only: the keys are tiered
    assert vs.pages.layout.page_bytes == 32 * 128 * 2 // 8 + 2 * 32 * 4 * 2
    assert vs.allocated_bytes() == vs.pages.data.numel() * 4  # its own page buffer, counted by itself
    # The fragment kernel cannot read tiered pages; the tiered one can, on a CUDA device (chosen by name only), and
    # `auto` on CPU stays the reference.
    assert fragment.supports(layer) is not None
    assert tiered_kernel.supports(layer) == "the cache is not on a CUDA device"
    assert resolve_decode_kernel("auto", torch.device("cpu"), layer) is reference_decode
    with pytest.raises(ConfigError, match="cuda-tiered.*not on a CUDA device"):
        resolve_decode_kernel("cuda-tiered", torch.device("cpu"), layer)
    kivi = build("kivi", [], kv_heads=2, q_heads=8, head_dim=128, dtype=torch.bfloat16, device="cpu").new_cache(1)
    assert "mixed-width" in tiered_kernel.supports(kivi.layers[0])
    v3 = build("mixkvq", ["method.value_bits=3"], kv_heads=2, q_heads=8, head_dim=128, dtype=torch.bfloat16,
               device="cpu").new_cache(1)
    assert "value width 3" in tiered_kernel.supports(v3.layers[0])


def test_layers_the_tiered_pages_cannot_hold_are_named():
    for name, overrides, dtype, head_dim, why in [
        ("kivi", [], torch.bfloat16, 128, "mixed-width"),
        ("mixkvq", ["method.key_group_size=64"], torch.bfloat16, 128, "key group 64"),
        ("mixkvq", ["method.residual_length=48", "method.key_group_size=16"], torch.bfloat16, 128, "block 48"),
        ("mixkvq", [], torch.float32, 128, "model dtype"),
        ("mixkvq", [], torch.bfloat16, 96, "head_dim 96"),
    ]:
        method = build(name, overrides, kv_heads=2, q_heads=8, head_dim=head_dim, dtype=dtype, device="cpu")
        layer = method.new_cache(1).layers[0]
        assert any(why in p for p in tiered_problems(layer)), (name, overrides, tiered_problems(layer))
    # Values that do not fit fragment pages stay where they are; the keys still convert.
    method = build("mixkvq", ["method.value_bits=3"], kv_heads=2, q_heads=8, head_dim=128, dtype=torch.bfloat16,
                   device="cpu")
    layer = method.new_cache(1).layers[0]
    assert any("value width 3" in p for p in value_page_problems(layer))
    to_tiered_pages(layer)
    assert isinstance(layer.key_stream.store, TieredPagedKeyStore)
    assert type(layer.value_stream.store) is TokenGroupStore


def test_greedy_generation_is_the_same_with_tiered_pages():
    # Bit-identical tokens in the stores: the reference decoder attends over the same inputs, so every step is the same.
    model = tiny_model("llama", dtype=torch.bfloat16, q_heads=8, kv_heads=2, head_dim=64, seed=3)
    ids, mask = left_pad(random_prompts([150, 97], seed=5))
    runs = [generate(model, build("mixkvq", [], model=model), ids, mask, layout=layout, max_new_tokens=140)
            for layout in (None, to_tiered_pages)]  # fresh layers converted, as a kernel's `prepare` would
    (a, flat), (b, tiered) = runs
    assert torch.equal(a, b)
    for lf, lt in zip(flat.layers, tiered.layers):
        assert isinstance(lt.key_stream.store, TieredPagedKeyStore)
        assert isinstance(lt.value_stream.store, PagedValueStore)
        assert int(lt.key_stream.store.tokens().min()) >= 128 and len(lt.key_stream.store.tier_counts) >= 2
        for stream in ("key_stream", "value_stream"):
            assert torch.equal(getattr(lf, stream).code_bits(), getattr(lt, stream).code_bits())
        assert torch.equal(lf.value_stream.live_bytes(), lt.value_stream.live_bytes())
