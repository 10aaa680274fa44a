"""MixKVQ's tiered-block CUDA kernel on a GPU (skipped without one): fp64 ground truth and the registry.

The layers are filled as tests/test_fragment_kernel.py fills KIVI's (a left-padded prefill, decode steps that flush
key blocks, then one query), with MixKVQ's keys in tiered blocks and its values in values-only fragment pages. The
kernel folds scales into its operands, so bf16 outputs are held to the fragment kernel's SQNR against fp64
(`test_fragment_kernel.MIN_SQNR_DB`, where the figures behind it are).
"""

from __future__ import annotations

import pytest
import torch

from kernels import kernels_in_use, resolve_decode_kernel, tiered
from test_fragment_kernel import check as check_kernel
from tiny import build, generate, left_pad, random_prompts, tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

# Mixes from mostly 2-bit keys to many full-precision channels, and 4-bit values.
CASES = {"c2.5": [], "c3.4": ["method.target_bits=3.4"], "c6": ["method.target_bits=6"],
         "v4": ["method.value_bits=4", "method.target_bits=4"]}


def check(overrides, **kw):
    return check_kernel("mixkvq", overrides, kernel=tiered, decode=tiered.tiered_decode, **kw)


def page_bytes(layer) -> set[int]:
    """Key page sizes of the layer's stored blocks."""
    store = layer.key_stream.store
    counts = store.block_tier_counts()[store.block_tier_counts().sum(-1) > 0]  # [blocks, 3]
    return set(store.layout().tiers.page_bytes(tuple(counts.unbind(-1))).tolist())


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_mix_matches_the_ground_truth(case):
    layer = check(CASES[case])
    assert int(layer.key_stream.store.tokens().max()) >= 256
    # Pages up to the cap stream through the kernel's ring, larger ones are read in place: both paths are checked.
    if case in ("c2.5", "c6"):
        above = max(page_bytes(layer)) > tiered.ring_key_cap(layer.dim)
        assert above == (case == "c6"), (case, sorted(page_bytes(layer)))


@pytest.mark.parametrize("gqa,head_dim,dtype", [(1, 64, torch.bfloat16), (4, 128, torch.float16),
                                                (8, 128, torch.bfloat16), (7, 64, torch.float16)])
def test_gqa_ratios_head_dims_and_dtypes(gqa, head_dim, dtype):
    check([], gqa=gqa, head_dim=head_dim, dtype=dtype, steps=20)


@pytest.mark.parametrize("lengths,steps", [((1,), 0), ((129,), 3), ((5, 4000, 129, 31), 7), ((2049,), 130)])
def test_odd_lengths_and_rows_of_different_lengths(lengths, steps):
    check([], lengths=lengths, steps=steps, gqa=4)


def test_auto_binds_it_and_generation_matches_the_reference_decoder():
    model = tiny_model("qwen2", dtype=torch.bfloat16, q_heads=8, kv_heads=2, head_dim=128).to("cuda")
    ids, mask = left_pad([p.cuda() for p in random_prompts([20, 161, 90], seed=3)])
    long = {"max_new_tokens": 200, "min_new_tokens": 200}
    ref, _ = generate(model, build("mixkvq", model=model), ids, mask, decode_kernel="torch", **long)
    out, cache = generate(model, build("mixkvq", model=model), ids, mask, decode_kernel="cuda-tiered", **long)
    assert kernels_in_use(cache.layers) == "cuda-tiered"
    assert int(cache.layers[0].key_stream.store.tokens().min()) >= 128
    # Greedy tokens part at the first near-tie (the kernel rounds differently): most of each row agrees.
    agree = (out[:, ids.shape[1]:] == ref[:, ids.shape[1]:]).float().mean().item()
    assert agree >= 0.5, f"greedy tokens agree with the reference decoder's at {agree:.1%} of steps"
    auto = resolve_decode_kernel("auto", torch.device("cuda"), build("mixkvq", model=model).new_cache(1).layers[0])
    assert auto is tiered.decode_attention  # `auto` picks it for MixKVQ's tiered blocks


def test_steps_replayed_from_graphs_give_the_eager_tokens():
    from test_graphs import eager_and_graphed

    model = tiny_model("qwen2", dtype=torch.bfloat16, layers=2, q_heads=8, kv_heads=2, head_dim=128).cuda()
    (want, off, _), (got, counts, _) = eager_and_graphed(
        model, "mixkvq", ["method.residual_length=32"], [45, 38, 50], 11, "cuda-tiered", 64)
    assert off is None and counts is not None and torch.equal(got, want)
    assert counts.replayed >= 30 and counts.released_outside >= 3, counts  # block flushes made after steps
