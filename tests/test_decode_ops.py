"""Tensor ops of the cache's own work per layer and decode step, counted on CPU (mixkvq/kv/op_count.py): each would be a
kernel launch (or, on host-side lengths, a dispatcher round trip) on a GPU, where a decode step is bound by them.

Every method of the matrix runs prefill + decode through `generate` the way run.py does (a cache reserved for
prompt + new tokens), with equal rows (samples of one prompt) and with left-padded rows of different lengths, and
each (layer, step) of ordinary decode steps and of flush steps must stay within its budget. The budgets are what
the cache achieves: a change that adds ops per step fails here.
"""

from __future__ import annotations

import pytest
import torch

from method_cases import METHOD_CASES
from mixkvq.kv.attention import bind
from mixkvq.kv.op_count import CacheOpCounter, launches
from mixkvq.kv.paged import to_pages
from tiny import generate_dynamic, left_pad, random_prompts, tiny_model

# Prompt lengths and decode steps per row set. Every row's first R=128 key block is flushed during decode, a few
# steps in (the prompts end just short of 128), so few ordinary steps pass before the events: equal rows run on to
# their second flush (at 256 tokens, the costlier one: the store already holds a block); ragged rows each flush
# their first block at a different step while the others hold one (the costliest flush), PM-KVQ shrinks rows, and
# the value windows slide. The worst steps of each kind cost what they cost with 100/100 and 60/100/37-token prompts
# over 170 steps, but for KVmix, whose costliest step (the first read of the prefill's groups) depends on the prompt
# length.
ROWS = {"equal": [124, 124], "ragged": [84, 124, 61]}
NEW = {"equal": 136, "ragged": 71}  # decode steps: the last flush, and the step after it that reads it

# Largest ops per (layer, step), cache work only (update, query observer, decode reference less its SDPA, window
# release, step statistics; the last layer also records the step's totals): decode = ordinary steps (nothing
# leaves a window, or one token per row from a sliding window), flush = a step that moves a block into a store or
# rewrites one, the step after it and the first decode step (where the reference decoder reads the new tokens).
# Most of a flush is quantizing and packing (mixkvq/kv/storage.py, kernels/pack.py on a GPU).
# The counts are deterministic for a given torch; a flush's also depend on how many code widths a MixKVQ block uses.
# Every store write ends by copying the store's counts to the device (one op per store written: a CUDA graph's
# replayed steps read them there).
BUDGETS = {  # method -> rows -> (decode, flush)
    # two window copies (keys, values) and their lengths; the last layer adds the step's totals
    "bf16": {"equal": (11, 11), "ragged": (11, 11)},
    # + the value window's slide: one token quantized and packed into the store, read back by the reference
    # (rows of one length flush in lockstep: the key store writes its blocks by slices, flat or on pages)
    "kivi": {"equal": (84, 140), "ragged": (157, 283)},
    "kivi4": {"equal": (84, 140), "ragged": (157, 283)},
    # the value token written at each row's device count (a CUDA graph replays it): a few index ops more
    "kivi-paged": {"equal": (94, 150), "ragged": (153, 243)},
    # + |Q| into MixKVQ's importance; KVmix and PM-KVQ release whole groups and blocks only
    "kvmix": {"equal": (30, 180), "ragged": (30, 360)},
    "mixkvq": {"equal": (20, 295), "ragged": (20, 359)},
    # (PM-KVQ's flushes also copy the stores' counts to the device, for replayed steps)
    "pmkvq": {"equal": (18, 319), "ragged": (18, 483)},
}


@pytest.fixture(scope="module")
def model():
    return tiny_model("qwen2", dtype=torch.bfloat16, q_heads=8, kv_heads=2)


def run_counted(model, method, rows: str, paged: bool = False):
    """(counter, cache) of one generate call over the prompts of `rows`."""
    if rows == "equal":
        ids = torch.stack(random_prompts(ROWS[rows], seed=3))
        mask = torch.ones_like(ids)
    else:
        ids, mask = left_pad(random_prompts(ROWS[rows], seed=3))
    cache = method.new_cache(len(ids), (mask == 0).sum(dim=1), capacity=ids.shape[1] + NEW[rows])
    if paged:  # the CUDA kernel's layout, read here by the reference decoder
        for layer in cache.layers:
            to_pages(layer)
    with bind(model, cache, "torch"), torch.no_grad(), CacheOpCounter() as counter:
        model.generate(ids, attention_mask=mask, past_key_values=cache, pad_token_id=0, do_sample=False,
                       max_new_tokens=NEW[rows], min_new_tokens=NEW[rows])
    return counter, cache


CASES = [*sorted(METHOD_CASES), "kivi-paged"]


@pytest.mark.parametrize("rows", sorted(ROWS))
@pytest.mark.parametrize("name", CASES)
def test_cache_ops_per_layer_and_step_stay_within_budget(model, name, rows):
    case = METHOD_CASES[name.removesuffix("-paged")]
    counter, cache = run_counted(model, case.build(model), rows, paged=name.endswith("-paged"))
    kinds = counter.by_kind()
    assert len(kinds["decode"]) >= NEW[rows]  # most steps are ordinary
    decode, flush = BUDGETS[name][rows]
    worst = {kind: max(kinds.get(kind, []), key=lambda r: r.total, default=None) for kind in ("decode", "flush")}
    for kind, budget in (("decode", decode), ("flush", flush)):
        rec = worst[kind]
        if rec is not None:
            assert rec.total <= budget, f"{name} {rows} {kind}: step {rec.step} layer {rec.layer}: {dict(rec.ops)}"
    if case.quantized:
        assert "flush" in kinds, "the run moved no block into a store: it tests nothing of a flush"


@pytest.mark.parametrize("name", sorted(METHOD_CASES))
def test_step_totals_are_the_sums_over_layers(model, name):
    # step_totals computes the per-step figures from seq_len and what the stores hold; they must be the per-layer
    # accounting summed, at every step.
    case = METHOD_CASES[name]
    method = case.build(model)
    ids, mask = left_pad(random_prompts(ROWS["ragged"], seed=5))
    cache = method.new_cache(len(ids), (mask == 0).sum(dim=1))
    seen = []

    def check(layer_idx, done=cache.step_done):
        done(layer_idx)
        if layer_idx == len(cache.layers) - 1:
            got = cache.snapshots[-1]
            want = {"code_bits": sum(layer.code_bits() for layer in cache.layers),
                    "live_bytes": sum(layer.live_bytes() for layer in cache.layers),
                    "elements": sum(layer.elements() for layer in cache.layers)}
            for key, value in want.items():
                assert got[key].dtype == value.dtype and torch.equal(got[key], value), (key, len(seen))
            seen.append(1)

    cache.step_done = check
    with bind(model, cache, "torch"), torch.no_grad():
        model.generate(ids, attention_mask=mask, past_key_values=cache, pad_token_id=0, do_sample=False,
                       max_new_tokens=NEW["ragged"], min_new_tokens=NEW["ragged"])
    assert len(seen) == NEW["ragged"]


def test_the_counter_counts_launching_ops_of_cache_code_only(model):
    for op in (torch.ops.aten.view.default, torch.ops.aten.transpose.int, torch.ops.aten.expand.default,
               torch.ops.aten.empty.memory_format):
        assert not launches(op)
    for op in (torch.ops.aten.add.Tensor, torch.ops.aten.copy_.default, torch.ops.aten.index_put_.default):
        assert launches(op)
    ids = torch.stack(random_prompts([20, 20], seed=1))
    with CacheOpCounter() as counter:
        generate_dynamic(model, ids, max_new_tokens=4)
    # A DynamicCache's layer appends keys and values with one cat each; the model's own work is not counted.
    assert len(counter.steps) == 4 * len(model.model.layers)
    assert all(dict(rec.ops) == {"cat": 2} for rec in counter.steps), [dict(r.ops) for r in counter.steps]


# Ops that make the host wait for the device when their inputs live there: a boolean mask or `nonzero` (the output's
# size), `unique` (likewise). A uniform-width store's block writes know their sizes on the host.
WAITING_OPS = ("nonzero", "_unique2", "unique_dim", "unique_consecutive", "masked_select")


class _WaitingOps(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        bool_index = name in ("index", "index_put", "index_put_") and any(
            isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in (args[1] if len(args) > 1 else []) or [])
        if name in WAITING_OPS or bool_index:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name,overrides", [
    ("kvmix", ["method.layer_bits={key:[3],value:[4]}"]),  # 3-bit keys, 11 codes per word (the repo's format)
    ("kivi", ["quant.pack_kernel=torch"]),
])
def test_uniform_width_block_writes_never_wait_for_the_device(name, overrides):
    """A store of one width (KVmix's layers, KIVI) sizes, counts and places its blocks from host numbers: its writes
    dispatch no boolean indexing, `nonzero` or `unique`, each of which would stall the host on a GPU (KVmix's
    releases run as eager ops between replayed decode steps). Mixed widths (MixKVQ) still read theirs."""
    from tiny import build

    method = build(name, overrides, kv_heads=2, q_heads=4, head_dim=64, dtype=torch.bfloat16, device="cpu")
    layer = method.new_cache(3, torch.tensor([0, 5, 9])).layers[0]
    store = layer.key_stream.store
    assert store.uniform_width is not None
    mode, append = _WaitingOps(), store.append

    def watched(*args):  # the store's writes only (the window's ragged bookkeeping is on host lengths)
        with mode:
            append(*args)

    store.append = watched
    gen = torch.Generator().manual_seed(0)
    layer.update(*(torch.randn(3, 2, 40, 64, generator=gen).to(torch.bfloat16) for _ in range(2)))
    layer.after_attention()
    for _ in range(2 * store.p):  # every row releases a block or more
        layer.update(*(torch.randn(3, 2, 1, 64, generator=gen).to(torch.bfloat16) for _ in range(2)))
        layer.after_attention()
    assert int(store.nblocks.min()) >= 1
    assert mode.seen == [], mode.seen
