"""Fragment pages on CPU: the permutation, the packer and the paged stores against the stores they replace.

The paged stores must hold exactly what the flat stores hold (codes, scales, zeros, hence dequantized tokens and
the reference decoder's output), count the same bits and bytes, and follow the method's flush timing.
"""

from __future__ import annotations

import random

import pytest
import torch

from kernels import decode, fragment, resolve_decode_kernel
from kernels.reference import decode_attention as reference_decode
from mixkvq.kv.layout import (PAGE_TOKENS, FragmentPageLayout, PackingFormat, channel_meta_order, code_order,
                           pack_tile, register_element, token_meta_order, unpack_tile)
from mixkvq.kv.paged import PagedKeyStore, PagedValueStore, page_problems, to_pages
from mixkvq.kv.ragged import Ragged
from test_decode_kernel import ground_truth
from tiny import build


@pytest.mark.parametrize("kind", ["key", "value"])
@pytest.mark.parametrize("head_dim,bits", [(64, 2), (64, 4), (128, 2), (128, 4)])
def test_code_order_is_a_bijection_onto_the_tile(head_dim, bits, kind):
    order = code_order(head_dim, bits, kind)
    flat = order[..., 0] * head_dim + order[..., 1]
    assert sorted(flat.reshape(-1).tolist()) == list(range(16 * head_dim))


def test_code_order_follows_the_mma_fragments():
    # Lane 5 (g=1, t=1), register 3 holds rows 9 and columns 2t+8+{0,1} = 10, 11 of its 16x16 tile.
    assert register_element(5, 3, 0) == (9, 10) and register_element(5, 3, 1) == (9, 11)
    order = code_order(128, 2, "key")  # 2-bit: 8 registers per word, so word 0's j=5 is k-step 1, register 1
    assert order[5, 0, 5, 0].tolist() == [9, 16 + 2]  # key tiles: row = token, column = channel
    order = code_order(128, 2, "value")
    assert order[5, 0, 5, 0].tolist() == [2, 16 + 9]  # value tiles: row = channel, column = token


@pytest.mark.parametrize("head_dim,bits", [(64, 2), (128, 4)])
def test_pack_and_unpack_tiles_round_trip(head_dim, bits):
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 1 << bits, (3, 2, 16, head_dim), generator=gen)
    for kind in ("key", "value"):
        words = pack_tile(codes, bits, kind)
        assert words.dtype == torch.int32 and words.shape[-1] == 32 * head_dim * bits // 64
        assert torch.equal(unpack_tile(words, head_dim, bits, kind), codes)


def test_meta_orders_are_permutations():
    assert sorted(channel_meta_order(128).tolist()) == list(range(128))
    assert sorted(token_meta_order(4).tolist()) == list(range(32 * 4))
    # Quad t=1 reads channels 2, 3, 10, 11 for k-step 0: its query fragment's rows.
    assert channel_meta_order(128)[32:36].tolist() == [2, 3, 10, 11]


def test_page_layout_sizes_match_the_formats_bits():
    lay = FragmentPageLayout(128, 2, 2, 32)
    assert lay.page_bytes == 3072  # 0.375 bytes per element of K and V: 2-bit codes, bf16 scale+zero per 32
    assert lay.key_bytes() == 1024 + 512 and lay.value_bytes_per_token() * PAGE_TOKENS == 1024 + 512
    with pytest.raises(ValueError, match="head_dim 96"):
        FragmentPageLayout(96, 2, 2, 32)


KIVI_CASES = {
    "kivi-2": ("kivi", []),
    "kivi-4": ("kivi4", []),
    "kivi-2-r64": ("kivi", ["method.residual_length=64"]),
    "k3v2": ("kivi", ["method.k_bits=3"]),  # 3-bit key codes in the 4-bit page format's slots
}


def _twin_layers(name, overrides, dtype, head_dim, gqa, lengths, steps, seed):
    """The same token stream through a flat layer and a paged one (same seed, same tokens)."""
    out = []
    for paged in (False, True):
        gen = torch.Generator().manual_seed(seed)
        method = build(name, overrides, kv_heads=2, q_heads=2 * gqa, head_dim=head_dim, dtype=dtype, device="cpu")
        layer, query = _filled(method, lengths, steps, gen, paged)
        out.append((layer, query))
    return out


def _filled(method, lengths, steps, gen, paged):
    width = max(lengths)
    pad = torch.tensor([width - n for n in lengths])
    layer = method.new_cache(len(lengths), pad).layers[0]
    if paged:
        assert page_problems(layer) == []
        to_pages(layer)
    layer2, query = filled_layer_into(layer, method, lengths, steps, gen)
    return layer2, query


def filled_layer_into(layer, method, lengths, steps, gen):
    s = method.shape

    def rand(*shape):
        x = torch.randn(*shape, generator=gen) * (1 + 3 * torch.rand(shape[-1], generator=gen))
        return (x + torch.randn(shape[-1], generator=gen)).to(s.dtype)

    for t in [max(lengths)] + [1] * steps:
        layer.update(rand(len(lengths), s.kv_heads, t, s.head_dim), rand(len(lengths), s.kv_heads, t, s.head_dim))
        layer.observe_queries(rand(len(lengths), s.q_heads, t, s.head_dim))
        layer.after_attention()
    return layer, rand(len(lengths), s.q_heads, 1, s.head_dim)


@pytest.mark.parametrize("lengths", [[301, 250, 77], [260, 260]], ids=["ragged", "equal"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", sorted(KIVI_CASES))
def test_paged_stores_hold_exactly_what_the_flat_stores_hold(case, dtype, lengths):
    # Equal rows take the value store's one-token path on every decode step (one position for every row).
    name, overrides = KIVI_CASES[case]
    seed = random.randrange(2**31)
    (flat, q), (paged, q2) = _twin_layers(name, overrides, dtype, 128, 4, lengths, 75, seed)
    assert torch.equal(q, q2)
    assert isinstance(paged.key_stream.store, PagedKeyStore) and isinstance(paged.value_stream.store, PagedValueStore)
    for stream in ("key_stream", "value_stream"):
        a, b = getattr(flat, stream), getattr(paged, stream)
        assert torch.equal(a.store.tokens(), b.store.tokens()), f"{stream} (seed {seed})"
        ra, rb = a.store.ragged(), b.store.ragged()
        assert torch.equal(ra.lens, rb.lens)
        for row, n in enumerate(ra.lens.tolist()):  # bit for bit: same codes, scales and zeros
            assert torch.equal(ra.data[row, :, :n], rb.data[row, :, :n]), f"{stream} row {row} (seed {seed})"
        assert torch.equal(a.code_bits(), b.code_bits())
        if stream == "key_stream" and b.store.slot_bits != b.store.bits:  # the page format's slots are wider
            assert bool((b.live_bytes() > a.live_bytes()).any()) and bool((b.live_bytes() >= a.live_bytes()).all())
        else:
            assert torch.equal(a.live_bytes(), b.live_bytes())
    assert int(paged.key_stream.store.tokens().max()) >= 256  # several flushed blocks, the value window slid
    # The reference decoder's inputs (stream_tokens) are the same, so attention over them is too.
    assert torch.equal(ground_truth(q, flat, 128**-0.5), ground_truth(q, paged, 128**-0.5))


def test_kvmix_layers_are_all_on_pages_with_plain_3_bit_keys():
    """KVmix's 2-bit layers and, with `key3_format=g32`, its 3-bit ones: keys in pages of the 4-bit format, the bits
    accounting at 3 bits per code."""
    method = build("kvmix", ["method.layer_bits={key:[3,2],value:[4,2]}", "method.key3_format=g32"], kv_heads=2,
                   q_heads=8, head_dim=128, dtype=torch.bfloat16, device="cpu", layers=2)
    cache = method.new_cache(1)
    for layer, (key_bits, slot_bits) in zip(cache.layers, [(3, 4), (2, 2)]):
        assert page_problems(layer) == []
        to_pages(layer)
        store = layer.key_stream.store
        assert (store.bits, store.slot_bits, store.layout().page.key_bits) == (key_bits, slot_bits, slot_bits)


def test_paged_value_store_reads_from_any_start():
    seed = random.randrange(2**31)
    (_, _), (paged, _) = _twin_layers("kivi", [], torch.bfloat16, 64, 2, [100, 40], 70, seed)
    vs = paged.value_stream.store
    whole = vs.ragged()
    for start in (0, 32, 64):
        part = vs.ragged(start)
        assert torch.equal(part.lens, (whole.lens - start).clamp_min(0))
        for row, n in enumerate(part.lens.tolist()):
            assert torch.equal(part.data[row, :, :n], whole.data[row, :, start:start + n])


def test_layers_the_pages_cannot_hold_are_named():
    for name, overrides, why in [
        ("kivi", ["method.k_bits=8"], "width 8"),
        ("kvmix", ["method.layer_bits={key:[3],value:[4]}"], "one packed width"),  # 11 codes per word
        ("mixkvq", [], "one packed width"),
        ("kivi", ["method.group_size=64"], "per-channel groups of 32"),
    ]:
        method = build(name, overrides, kv_heads=2, q_heads=8, head_dim=128, dtype=torch.bfloat16, device="cpu")
        layer = method.new_cache(1).layers[0]
        assert any(why in p for p in page_problems(layer)), (name, overrides, page_problems(layer))
    method = build("kivi", [], kv_heads=2, q_heads=8, head_dim=128, dtype=torch.float32, device="cpu")
    assert any("model dtype" in p for p in page_problems(method.new_cache(1).layers[0]))


def test_layout_is_data_the_kernel_reads():
    method = build("kivi", [], kv_heads=2, q_heads=8, head_dim=128, dtype=torch.bfloat16, device="cpu")
    layer = method.new_cache(2).layers[0]
    to_pages(layer)
    lay = layer.key_stream.store.layout()
    assert lay.format is PackingFormat.FRAGMENT_PAGES and lay.page == FragmentPageLayout(128, 2, 2, 32)
    assert layer.value_stream.store.layout().page is lay.page
    kb, vb = (s.store.buffers() for s in (layer.key_stream, layer.value_stream))
    assert kb.keys() == vb.keys() == set(lay.buffer_names()) and kb["pages"] is vb["pages"]  # one page buffer


def test_the_cuda_kernel_is_not_picked_on_cpu_and_says_why():
    method = build("kivi", [], kv_heads=2, q_heads=8, head_dim=128, dtype=torch.bfloat16, device="cpu")
    layer = method.new_cache(1).layers[0]
    assert "CUDA" in fragment.supports(layer)
    fn = resolve_decode_kernel("auto", torch.device("cpu"), layer)
    assert fn is reference_decode and type(layer.key_stream.store).__name__ == "ChannelGroupStore"


def test_a_cache_filled_before_it_is_bound_is_declined_with_a_warning():
    """The page kernels lay out a cache when bound; one that holds tokens already (a script that fills, then binds)
    falls to the Triton kernel, which `auto` says instead of picking it silently."""
    from mixkvq.kv.synthetic import fill_layer

    method = build("kivi", [], kv_heads=2, q_heads=8, head_dim=128, dtype=torch.bfloat16, device="cpu")
    fresh, filled = (method.new_cache(2).layers[0] for _ in range(2))
    fill_layer(filled, 64, 8, torch.Generator().manual_seed(0))
    assert fragment.supports(fresh) != fragment.FILLED_BEFORE_BIND
    assert fragment.supports(filled) == fragment.FILLED_BEFORE_BIND
    with pytest.warns(UserWarning, match="bind a cache before its first tokens"):
        fn = resolve_decode_kernel("auto", torch.device("cuda"), filled)
    assert fn is decode.decode_attention


@pytest.mark.skipif(fragment.nvcc_path() is None, reason="no CUDA compiler (pip install -e '.[test]' brings one)")
def test_the_kernel_compiles_for_hopper_without_spills(tmp_path):
    cubin, report = fragment.compile_offline(tmp_path)
    assert cubin.stat().st_size > 0
    entries = [chunk for chunk in report.split("Compiling entry function")[1:]]
    assert len(entries) == len(fragment.OFFLINE_KERNELS) + len(fragment.OFFLINE_TIERED_KERNELS) + 1
    for chunk in entries:
        assert "0 bytes spill stores" in chunk, chunk
        regs = int(chunk.split("Used ")[1].split(" registers")[0])
        assert regs <= 168, chunk  # three CTAs of 128 threads per SM


@pytest.mark.parametrize("name,overrides,formats", [
    ("kivi", [], ("CHANNEL_GROUPS", "TOKEN_GROUPS")),
    ("mixkvq", [], ("CHANNEL_GROUPS", "TOKEN_GROUPS")),
    ("pmkvq", ["method.allocation=uniform", "method.reparameterize=false"], ("ROW_WIDTH_TOKEN_GROUPS",) * 2),
    ("kivi", ["storage=fake"], ("DENSE", "DENSE")),
])
def test_every_store_describes_its_layout(name, overrides, formats):
    method = build(name, overrides, kv_heads=2, q_heads=8, head_dim=128, dtype=torch.bfloat16, device="cpu",
                   storage="fake" if "storage=fake" in overrides else "packed")
    layer = method.new_cache(1).layers[0]
    got = tuple(s.store.layout().format.name for s in (layer.key_stream, layer.value_stream))
    assert got == formats
    for store in (layer.key_stream.store, layer.value_stream.store):  # the tensors the layout names, no others
        assert sorted(store.buffers()) == sorted(store.layout().buffer_names())
    if name == "kivi" and formats[0] == "CHANNEL_GROUPS":
        lay = layer.key_stream.store.layout()
        assert (lay.bits, lay.group, lay.block, lay.pack11) == (2, 32, 128, False)
    if name == "mixkvq":
        assert layer.key_stream.store.layout().bits is None  # widths mixed per block and channel


def test_more_query_heads_per_kv_head_than_the_kernel_holds_are_named():
    method = build("kivi", [], kv_heads=1, q_heads=16, head_dim=128, dtype=torch.bfloat16, device="cpu")
    layer = method.new_cache(1).layers[0]
    layer.query_groups = 16
    assert "16 query heads per KV head" in fragment.supports(layer)


def test_key_pages_written_in_lockstep_hold_the_general_paths_words():
    # Rows with as many blocks as each other write one range of pages by slices; forced onto the general path (its
    # per-block indices), a twin store must hold the same words, scales and zeros in every page.
    stores = []
    for lockstep in (True, False):
        method = build("kivi", [], kv_heads=2, q_heads=8, head_dim=128, dtype=torch.bfloat16, device="cpu")
        layer = method.new_cache(3).layers[0]
        to_pages(layer)
        store = layer.key_stream.store
        store._lockstep = lockstep
        gen = torch.Generator().manual_seed(7)
        for n in (2 * store.block, store.block):  # a prefill's two blocks, then one released by a decode step
            x = (torch.randn(3, 2, n, 128, generator=gen) * 3).to(torch.bfloat16)
            store.append(Ragged(x, torch.full((3,), n), n))
            store._lockstep = store._lockstep and lockstep
        stores.append(store)
    a, b = stores
    assert int(a.count.min()) == 3 * a.block and torch.equal(a.count, b.count) and torch.equal(a.nblocks, b.nblocks)
    assert torch.equal(a.pages.data, b.pages.data) and torch.equal(a.device_count, b.device_count)
