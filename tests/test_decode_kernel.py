"""The fused Triton decode kernel against an fp64 ground truth over the same dequantized tokens.

On CPU the kernel runs in the Triton interpreter (conftest sets TRITON_INTERPRET=1 when there is no GPU); the
marked GPU tests run the same checks on CUDA. Every store format of every method is driven step by step on real
cache layers: a left-padded prefill (rows of different lengths), then decode steps that flush key blocks and
slide value windows, then one query. Inputs are random on every run; the seed is in the failure message.

Tolerances: fp32 models, max |error| <= 1e-4 · max |reference| (only summation order differs); bf16 models,
SQNR >= 35 dB (the interpreter truncates bf16 casts instead of rounding them, and the output is bf16).
"""

from __future__ import annotations

import random

import pytest
import torch

from kernels import decode
from kernels.reference import stream_tokens
from mixkvq.kv.quantizer import QuantSpec
from method_cases import PMKVQ_NO_ARTIFACT as PMKVQ
from tiny import build, generate, left_pad, random_prompts, tiny_model

FORMAT_CASES = {  # every store format and code width the kernel reads
    "kivi-2": ("kivi", []),
    "kivi-4-g64": ("kivi4", ["method.group_size=64"]),
    "kivi-k3v8": ("kivi", ["method.k_bits=3", "method.v_bits=8"]),
    # no residual (Table 1/3 rows): 32-token key blocks, every value quantized
    "kivi-no-residual": ("kivi", ["method.residual_length=0"]),
    "kivi-token-keys-channel-values": ("kivi", ["method.key_axis=token", "method.value_axis=channel",
                                                "method.value_window=flush", "method.k_bits=4"]),
    "mixkvq": ("mixkvq", []),
    "mixkvq-sink-sliding": ("mixkvq", ["method.sink_tokens=32", "method.value_window=sliding"]),
    "bf16": ("bf16", []),
    "kvmix-k3v4-g32": ("kvmix", ["method.layer_bits={key:[3],value:[4]}", "method.key3_format=g32"]),
    "kvmix-k2v2": ("kvmix", ["method.layer_bits={key:[2],value:[2]}"]),
    # the repo's 3-bit keys: 11-token blocks and groups, 11 codes per int32 (a 32-token tile spans several blocks)
    "kvmix-k3v4": ("kvmix", ["method.layer_bits={key:[3],value:[4]}"]),
    # progressive per-token stores, a width per row: at the default lengths rows end at 4, 8 and 16 bits
    "pmkvq": ("pmkvq", [*PMKVQ, "method.max_len=1300"]),
}


def filled_layer(method, *, lengths, steps, gen, device):
    """One cache layer after a left-padded prefill of `lengths` and `steps` decode steps, plus a fresh query."""
    s = method.shape
    width = max(lengths)
    pad = torch.tensor([width - n for n in lengths])
    layer = method.new_cache(len(lengths), pad).layers[0]

    def rand(*shape):
        # Per-channel offsets and scales, as real keys have (outlier channels make MixKVQ pick mixed tiers).
        x = torch.randn(*shape, generator=gen) * (1 + 3 * torch.rand(shape[-1], generator=gen))
        return (x + torch.randn(shape[-1], generator=gen)).to(s.dtype).to(device)

    for t in [width] + [1] * steps:
        layer.update(rand(len(lengths), s.kv_heads, t, s.head_dim), rand(len(lengths), s.kv_heads, t, s.head_dim))
        layer.observe_queries(rand(len(lengths), s.q_heads, t, s.head_dim))
        layer.after_attention()
    return layer, rand(len(lengths), s.q_heads, 1, s.head_dim)


def ground_truth(query, layer, scaling):
    """fp64 softmax attention over each row's dequantized tokens, GQA by index (query head i -> KV head i // g)."""
    keys, values = stream_tokens(layer, "key_stream"), stream_tokens(layer, "value_stream")
    assert torch.equal(keys.lens, values.lens)
    g = query.shape[1] // keys.data.shape[1]
    out = torch.empty(query.shape[0], 1, query.shape[1], query.shape[3], dtype=torch.float64)
    for b, n in enumerate(keys.lens.tolist()):
        k = keys.data[b, :, :n].double().cpu().repeat_interleave(g, 0)
        v = values.data[b, :, :n].double().cpu().repeat_interleave(g, 0)
        p = torch.softmax(query[b, :, 0].double().cpu()[:, None] @ k.transpose(1, 2) * scaling, dim=-1)
        out[b, 0] = (p @ v)[:, 0]
    return out


def check(name, overrides, *, gqa=4, head_dim=128, dtype=torch.float32, storage="packed", num_splits=None,
          lengths=(301, 250, 77), steps=45, device="cpu", lean=None):
    seed = random.randrange(2**31)
    gen = torch.Generator().manual_seed(seed)
    kv_heads = 2
    method = build(name, overrides, kv_heads=kv_heads, q_heads=kv_heads * gqa, head_dim=head_dim, dtype=dtype,
                   device=device, storage=storage)
    layer, query = filled_layer(method, lengths=list(lengths), steps=steps, gen=gen, device=device)
    assert decode.supports(layer) is None
    compare(name, layer, query, seed, num_splits=num_splits, lean=lean)
    return layer


def compare(name, layer, query, seed, num_splits=None, lean=None, tuning=decode.DEFAULT_TUNING):
    """The fused kernel's output for `query` against the fp64 ground truth, at the tolerances of the module doc."""
    bsz, _, _, head_dim = query.shape
    dtype, scaling = query.dtype, head_dim**-0.5
    poisoned = torch.full((bsz, 1, query.shape[1], head_dim), float("nan"), dtype=dtype, device=query.device)
    got = decode.fused_decode(query, layer, scaling, num_splits=num_splits, out=poisoned, lean=lean, tuning=tuning)
    assert got.data_ptr() == poisoned.data_ptr()
    assert torch.isfinite(got).all(), f"unwritten or non-finite outputs (seed {seed})"
    want = ground_truth(query, layer, scaling)
    err = (got.double().cpu() - want)
    if dtype == torch.float32:
        rel = float(err.abs().max() / want.abs().max())
        assert rel <= 1e-4, f"{name}: max relative error {rel:.2e} (seed {seed})"
    else:
        sqnr = float(10 * torch.log10(want.pow(2).sum() / err.pow(2).sum()))
        assert sqnr >= 35, f"{name}: SQNR {sqnr:.1f} dB (seed {seed})"


@pytest.mark.parametrize("case", sorted(FORMAT_CASES))
def test_every_store_format_matches_the_ground_truth(case):
    name, overrides = FORMAT_CASES[case]
    layer = check(name, overrides)
    store = layer.key_stream.store
    if store is not None:  # the stores really hold quantized blocks, not only windows
        assert int(store.tokens().max()) >= 256


@pytest.mark.parametrize("gqa,head_dim", [(1, 64), (4, 128), (7, 128), (7, 64)])
@pytest.mark.parametrize("case", ["kivi-2", "mixkvq"])
def test_gqa_ratios_and_head_dims(case, gqa, head_dim):
    name, overrides = FORMAT_CASES[case]
    check(name, overrides, gqa=gqa, head_dim=head_dim, steps=20)


@pytest.mark.parametrize("case", ["kivi-2", "mixkvq", "kivi-token-keys-channel-values"])
def test_bf16_models(case):
    name, overrides = FORMAT_CASES[case]
    check(name, overrides, dtype=torch.bfloat16, gqa=7, steps=20)


@pytest.mark.parametrize("case", ["kivi-2", "mixkvq-sink-sliding", "kvmix-k2v2"])
def test_whole_tiles_in_their_own_kernel(case):
    """The two-kernel form (whole tiles, then sink and the rest as one more split) gives the same answer."""
    name, overrides = FORMAT_CASES[case]
    check(name, overrides, lean=True, steps=10, num_splits=2)


def test_tuning_is_a_value_passed_to_the_launch():
    """Settings travel with the call (no module state): a tuning that sends whole tiles to their own kernel gives
    the same answer, and its warps and register caps reach the launches it plans."""
    method = build("kivi", [], kv_heads=2, q_heads=8, head_dim=128, dtype=torch.float32, device="cpu")
    layer, query = filled_layer(method, lengths=[301, 250], steps=5, gen=torch.Generator().manual_seed(0),
                                device="cpu")
    tuning = decode.TritonTuning(lean_min_tiles=0, num_warps=2, max_registers=96)
    plan = decode.split_plan(query, layer, 128**-0.5, tuning=tuning)
    assert [kw["PART"] for _, kw in plan.launches] == [1, 2]
    assert all(kw["num_warps"] == 2 for _, kw in plan.launches)
    assert "maxnreg" not in plan.launches[0][1] and plan.launches[1][1]["maxnreg"] == 96
    default = decode.split_plan(query, layer, 128**-0.5)
    assert [kw["PART"] for _, kw in default.launches] == [0] and decode.DEFAULT_TUNING.lean_min_tiles > 1000
    compare("kivi, whole tiles by tuning", layer, query, 0, tuning=decode.TritonTuning(lean_min_tiles=0))


@pytest.mark.parametrize("num_splits", [1, 3, 17])
def test_split_counts_merge_to_the_same_answer(num_splits):
    check("mixkvq", FORMAT_CASES["mixkvq"][1], num_splits=num_splits, steps=10)


@pytest.mark.parametrize("case", ["kivi-2", "mixkvq-sink-sliding", "kvmix-k3v4", "pmkvq"])
def test_fake_storage_is_read_as_dense_tokens(case):
    name, overrides = FORMAT_CASES[case]
    check(name, overrides, storage="fake", steps=10)


def test_rows_shorter_than_a_tile_and_one_token_rows():
    check("kivi", [], lengths=(5, 1, 33), steps=3)


def pmkvq_rows_at_their_own_widths(dtype, device):
    """PM-KVQ rows at 2, 16 and 4 bits after the layer's own budget shrinks, then after a shrink between calls."""
    seed = random.randrange(2**31)
    gen = torch.Generator().manual_seed(seed)
    method = build("pmkvq", [*PMKVQ, "method.max_len=512"], kv_heads=2, q_heads=8, head_dim=128, dtype=dtype,
                   device=device)
    # 250, 60 and 150 tokens against a budget of 512 tokens at 2 bits: row 0 went 16 -> 8 -> 4 -> 2 (its blocks were
    # written at the width of their time, then shifted), row 1 is still at 16 bits, row 2 at 4.
    layer, query = filled_layer(method, lengths=[230, 40, 130], steps=20, gen=gen, device=device)
    stores = (layer.key_stream.store, layer.value_stream.store)
    for st in stores:
        assert st.packed and st.row_bits.tolist() == [2, 16, 4] and st.tokens().tolist() == [224, 32, 128]
        assert st.codes.data.shape[-1] == 128 * 16 // 32  # the widest row's words; narrower rows use a prefix
    assert decode.supports(layer) is None
    compare("pmkvq", layer, query, seed)
    # Widths travel with every call: shrink rows 1 and 2 once more (the container narrows to 8-bit words).
    for st in stores:
        st.shrink(torch.tensor([1, 2]), "equivalent")
        assert st.row_bits.tolist() == [2, 8, 2] and st.codes.data.shape[-1] == 128 * 8 // 32
    compare("pmkvq after a shrink", layer, query, seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pmkvq_rows_are_read_at_their_own_widths(dtype):
    pmkvq_rows_at_their_own_widths(dtype, "cpu")


def test_pmkvq_and_kvmix_layouts_take_the_generic_path():
    from kernels import resolve_decode_kernel

    shape = dict(kv_heads=2, q_heads=4, head_dim=128, dtype=torch.float32, device="cpu")
    cases = {  # what the key and value stores of each layer are read as
        "kvmix-k3v4": (dict(FMT=1, PACK11=True, P=11, G=11, BITS=3, FAST=False), dict(FMT=2, BITS=4, FAST=True)),
        "pmkvq": (dict(FMT=2, ROW_BITS=True, FAST=False), dict(FMT=2, ROW_BITS=True, FAST=False)),
    }
    for case, wants in cases.items():
        name, overrides = FORMAT_CASES[case]
        layer = build(name, overrides, **shape).new_cache(1).layers[0]
        assert decode.supports(layer) is None
        assert resolve_decode_kernel("auto", torch.device("cuda"), layer) is decode.decode_attention
        for stream, want in zip((layer.key_stream, layer.value_stream), wants):
            store = stream.store
            _, consts = decode._store_args(store.layout(), store.buffers(), stream.window.data)
            assert consts.items() >= want.items(), (case, consts)
    store = build("kivi", [], **shape).new_cache(1).layers[0].key_stream.store
    _, consts = decode._store_args(store.layout(), store.buffers(), None)
    assert consts["FAST"] is True and not consts["PACK11"] and not consts["ROW_BITS"]


def test_layouts_without_a_kernel_format_are_refused_by_name():
    from baselines.pmkvq_store import ProgressiveTokenStore
    from mixkvq.kv.layout import Layout, PackingFormat
    from mixkvq.kv.storage import ChannelGroupStore, TokenGroupStore

    spec = QuantSpec("half_even", "clamp", 1e-5, torch.float32)
    args = dict(batch=1, heads=2, dim=128, dtype=torch.float32, device="cpu", spec=spec, packed=True)

    class PagedTokens(TokenGroupStore):  # the kernel goes by the layout a store answers, not by its class
        def layout(self):
            return Layout(PackingFormat.FRAGMENT_PAGES, bits=2, group=128)

    stores = {
        "11-codes-per-word 3-bit layout in a mixed-width": ChannelGroupStore(**args, block=33, group=11,
                                                                             uniform_width=None, pack11=True),
        "mixed-width channel block 48": ChannelGroupStore(**args, block=48, group=16, uniform_width=None),
        "per-row token widths [3]": ProgressiveTokenStore(**args, group=128, bits=3),
        "layout fragment_pages has no reader": PagedTokens(**args, group=128, bits=2),
    }
    for why, store in stores.items():
        layer = build("mixkvq", [], kv_heads=2, q_heads=4, head_dim=128, dtype=torch.float32,
                      device="cpu").new_cache(1).layers[0]
        layer.key_stream.store = store
        assert why in (decode.supports(layer) or ""), (why, decode.supports(layer))


def test_kernels_that_cannot_read_a_layer_say_why():
    from kernels import resolve_decode_kernel
    from mixkvq.errors import ConfigError

    method = build("kivi", ["method.k_bits=2"], kv_heads=2, q_heads=4, head_dim=96, dtype=torch.float32,
                   device="cpu")
    layer = method.new_cache(1).layers[0]
    assert "head_dim 96" in decode.supports(layer)
    with pytest.raises(ConfigError, match="head_dim 96"):
        resolve_decode_kernel("triton", torch.device("cuda"), layer)
    with pytest.warns(UserWarning, match="head_dim 96"):
        assert resolve_decode_kernel("auto", torch.device("cuda"), layer) is resolve_decode_kernel("torch", None)


def test_a_run_names_the_kernels_its_layers_resolved_to():
    from kernels import kernels_in_use, resolve_decode_kernel

    layers = [build("kivi", [], kv_heads=2, q_heads=4, head_dim=hd, dtype=torch.float32,
                    device="cpu").new_cache(1).layers[0] for hd in (128, 96)]
    with pytest.warns(UserWarning, match="head_dim 96"):
        for layer in layers:
            layer.decode_fn = resolve_decode_kernel("auto", torch.device("cuda"), layer)
    assert kernels_in_use(layers) == "torch+triton"  # the 96-wide layer fell back
    assert kernels_in_use(layers[:1]) == "triton" and kernels_in_use([]) == "none"


GENERATE_CASES = {  # method overrides, prompt lengths and new tokens for the generate equality tests (no artifacts)
    # row 0 flushes its first key block on decode step 6 and reads it for four steps
    "mixkvq": ([], [122, 140], 10),
    "kvmix": (["method.layer_bits={key:[3],value:[4]}"], [110, 140], 12),  # the repo's 11-per-word 3-bit keys
    "pmkvq": ([*PMKVQ, "method.max_len=400"], [110, 140], 12),  # both rows at 4 bits after prefill, row 1 shrinks to 2
}


@pytest.mark.parametrize("name", sorted(GENERATE_CASES))
def test_generate_gives_the_same_tokens_with_the_fused_kernel(name):
    # Short, because the interpreter is slow: row 0 flushes its first key block during decode, row 1 at prefill.
    model = tiny_model("qwen2", q_heads=8, kv_heads=2, layers=1)
    overrides, lengths, new_tokens = GENERATE_CASES[name]
    ids, mask = left_pad(random_prompts(lengths, seed=7))
    method = build(name, overrides, model=model)
    gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    fused, cache = generate(model, method, ids, mask, decode_kernel="triton", **gen)
    ref, _ = generate(model, method, ids, mask, decode_kernel="torch", **gen)
    assert all(layer.decode_fn is decode.decode_attention for layer in cache.layers)
    assert torch.equal(fused, ref)
    if name == "mixkvq":
        assert cache.layers[0].key_stream.store.tokens().tolist() == [128, 128]
    if name == "pmkvq":
        assert cache.layers[0].beta.tolist() == [4, 2]


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("case", sorted(FORMAT_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_store_format_on_cuda(case, dtype):
    name, overrides = FORMAT_CASES[case]
    check(name, overrides, dtype=dtype, gqa=7, device="cuda", lengths=(1500, 977, 64), steps=200)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pmkvq_rows_are_read_at_their_own_widths_on_cuda(dtype):
    pmkvq_rows_at_their_own_widths(dtype, "cuda")


CUDA_GENERATE_CASES = {
    "kivi": [], "kivi4": [], "mixkvq": [],
    "kvmix": ["method.layer_bits={key:[3,2],value:[4,2]}"],  # two layers: the repo's 3-bit keys, then 2-bit
    "pmkvq": [*PMKVQ, "method.max_len=1024"],  # rows end at 4, 2 and 4 bits (no budget stop)
}


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("name", sorted(CUDA_GENERATE_CASES))
def test_generate_gives_the_same_tokens_with_the_fused_kernel_on_cuda(name):
    # fp32, so that only the summation order differs (bf16 greedy on a random model flips near-ties; the real-model
    # check in bf16 is scripts/gpu_kernel_equality.py)
    model = tiny_model("qwen2", dtype=torch.float32, q_heads=14, kv_heads=2, head_dim=128).to("cuda")
    ids, mask = left_pad([p.cuda() for p in random_prompts([20, 161, 90], seed=3)])
    method = build(name, CUDA_GENERATE_CASES[name], model=model)
    fused, cache = generate(model, method, ids, mask, decode_kernel="triton", max_new_tokens=300,
                            min_new_tokens=300)
    ref, _ = generate(model, method, ids, mask, decode_kernel="torch", max_new_tokens=300, min_new_tokens=300)
    assert all(layer.decode_fn is decode.decode_attention for layer in cache.layers)
    assert torch.equal(fused, ref)
    if name == "pmkvq":
        assert cache.layers[0].beta.tolist() == [4, 2, 4]


@pytest.mark.parametrize("name", ["kivi", "mixkvq"])
def test_synthetic_fill_leaves_the_state_a_prefill_leaves(name):
    from mixkvq.kv.synthetic import fill_cache

    context, shape = 700, dict(kv_heads=2, q_heads=4, head_dim=64, dtype=torch.float32, device="cpu")
    method = build(name, FORMAT_CASES["mixkvq" if name == "mixkvq" else "kivi-2"][1], **shape)
    filled = method.new_cache(2)
    fill_cache(filled, context, q_heads=4, chunk=256)
    prefilled = method.new_cache(2).layers[0]
    kv = torch.randn(2, 2, context, 64)
    prefilled.update(kv, kv)
    prefilled.observe_queries(torch.randn(2, 4, context, 64))
    prefilled.after_attention()
    layer = filled.layers[0]
    for a, b in ((layer.key_stream, prefilled.key_stream), (layer.value_stream, prefilled.value_stream)):
        assert torch.equal(a.tokens(), torch.full((2,), context))
        assert torch.equal(a.store.tokens(), b.store.tokens()) and torch.equal(a.window.lens, b.window.lens)
    assert layer.get_seq_length() == context and not layer.is_prefill
    if name == "kivi":  # uniform widths: the bytes depend on the lengths only
        assert torch.equal(layer.live_bytes(), prefilled.live_bytes())
