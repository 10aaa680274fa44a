"""Triton quantize-and-pack kernels (kernels/pack.py) against `quantize` + `pack`, bit for bit.

On CPU the kernels run in the Triton interpreter (conftest sets TRITON_INTERPRET without a GPU); the same checks
run compiled on CUDA when one is present. Random inputs every run (seed in every failure message). Destinations
are poisoned first, so an element the kernel fails to write, or one it writes outside its range, fails the test.
"""

from __future__ import annotations

import os
import random

import pytest
import torch

from mixkvq.kv.quantizer import DEGENERATE, ROUNDINGS, QuantSpec, _round, pack, quantize, words_for
from mixkvq.kv.ragged import Ragged, RaggedBuffer
from mixkvq.kv.storage import FULL_PRECISION, ChannelGroupStore, TokenGroupStore
import kernels.pack as pk
from tiny import build, generate, left_pad, random_prompts, tiny_model

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not INTERPRET, reason="CPU runs need TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        INTERPRET or not torch.cuda.is_available(), reason="needs a CUDA device (compiled kernels)")]),
]
SEED = random.randrange(2**31)
SENTINEL = 0x5A5A5A5A
BITS = (2, 3, 4, 8)
SPECS = [(r, d) for r in ROUNDINGS for d in DEGENERATE]
METAS = [None, torch.float16, torch.bfloat16, torch.float32]  # None: the model dtype
MODEL_DTYPES = [torch.bfloat16, torch.float16, torch.float32]
TOKEN_LAYOUTS = [(64, 32), (64, 64), (128, 32), (128, 128)]  # (D, G)


def token_cases():
    # Every bits x rounding x degenerate pair once; meta dtype, model dtype and layout rotate across them.
    for i, bits in enumerate(BITS):
        for j, (rounding, degenerate) in enumerate(SPECS):
            meta, dtype, (d, g) = METAS[(i + j) % 4], MODEL_DTYPES[(i + 2 * j) % 3], TOKEN_LAYOUTS[(2 * i + j) % 4]
            meta_name = str(meta)[6:] if meta else "model"
            name = f"b{bits}-{rounding}-{degenerate}-meta_{meta_name}-{str(dtype)[6:]}-D{d}G{g}"
            yield pytest.param(bits, QuantSpec(rounding, degenerate, 1e-6, meta or dtype), dtype, d, g, id=name)


def as_bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def assert_same_bits(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, f"seed {SEED}: {what}: {got.dtype}{got.shape}"
    diff = as_bits(got) != as_bits(want)
    assert not bool(diff.any()), f"seed {SEED}: {what}: {int(diff.sum())} elements differ, first at {diff.nonzero()[0]}"


def poisoned(shape, dtype, device) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype, device=device)
    as_bits(t).fill_(SENTINEL & ((1 << (8 * t.element_size() - 1)) - 1))
    return t


def token_inputs(gen, shape, group, bits, dtype) -> torch.Tensor:
    """Random tokens with per-token offsets and spreads, one constant group and one group of rounding ties."""
    n, h, t, d = shape
    x = torch.randn(*shape, generator=gen) * torch.rand(n, h, t, 1, generator=gen) * 4
    x = (x + torch.randn(n, h, t, 1, generator=gen) * 3).reshape(n, h, t, d // group, group)
    x[0, 0, 0, 0] = 2.5  # constant: clamp gives s = min_scale, unit_scale s = 1
    levels = (1 << bits) - 1  # s = 1, zero 0: codes land exactly on .5 (and just below it)
    ties = torch.tensor([0.0, levels, 0.5, 1.5, 2.5, 0.49999997])
    x[-1, -1, -1, -1] = 1.0
    x[-1, -1, -1, -1, : len(ties)] = ties
    return x.reshape(shape).to(dtype)


def reference_tokens(x, bits, group, spec):
    lead = x.shape[:3]
    codes, scale, zero = quantize(x.reshape(*lead, -1, group), bits, spec)
    return pack(codes.reshape(*lead, -1), bits), scale, zero


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits,spec,dtype,d,g", list(token_cases()))
def test_token_kernel_writes_quantize_pack_bits_at_each_rows_offset(device, bits, spec, dtype, d, g):
    gen = torch.Generator().manual_seed(SEED + bits * 131 + d + g)
    n, h, t = 3, 2, 3  # odd token count; rows write 3, 0 and 2 tokens at different offsets
    x = token_inputs(gen, (n, h, t, d), g, bits, dtype)
    counts = torch.tensor([3, 0, 2])[torch.randperm(n, generator=gen)]
    starts = torch.randint(0, 5, (n,), generator=gen)
    cap = int((starts + counts).max()) + 2
    nw, ng = words_for(d, bits), d // g
    codes, scale, zero = (poisoned((n, h, cap, w), dt, device)
                          for w, dt in ((nw, torch.int32), (ng, spec.meta_dtype), (ng, spec.meta_dtype)))
    want = [buf.clone() for buf in (codes, scale, zero)]
    ref = reference_tokens(x, bits, g, spec)
    for b in range(n):
        s, c = int(starts[b]), int(counts[b])
        for w, r in zip(want, ref):
            w[b, :, s:s + c] = r[b, :, :c].to(device)
    pk.quantize_pack_tokens_into(x.to(device), bits, g, spec, codes, scale, zero, starts.to(device),
                                 counts.to(device))
    for got, w, what in zip((codes, scale, zero), want, ("codes", "scale", "zero")):
        assert_same_bits(got, w, what)


def test_tie_group_exercises_both_roundings():
    # The tie group of token_inputs codes differently under the two roundings, so the cases above can tell them
    # apart.
    x = token_inputs(torch.Generator().manual_seed(SEED), (1, 1, 1, 32), 32, 2, torch.float32)
    even, away = (quantize(x, 2, QuantSpec(r, "clamp", 1e-6, torch.float32))[0] for r in ROUNDINGS)
    assert not torch.equal(even, away)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", BITS)
def test_allocating_token_launcher_matches_quantize_pack(device, bits):
    gen = torch.Generator().manual_seed(SEED + bits)
    rounding, degenerate = SPECS[bits % 4]
    spec = QuantSpec(rounding, degenerate, 1e-6, torch.bfloat16)
    x = token_inputs(gen, (2, 1, 7, 64), 32, bits, torch.bfloat16)
    got = pk.quantize_pack_tokens(x.to(device), bits, 32, spec, tile_elements=256)  # 7 tokens span several programs
    for g, w, what in zip(got, reference_tokens(x, bits, 32, spec), ("codes", "scale", "zero")):
        assert_same_bits(g.cpu(), w, what)


TORCH_DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])]


@pytest.mark.parametrize("device", TORCH_DEVICES)
@pytest.mark.parametrize("bits", BITS)
def test_quantize_divides_correctly_rounded_on_every_device(device, bits):
    """s = (hi - lo) / levels and the codes come from IEEE divisions on every device, so CPU, CUDA and the pack
    kernels store the same bits. ATen computes `tensor / number` on CUDA as a product with the fp32 reciprocal,
    which misses the correctly rounded quotient in a third (2 bits) to 70% (8 bits) of the scales."""
    gen = torch.Generator().manual_seed(SEED + bits)
    spec = QuantSpec("half_even", "clamp", 1e-6, torch.float32)
    x = token_inputs(gen, (4, 2, 64, 128), 32, bits, torch.float32)
    codes, scale, zero = quantize(x.to(device).reshape(4, 2, 64, 4, 32), bits, spec)
    groups = x.reshape(4, 2, 64, 4, 32)
    lo, hi = groups.amin(-1), groups.amax(-1)
    levels = (1 << bits) - 1
    # fp64 quotient of the fp32 operands, rounded once to fp32: the correctly rounded fp32 division.
    want = ((hi - lo).double() / levels).float().clamp_min(spec.min_scale)
    assert_same_bits(scale.cpu(), want, "scale")
    q = ((groups - lo[..., None]).double() / want.double()[..., None]).float()  # IEEE fp32 (x - m) / s
    assert_same_bits(codes.cpu(), _round(q, "half_even").clamp_(0, levels).to(torch.uint8), "codes")
    # Reciprocal products really differ from that here, so this test can tell the two apart.
    recip = ((hi - lo) * (torch.tensor(1.0) / levels)).clamp_min(spec.min_scale)
    assert not torch.equal(recip, want), f"seed {SEED}"


# ---- stores: kernel writes against the PyTorch writes, from identically poisoned buffers ----------------------


def store_state(store) -> dict[str, torch.Tensor]:
    out = {}
    for name, value in vars(store).items():
        if isinstance(value, RaggedBuffer):
            out[f"{name}.data"], out[f"{name}.lens"] = value.data, value.lens
        elif isinstance(value, torch.Tensor):
            out[name] = value
    return out


def assert_same_stores(got, want) -> None:
    a, b = store_state(got), store_state(want)
    assert a.keys() == b.keys()
    for name in a:
        assert_same_bits(a[name].cpu(), b[name].cpu(), name)


def backend(on: bool) -> str:
    """The stores' `pack_kernel`: the Triton kernels (on) or the PyTorch path."""
    return "triton" if on else "torch"


CHANNEL_CASES = [  # (width or None for mixed, D, P, G, model dtype, meta dtype, rounding, degenerate)
    (2, 64, 128, 32, torch.bfloat16, torch.bfloat16, "half_even", "clamp"),
    (3, 64, 128, 64, torch.float16, torch.float32, "half_away", "unit_scale"),
    (4, 128, 64, 64, torch.float32, torch.float16, "half_even", "unit_scale"),
    (8, 64, 128, 128, torch.bfloat16, torch.float16, "half_away", "clamp"),
    (None, 64, 64, 32, torch.bfloat16, torch.bfloat16, "half_even", "clamp"),
    (None, 64, 64, 32, torch.float32, torch.bfloat16, "half_away", "unit_scale"),
]


def channel_store(device, width, d, p, g, dtype, spec, pack_kernel) -> ChannelGroupStore:
    st = ChannelGroupStore(3, 2, d, p, g, dtype, device, spec, True, width, pack_kernel=pack_kernel)
    # Capacity for every append below, so the kernel writes into poison rather than into fresh zeros.
    st.pool = poisoned((3, 2, 3 * d * p), torch.int32, device)
    st.scale = poisoned((3, 2, 3, d, p // g), spec.meta_dtype, device)
    st.zero = poisoned((3, 2, 3, d, p // g), spec.meta_dtype, device)
    return st


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("width,d,p,g,dtype,meta,rounding,degenerate", CHANNEL_CASES,
                         ids=[f"w{c[0] or 'mixed'}-D{c[1]}P{c[2]}G{c[3]}-{str(c[4])[6:]}" for c in CHANNEL_CASES])
def test_channel_block_kernel_writes_what_the_pytorch_path_writes(device, width, d, p, g, dtype, meta, rounding,
                                                                  degenerate):
    spec = QuantSpec(rounding, degenerate, 1e-6, meta)
    gen = torch.Generator().manual_seed(SEED + d + p + g)
    x = torch.randn(3, 2, 2 * p, d, generator=gen) * torch.rand(3, 2, 1, d, generator=gen) * 4
    x = (x + torch.randn(3, 2, 1, d, generator=gen)).to(dtype)
    x[0, 0, :g, 0] = 1.75  # a constant group
    tiers = torch.tensor([FULL_PRECISION, 2, 3, 4, 8], dtype=torch.uint8)

    def widths_fn(blocks, rows):  # the same random widths for both runs (same calls in the same order)
        wgen = torch.Generator().manual_seed(SEED + int(rows.sum()) + 7 * len(rows))
        return tiers[torch.randint(0, 5, (len(rows), 2, d), generator=wgen)].to(blocks.device)

    stores = []
    for on in (False, True):
        st = channel_store(device, width, d, p, g, dtype, spec, backend(on))
        st.append(Ragged(x.to(device), torch.tensor([p, 0, 2 * p])), widths_fn)  # rows of 1, 0 and 2 blocks
        st.append(Ragged(x[:, :, :p].to(device), torch.tensor([p, p, 0])), widths_fn)
        stores.append(st)
    if width is None:
        assert set(stores[1].widths.unique().tolist()) == set(tiers.tolist())
    assert_same_stores(stores[1], stores[0])


@pytest.mark.parametrize("device", DEVICES)
def test_channel_launcher_with_block_starts_lays_channels_out_like_the_store(device):
    # word_base [N, H] (block starts) instead of per-channel offsets: channel d at start + d * words_for(P, w).
    spec = QuantSpec("half_away", "clamp", 1e-6, torch.bfloat16)
    x = (torch.randn(3, 2, 128, 64, generator=torch.Generator().manual_seed(SEED)) * 2).to(torch.bfloat16)
    want = channel_store(device, 4, 64, 64, 32, torch.bfloat16, spec, "torch")
    want.append(Ragged(x.to(device), torch.tensor([64, 0, 128])), None)
    got = channel_store(device, 4, 64, 64, 32, torch.bfloat16, spec, "torch")
    rows, slots = torch.tensor([0, 2, 2], device=device), torch.tensor([0, 0, 1], device=device)
    blocks = x.reshape(3, 2, 2, 64, 64)[rows.cpu(), :, slots.cpu()].to(device)
    starts = (slots * 64 * words_for(64, 4))[:, None].expand(3, 2)
    pk.quantize_pack_channel_blocks(blocks, 4, 32, spec, got.pool, got.scale, got.zero, rows, slots, starts)
    for name in ("pool", "scale", "zero"):
        assert_same_bits(getattr(got, name).cpu(), getattr(want, name).cpu(), name)


@pytest.mark.parametrize("device", DEVICES)
def test_token_store_append_of_equal_rows_matches_the_pytorch_path(device):
    # Equal rows (samples of one prompt) take the launch without per-row index tensors.
    gen = torch.Generator().manual_seed(SEED + 1)
    spec = QuantSpec("half_away", "unit_scale", 1e-6, torch.float16)
    x = token_inputs(gen, (2, 2, 3, 64), 64, 3, torch.bfloat16).to(device)
    stores = []
    for on in (False, True):
        st = TokenGroupStore(2, 2, 64, 64, 3, torch.bfloat16, device, spec, True, backend(on))
        for buf in (st.codes, st.scale, st.zero):
            buf.data = poisoned((2, 2, 8, buf.data.shape[3]), buf.data.dtype, device)
        for n in (3, 1, 2):
            st.append(Ragged(x[:, :, :n], torch.full((2,), n)))
        stores.append(st)
    assert_same_stores(stores[1], stores[0])


@pytest.mark.parametrize("device", DEVICES)
def test_token_store_append_matches_the_pytorch_path(device):
    gen = torch.Generator().manual_seed(SEED)
    bits = BITS[int(torch.randint(0, 4, (1,), generator=gen))]
    spec = QuantSpec("half_even", "clamp", 1e-6, torch.bfloat16)
    x = token_inputs(gen, (3, 2, 5, 64), 32, bits, torch.bfloat16).to(device)
    stores = []
    for on in (False, True):
        st = TokenGroupStore(3, 2, 64, 32, bits, torch.bfloat16, device, spec, True, backend(on))
        for buf in (st.codes, st.scale, st.zero):  # room for the first append only: the second one grows
            buf.data = poisoned((3, 2, 8, buf.data.shape[3]), buf.data.dtype, device)
        st.append(Ragged(x, torch.tensor([5, 0, 3])))
        st.append(Ragged(x[:, :, 1:], torch.tensor([4, 3, 0])))
        st.append(Ragged(x[:, :, :1], torch.tensor([0, 0, 0])))
        assert st.codes.data.shape[2] > 8
        stores.append(st)
    assert_same_stores(stores[1], stores[0])


# ---- the whole cache: generate with kernel writes gives the same tokens and cache contents ----------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["kivi", "mixkvq"])
def test_generate_with_kernel_writes_gives_the_same_cache(device, name):
    model = tiny_model("llama", dtype=torch.bfloat16, layers=1).to(device)
    ids, mask = left_pad([p.to(device) for p in random_prompts([45, 29], seed=SEED % 1000)])
    # R = 32 so that keys flush blocks and (KIVI) the value window slides within a few steps.
    runs = []
    for on in (False, True):
        method = build(name, ["method.residual_length=32", f"quant.pack_kernel={backend(on)}"], model=model,
                       storage="packed")
        # The Triton decode kernel keeps the flat stores the pack kernels write (the CUDA kernel moves KIVI into
        # fragment pages, which write their own codes).
        runs.append(generate(model, method, ids, mask, decode_kernel="triton" if device == "cuda" else "auto",
                             max_new_tokens=8))
    (want, want_cache), (got, got_cache) = runs
    assert got_cache.layers[0].key_stream.store.pack_kernel == "triton"  # the config reached the stores
    assert torch.equal(got, want), f"seed {SEED}"
    for gl, wl in zip(got_cache.layers, want_cache.layers):
        for stream in ("key_stream", "value_stream"):
            gs, ws = getattr(gl, stream).store, getattr(wl, stream).store
            assert int(ws.tokens().min()) > 0  # the store really holds tokens in every row
            assert_same_stores(gs, ws)


def test_the_pack_kernel_is_a_config_value_checked_before_work_and_out_of_older_runs_identity():
    from omegaconf import OmegaConf

    from mixkvq.config import load_config
    from mixkvq.errors import ConfigError
    from mixkvq.eval.preflight import check_cache_config
    from mixkvq.runs.results import config_hash

    cfg = load_config([])
    assert cfg.quant.pack_kernel == "auto"
    older = OmegaConf.to_container(cfg, resolve=True)
    del older["quant"]["pack_kernel"]  # a run written before the option existed
    assert config_hash(cfg) == config_hash(older)
    assert config_hash(load_config(["quant.pack_kernel=torch"])) != config_hash(cfg)
    with pytest.raises(ConfigError, match=r"quant.pack_kernel='on'.*'auto', 'triton', 'torch'"):
        check_cache_config(load_config(["quant.pack_kernel=on"]))
    with pytest.raises(ConfigError, match=r"pack_kernel='off'"):
        TokenGroupStore(1, 1, 64, 32, 2, torch.float32, "cpu", QuantSpec("half_even", "clamp", 1e-6, torch.float32),
                        True, "off")
    method = build("kivi", ["quant.pack_kernel=torch"], kv_heads=2, q_heads=4, head_dim=64)
    layer = method.new_cache(1).layers[0]
    assert {s.store.pack_kernel for s in (layer.key_stream, layer.value_stream)} == {"torch"}


# ---- one token per row into fragment pages (KIVI's sliding value window on the CUDA kernel's pages) --------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits,d,g,meta", [(2, 128, 32, torch.bfloat16), (4, 64, 64, torch.float16),
                                           (2, 64, 32, torch.float16), (4, 128, 128, torch.bfloat16)])
def test_value_page_writes_match_the_pytorch_path(device, bits, d, g, meta):
    """`PagedValueStore.append` (rows of different lengths, one token per row, a group per row) through the kernel
    and through PyTorch: the same pages, bit for bit, with rows at different positions in their pages (and across a
    page boundary) and every page byte compared."""
    from mixkvq.kv.layout import PAGE_TOKENS, FragmentPageLayout
    from mixkvq.kv.paged import FragmentPages, PagedValueStore

    spec = QuantSpec("half_even", "clamp", 1e-6, meta)
    layout = FragmentPageLayout(d, None, bits, g)
    stores = []
    for on in (False, True):
        st = PagedValueStore(FragmentPages(3, 2, layout, device), 3, 2, g, bits, meta, spec, backend(on))
        st.reserve(3 * PAGE_TOKENS)  # (a group write past it reserves more)
        gen = torch.Generator().manual_seed(SEED + bits + d)  # the same tokens for both paths
        # rows start at different counts (host appends), then take one-token steps through the page boundary
        first = token_inputs(gen, (3, 2, 40, d), g, bits, meta).to(device)
        st.append(Ragged(first, torch.tensor([30, 3, 17])))
        for _ in range(6):
            x = token_inputs(gen, (3, 2, 1, d), g, bits, meta).to(device)
            st.append(Ragged(x, torch.ones(3, dtype=torch.int64), 1))
        # then a group of tokens released by every row at once (KVmix's value groups)
        st.append(Ragged(token_inputs(gen, (3, 2, 32, d), g, bits, meta).to(device), torch.full((3,), 32), 32))
        stores.append(st)
    torch_path, kernel_path = stores
    assert kernel_path.pack_kernel == "triton" and torch_path.pack_kernel == "torch"
    assert torch.equal(kernel_path.pages.data, torch_path.pages.data), f"seed {SEED}"
    assert torch.equal(kernel_path.device_count, torch_path.device_count)
    assert torch.equal(kernel_path.count, torch.tensor([68, 41, 55]))


# ---- key blocks into fragment pages (KIVI's and KVmix's 2/4-bit key flushes on the CUDA kernel's pages) ---------


def key_inputs(gen, shape, bits, dtype) -> torch.Tensor:
    """Keys with per-channel offsets and spreads (a group is a channel's 32 tokens of a page), one constant group
    and one group of rounding ties."""
    b, h, t, d = shape
    x = torch.randn(*shape, generator=gen) * torch.rand(d, generator=gen) * 4 + torch.randn(d, generator=gen) * 3
    x[0, 0, :32, 5] = 2.5  # constant
    levels = (1 << bits) - 1  # min 0, max levels: scale 1, codes on .5 exactly
    ties = torch.tensor([0.0, levels, 0.5, 1.5, 2.5, 0.49999997])
    x[-1, -1, 32:64, 7] = 1.0
    x[-1, -1, 32:32 + len(ties), 7] = ties
    return x.to(dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits,d,meta", [(2, 128, torch.bfloat16), (4, 64, torch.float16), (2, 64, torch.float16),
                                         (4, 128, torch.bfloat16), (3, 128, torch.bfloat16)])
def test_key_page_writes_match_the_pytorch_path(device, bits, d, meta):
    """`PagedKeyStore.append` through the kernel and through PyTorch: the same pages, bit for bit, for rows in
    lockstep (a prefill's blocks, then a decode step's) and for rows releasing different numbers of blocks."""
    from mixkvq.kv.layout import FragmentPageLayout, page_container
    from mixkvq.kv.paged import FragmentPages, PagedKeyStore

    spec = QuantSpec("half_even", "clamp", 1e-6, meta)
    layout = FragmentPageLayout(d, page_container(bits), 2, 32)  # 3-bit codes: in the 4-bit format's slots
    block = 64
    stores = []
    for on in (False, True):
        st = PagedKeyStore(FragmentPages(3, 2, layout, device), 3, 2, block, bits, meta, spec, backend(on))
        gen = torch.Generator().manual_seed(SEED + bits + d)  # the same keys for both paths
        for lens in ([2 * block] * 3, [block] * 3, [block, 0, 3 * block], [0, 2 * block, block]):
            x = key_inputs(gen, (3, 2, max(lens), d), bits, meta).to(device)
            n = torch.tensor(lens)
            st.append(Ragged(x, n, lens[0] if len(set(lens)) == 1 else None))
        stores.append(st)
    torch_path, kernel_path = stores
    assert kernel_path.pack_kernel == "triton" and torch_path.pack_kernel == "torch"
    assert torch.equal(kernel_path.nblocks, torch.tensor([4, 5, 7]))
    assert torch.equal(kernel_path.pages.data, torch_path.pages.data), f"seed {SEED}"
    assert torch.equal(kernel_path.device_count, torch_path.device_count)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,overrides", [("kivi", ["method.residual_length=32"]),
                                            ("kvmix", ["method.layer_bits={key:[2],value:[2]}"])])
def test_generate_on_fragment_pages_with_kernel_writes_gives_the_same_pages(device, name, overrides):
    """The CUDA kernel's page layout written by the pack kernels (key blocks, value tokens and groups) and by
    PyTorch: the same tokens and the same pages, read here by the reference decoder."""
    from mixkvq.kv.paged import page_problems, to_pages

    def paged(layer):
        assert not page_problems(layer), page_problems(layer)
        to_pages(layer)

    model = tiny_model("llama", dtype=torch.bfloat16, layers=1).to(device)
    ids, mask = left_pad([p.to(device) for p in random_prompts([45, 29], seed=SEED % 1000)])
    runs = [generate(model, build(name, [f"quant.pack_kernel={backend(on)}", *overrides], model=model), ids, mask,
                     decode_kernel="torch", layout=paged, max_new_tokens=40) for on in (False, True)]
    (want, want_cache), (got, got_cache) = runs
    assert got_cache.layers[0].key_stream.store.pack_kernel == "triton"
    assert torch.equal(got, want), f"seed {SEED}"
    for gl, wl in zip(got_cache.layers, want_cache.layers):
        assert int(wl.key_stream.store.tokens().min()) > 0 and int(wl.value_stream.store.tokens().min()) > 0
        assert torch.equal(gl.key_stream.store.pages.data, wl.key_stream.store.pages.data), f"seed {SEED}"
        assert torch.equal(gl.key_stream.store.device_count, wl.key_stream.store.device_count)
        assert torch.equal(gl.value_stream.store.device_count, wl.value_stream.store.device_count)


def test_page_kernels_compile_for_hopper():
    """The page-write kernels compiled ahead of time for sm_90 by Triton's own ptxas, no GPU needed (the interpreter
    above checks their bits, this that the compiler takes them: tl.gather, an early return). In a process of its own:
    under TRITON_INTERPRET the kernels are not compilable objects."""
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    here = Path(__file__).parent
    proc = subprocess.run([sys.executable, str(here / "pack_compile.py")], env=env, capture_output=True, text=True,
                          timeout=600, cwd=here.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["keys-lockstep", "keys-table-3bit", "tokens", "tokens-lens"], proc.stdout
