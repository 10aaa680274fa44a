"""Decode steps replayed from CUDA graphs (mixkvq/kv/graphs.py): on CPU the parts a replay relies on (device
lengths, which steps may replay, the host side of a replayed step, splits planned for a bucket); on a GPU, replayed
steps against the eager ones."""

from __future__ import annotations

import pytest
import torch

from kernels.decode import fused_decode
from mixkvq.kv.attention import bind
from mixkvq.kv.graphs import GraphSettings, graphed
from mixkvq.kv.paged import to_pages
from mixkvq.kv.ragged import Ragged, RaggedBuffer
from method_cases import METHOD_CASES, PMKVQ_NO_ARTIFACT
from tiny import build, generate, left_pad, random_prompts, tiny_model

CUDA = torch.cuda.is_available()


def test_one_token_appends_by_device_lengths_write_what_host_appends_write():
    host, dev = (RaggedBuffer(3, 2, 8, torch.float32, "cpu", capacity=12) for _ in range(2))
    first = Ragged(torch.randn(3, 2, 5, 8), torch.tensor([5, 2, 4]))
    host.append(first), dev.append(first)
    assert torch.equal(dev.track_on_device(), torch.tensor([5, 2, 4]))
    for _ in range(4):
        step = Ragged(torch.randn(3, 2, 1, 8), torch.ones(3, dtype=torch.int64), 1)
        host.append(step), dev.append(step)
        assert torch.equal(dev.device_lens, host.lens)  # the device copy kept up
    assert torch.equal(dev.data, host.data) and torch.equal(dev.lens, host.lens)
    assert (dev.top, dev.common) == (host.top, host.common) == (9, None)
    tracked = dev.device_lens
    dev.drop_front(torch.tensor([1, 1, 1]), 1)  # a common drop: on the device too
    assert dev.device_lens is tracked and torch.equal(tracked, torch.tensor([8, 5, 7]))
    dev.drop_front(torch.tensor([2, 0, 1]))  # any other change: the host's lengths copied over the tracked ones
    assert dev.device_lens is tracked and torch.equal(tracked, torch.tensor([6, 5, 6]))
    dev.append(Ragged(torch.randn(3, 2, 2, 8), torch.tensor([2, 1, 0])))
    assert dev.device_lens is tracked and torch.equal(tracked, dev.lens)


def _after_prefill(name: str, capacity: int, new: int = 3, overrides=(), lengths=(9, 6), paged: bool = False):
    """A cache after a greedy generate of `new` tokens on a tiny CPU model (`paged`: KIVI's stores in the CUDA
    kernel's fragment pages, read by the reference decoder)."""
    dtype = torch.bfloat16 if paged else torch.float32
    model = tiny_model("llama", layers=2, dtype=dtype)
    ids, mask = left_pad(random_prompts(list(lengths), seed=3))
    method = build(name, list(overrides), model=model)
    cache = method.new_cache(len(ids), (mask == 0).sum(dim=1), capacity=capacity)
    if paged:
        for layer in cache.layers:
            to_pages(layer)
    with bind(model, cache, "torch"), torch.no_grad():
        model.generate(ids, attention_mask=mask, past_key_values=cache, do_sample=False, max_new_tokens=new,
                       pad_token_id=0)
    return cache


# KIVI with a 32-token residual on fragment pages: prompts of 45 and 38 tokens leave both value windows full (each
# step releases one value token at the device's count) and the key windows at 13 and 6 tokens (ragged: the first
# row flushes a block 19 tokens in, an eager step).
KIVI_PAGED = dict(name="kivi", overrides=["method.residual_length=32"], lengths=(45, 38), paged=True)


def test_which_decode_steps_may_replay():
    cache = _after_prefill("bf16", capacity=40)
    top = cache.layers[0].key_stream.window.top
    tokens, releases = cache.replay_step()
    assert tokens == top + 1 and set(releases) == {((0, None), (0, None))}  # bf16 windows keep every token
    assert cache.layers[0].key_stream.window.device_lens is not None
    where = cache.replay_buffers()
    assert cache.replay_buffers() == where
    cache.layers[1].value_stream.window.reserve(80)  # a buffer that moves invalidates what was recorded over it
    assert cache.replay_buffers() != where
    full = _after_prefill("bf16", capacity=9 + 3 - 1)  # the last token of the call filled the reserved windows
    assert full.replay_step() is None
    cache.layers[1].probe = object()  # fidelity probes see each step on the host
    assert cache.replay_step() is None

    kivi = _after_prefill(capacity=45 + 40, new=3, **KIVI_PAGED)
    tokens, releases = kivi.replay_step()
    # Keys release nothing; values release one token each, from a window of R = 32 tokens.
    assert set(releases) == {((0, None), (1, 32))}
    assert tokens == 45 + 3  # 45 + 2 generated tokens stored, plus the step's
    layer = kivi.layers[0]
    assert layer.value_stream.store.device_count is not None
    keys = kivi.layers[0].key_stream
    steps = 0
    while not keys.release_due():  # up to the first row's key flush (its window reaches R = 32 tokens)
        keys.window.advance(1)  # (the host's view of a step's key, enough to ask)
        steps += 1
    assert keys.window.lens.tolist()[0] == 32 and steps == 17
    # The flush step may replay too: its block release is left out of the step, made after it (eager ops).
    keys.window.advance(-1)
    assert {r[0] for r in kivi.replay_step()[1]} == {(0, None)}
    # A window that would have to grow cannot take the step's token: eager.
    keys.window.advance(keys.window.capacity - keys.window.top)
    assert kivi.replay_step() is None

    model = tiny_model("llama", layers=2)
    ids, mask = left_pad(random_prompts([9, 6], seed=3))
    for name, case in METHOD_CASES.items():
        if case.quantized:  # short prompts: nothing leaves a window yet, so every method may replay
            _, quantized = generate(model, case.build(model), ids, mask, max_new_tokens=2)
            step = quantized.replay_step()
            assert step is not None and set(step[1]) == {((0, None), (0, None))}, name
    # A sliding window on a flat value store releases one token per step at host positions: after the step.
    kivi = _after_prefill("kivi", capacity=45 + 40, overrides=["method.residual_length=32"], lengths=(45, 38))
    assert set(kivi.replay_step()[1]) == {((0, None), (0, None))}
    assert not kivi.layers[0].value_stream.release_due()
    kivi.layers[0].value_stream.window.advance(1)
    assert kivi.layers[0].value_stream.release_due()
    # KVmix releases before attention, from the window's oldest tokens: never the step's own token.
    kvmix = _after_prefill("kvmix", capacity=60, overrides=METHOD_CASES["kvmix"].overrides, lengths=(9, 6))
    stream = kvmix.layers[0].key_stream
    while not stream.release_due(ahead=1):
        stream.window.advance(1)
    assert kvmix.replay_step() is not None and not kvmix.release_outside(before_step=False)
    before, stored = stream.window.lens.clone(), stream.store.tokens().clone()
    released = stream.window_rule(before + 1, stream.residual)
    assert 0 < int(released.max()) and bool((released <= before).all())
    assert kvmix.release_outside(before_step=True)
    assert torch.equal(stream.window.lens, before - released)
    assert torch.equal(stream.store.tokens(), stored + released)


HOST_SIDE_CASES = {
    "bf16": dict(name="bf16", capacity=40),
    "kivi-paged": dict(capacity=45 + 40, **KIVI_PAGED),
    # MixKVQ and KVmix after a flush of their 32-token blocks (prompts of 45 and 38 tokens), steps in between
    "mixkvq": dict(name="mixkvq", capacity=45 + 40, overrides=["method.residual_length=32"], lengths=(45, 38)),
    "kvmix": dict(name="kvmix", capacity=45 + 40, overrides=METHOD_CASES["kvmix"].overrides, lengths=(45, 38)),
}


@pytest.mark.parametrize("case", sorted(HOST_SIDE_CASES))
def test_the_host_side_of_a_replayed_step_is_the_eager_steps(case):
    kw = HOST_SIDE_CASES[case]
    eager, replayed = _after_prefill(new=3, **kw), _after_prefill(new=2, **kw)
    _, releases = replayed.replay_step()
    replayed.advance_host(releases)  # what a replay does on the host; the graph did the device writes
    for a, b, rel in zip(eager.layers, replayed.layers, releases):
        assert a.seq_len == b.seq_len and a.is_prefill == b.is_prefill
        assert getattr(a, "q_count", None) is None or torch.equal(a.q_count, b.q_count)  # MixKVQ's statistics
        for s, (k, _) in zip(("key_stream", "value_stream"), rel):
            sa, sb = getattr(a, s), getattr(b, s)
            wa, wb = sa.window, sb.window
            assert torch.equal(wa.lens, wb.lens) and (wa.top, wa.common) == (wb.top, wb.common)
            assert (sa.releases, sa.last_release) == (sb.releases, sb.last_release)
            if sa.store is not None:
                assert int(sa.store.tokens().max()) > 0 or case == "bf16"
                assert torch.equal(sa.store.tokens(), sb.store.tokens())
                # the eager step moved the device's count by its release; a replay would have
                assert torch.equal(sa.store.device_count, sb.store.device_count + k)
    assert len(eager.snapshots) == len(replayed.snapshots)
    for k in ("code_bits", "live_bytes", "elements"):
        assert torch.equal(eager.snapshots[-1][k], replayed.snapshots[-1][k])


@pytest.mark.skipif(not CUDA and not __import__("os").environ.get("TRITON_INTERPRET"), reason="needs Triton")
def test_splits_planned_for_a_bucket_give_the_eager_attention():
    """A graph's decode plans its splits for a bucket of tokens from device lengths; rows shorter than the bucket
    end their splits early, so the output is the eager one up to the order of the sums."""
    dev = "cuda" if CUDA else "cpu"
    method = build("bf16", head_dim=64, device=dev)
    cache = method.new_cache(3, torch.tensor([0, 5, 11]), capacity=160)
    layer = cache.layers[0]
    k, v = torch.randn(2, 3, 2, 70, 64, device=dev)
    layer.update(k, v)
    layer.update(*torch.randn(2, 3, 2, 1, 64, device=dev))  # a decode step's token
    assert cache.replay_step() is not None  # windows tracked on the device from here
    layer.update(*torch.randn(2, 3, 2, 1, 64, device=dev))
    q = torch.randn(3, 4, 1, 64, device=dev)
    want = fused_decode(q, layer, 0.125)
    layer.graph_tokens = 128
    try:
        got = fused_decode(q, layer, 0.125)
    finally:
        layer.graph_tokens = None
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_graph_settings_come_from_the_config_and_bad_values_are_refused():
    from mixkvq.config import load_config
    from mixkvq.errors import ConfigError
    from mixkvq.eval.preflight import check_cache_config

    assert GraphSettings.from_config(load_config([]).attention) == GraphSettings(True, 512)  # on by default
    cfg = load_config(["attention.cuda_graphs=never", "attention.graph_bucket_tokens=256"])
    assert GraphSettings.from_config(cfg.attention) == GraphSettings(False, 256)
    for bad, key in (("attention.cuda_graphs=true", "attention.cuda_graphs"),
                     ("attention.graph_bucket_tokens=0", "attention.graph_bucket_tokens")):
        with pytest.raises(ConfigError, match=key):
            check_cache_config(load_config([bad]))


def test_graphs_stay_off_where_they_cannot_run():
    model = tiny_model("llama", layers=1)
    cache = build("bf16", model=model).new_cache(1, torch.zeros(1, dtype=torch.int64), capacity=8)
    with graphed(model, cache, GraphSettings(enabled=True)) as counts:  # a CPU model
        assert counts is None


def eager_and_graphed(model, name: str, overrides, prompts: list[int], seed: int, kernel: str, bucket: int,
                      new: int = 60) -> list[tuple]:
    """Greedy generate of `new` tokens on the GPU, with graphs off then on: [(sequences, graph counts, cache)] each."""
    from mixkvq.kv.graphs import GraphSettings as GS

    ids, mask = left_pad([p.cuda() for p in random_prompts(prompts, seed=seed)])
    runs = []
    for on in (False, True):
        method = build(name, list(overrides), model=model)
        cache = method.new_cache(len(ids), (mask == 0).sum(dim=1).cpu(), capacity=ids.shape[1] + new)
        with bind(model, cache, kernel), graphed(model, cache, GS(on, bucket)) as counts, torch.no_grad():
            out = model.generate(ids, attention_mask=mask, past_key_values=cache, do_sample=False,
                                 max_new_tokens=new, min_new_tokens=new, pad_token_id=0)
        runs.append((out, counts, cache))
    return runs


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("name,bucket", [("bf16", 16), ("bf16", 512), ("mixkvq", 64), ("kvmix", 64), ("pmkvq", 64)])
def test_replayed_decode_steps_give_the_eager_tokens(name, bucket):
    """Greedy generate on a tiny fp32 model with the Triton kernel: steps replayed from graphs (crossing buckets
    when `bucket` is small; MixKVQ's blocks, KVmix's groups and PM-KVQ's blocks and budget shrinks made around
    replayed steps) give the eager path's tokens, and most steps did replay."""
    model = tiny_model("qwen2", layers=2, q_heads=8, kv_heads=2, head_dim=64).cuda()
    overrides = {"mixkvq": ["method.residual_length=32"], "kvmix": METHOD_CASES["kvmix"].overrides,
                 "pmkvq": AROUND_CASES["pmkvq"]}.get(name, [])
    (want, off, _), (got, counts, _) = eager_and_graphed(model, name, overrides, [23, 17, 30], 7, "triton", bucket)
    assert off is None and counts is not None
    assert torch.equal(got, want)
    # KVmix's three ragged rows release groups at different steps, keys and values on cycles of their own (its RPC
    # ratio depends on the width): before those steps, as eager ops, and the steps replay. PM-KVQ's stores move when
    # they grow or narrow (a new recording each time).
    assert counts.replayed >= (30 if name == "pmkvq" else 40) and counts.recorded >= 1, counts
    assert (counts.released_outside >= 3) == (name != "bf16"), counts
    if bucket == 16:
        assert len(counts.buckets) >= 3  # the longest row crossed buckets: one graph each


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_kivi_steps_replayed_on_the_cuda_kernel_give_the_eager_tokens():
    """KIVI-2 (residual 32) on the CUDA kernel's fragment pages: value releases replayed at device positions, key
    flushes made after replayed steps, ragged rows. Greedy tokens with graphs equal the eager path's; most steps
    replayed."""
    from kernels import fragment

    if not fragment.compiler_available():
        pytest.skip("no CUDA compiler for the kernel")
    model = tiny_model("qwen2", dtype=torch.bfloat16, layers=2, q_heads=8, kv_heads=2, head_dim=128).cuda()
    (want, off, eager), (got, counts, replayed) = eager_and_graphed(
        model, "kivi", ["method.residual_length=32"], [45, 38, 50], 11, "cuda", 64)
    assert off is None and counts is not None
    assert torch.equal(got, want)
    assert counts.replayed >= 45 and counts.released_outside >= 3, counts  # the rows' key flushes, after steps
    for a, b in zip(eager.layers, replayed.layers):  # the stores hold as many tokens, the device counts agree
        for s in ("key_stream", "value_stream"):
            sa, sb = getattr(a, s), getattr(b, s)
            assert torch.equal(sa.store.tokens(), sb.store.tokens())
            assert torch.equal(sa.store.device_count.cpu(), sb.store.tokens())
            assert torch.equal(sa.window.lens, sb.window.lens)
            assert torch.equal(sb.window.device_lens.cpu(), sb.window.lens)
    # The first layer's keys and values do not depend on attention: its pages are the same bits. (A replay plans its
    # splits for the bucket, the eager step for the rows' lengths, so later layers' inputs differ by rounding.)
    assert torch.equal(eager.layers[0].key_stream.store.pages.data, replayed.layers[0].key_stream.store.pages.data)


# Small windows so that blocks, sliding tokens and KVmix's groups leave the windows many times in 40 steps; ragged
# prompts so that rows release at different steps.
AROUND_CASES = {
    "kivi": ["method.residual_length=16", "method.group_size=16"],
    "mixkvq": ["method.residual_length=16", "method.key_group_size=16"],
    "kvmix": list(METHOD_CASES["kvmix"].overrides),
    # a budget that halves the rows' widths at different steps and stops two rows (their budget checks run after
    # the steps, with the releases)
    "pmkvq": [*PMKVQ_NO_ARTIFACT, "method.max_len=256"],
}


def generate_the_replay_way(model, cache, ids, mask, bucket_tokens: int | None, new: int = 40):
    """Greedy generate on the reference decoder with `GraphedDecode(record=False)` (None: plain eager steps); returns
    (sequences, the runner or None)."""
    import functools

    from mixkvq.kv.graphs import GraphedDecode

    runner = None
    if bucket_tokens is not None:
        runner = GraphedDecode(model.forward, cache, bucket_tokens=bucket_tokens, record=False)
        model.forward = functools.wraps(runner.forward)(runner)
    try:
        with bind(model, cache, "torch"), torch.no_grad():
            out = model.generate(ids, attention_mask=mask, past_key_values=cache, do_sample=False,
                                 max_new_tokens=new, min_new_tokens=new, pad_token_id=0)
    finally:
        if runner is not None:
            del model.forward
    return out, runner


@pytest.mark.parametrize("name", sorted(AROUND_CASES))
def test_steps_run_the_replay_way_give_the_eager_tokens_and_statistics(name):
    """`GraphedDecode(record=False)` runs every step a graph could replay eagerly the way it would be recorded:
    device lengths, the bucket's plan, and the cache's releases left out of the step and made around it (before it
    for KVmix, which releases before attention; after it for the others). Greedy tokens and every step's statistics
    equal the plain eager path's, and releases did run around steps."""
    model = tiny_model("llama", layers=2)
    ids, mask = left_pad(random_prompts([23, 17, 30], seed=5))
    runs = []
    for around in (False, True):
        method = build(name, AROUND_CASES[name], model=model)
        cache = method.new_cache(len(ids), (mask == 0).sum(dim=1), capacity=ids.shape[1] + 40)
        runs.append((*generate_the_replay_way(model, cache, ids, mask, 16 if around else None), cache))
    (want, _, eager), (got, runner, around) = runs
    assert torch.equal(got, want)
    assert runner.counts.released_outside >= 3, runner.counts
    assert runner.counts.eager >= 30  # (every planned step runs eagerly here: record=False)
    assert len(around.snapshots) == len(eager.snapshots) and torch.equal(around.stop_step, eager.stop_step)
    for a, b in zip(eager.snapshots, around.snapshots):
        for k in ("code_bits", "live_bytes", "elements", "over_budget"):
            assert torch.equal(a[k], b[k]), k
    for a, b in zip(eager.layers, around.layers):
        for s in ("key_stream", "value_stream"):
            sa, sb = getattr(a, s), getattr(b, s)
            assert torch.equal(sa.window.lens, sb.window.lens) and sa.releases == sb.releases
            assert torch.equal(sa.store.tokens(), sb.store.tokens())
            assert torch.equal(sa.store.device_count, sb.store.tokens())
            assert torch.equal(sa.ragged().data, sb.ragged().data)  # the same codes, dequantized


def _release_unless_left_out(layer):
    if not layer.releases_outside:
        layer.key_stream.release()
        layer.value_stream.release()


def _pages_run_the_replay_way(model, ids, mask, break_in_step: bool = False):
    import functools

    cache = build("kivi", ["method.residual_length=32"], model=model).new_cache(
        len(ids), (mask == 0).sum(dim=1), capacity=ids.shape[1] + 40)
    for layer in cache.layers:
        to_pages(layer)  # the CUDA kernel's layout: values slide into their pages one token per step, in the step
        if break_in_step:  # a step that leaves its in-step release out too (eager steps release as before)
            layer.after_attention = functools.partial(_release_unless_left_out, layer)
    out, runner = generate_the_replay_way(model, cache, ids, mask, 64)
    return out, cache, runner.counts


def test_in_step_releases_stay_in_the_step_a_replay_runs():
    """KIVI on fragment pages: the value window's one-token release runs inside the step (device positions), as
    `advance_host` assumes for a replay; only the key blocks' flushes run around steps. A step that leaves its
    in-step release out is refused, not silently made consistent after it (a replay would not be)."""
    model = tiny_model("qwen2", dtype=torch.bfloat16, layers=2, q_heads=8, kv_heads=2, head_dim=128)
    ids, mask = left_pad(random_prompts([45, 38, 50], seed=11))
    want = generate(model, build("kivi", ["method.residual_length=32"], model=model), ids, mask,
                    decode_kernel="torch", max_new_tokens=40, min_new_tokens=40)[0]
    out, cache, counts = _pages_run_the_replay_way(model, ids, mask)
    assert torch.equal(out, want)
    assert counts.eager >= 35 and 1 <= counts.released_outside <= 6, counts  # key flushes only, not every step
    for layer in cache.layers:
        vs = layer.value_stream
        assert torch.equal(vs.window.device_lens.cpu(), vs.window.lens)
        assert torch.equal(vs.store.device_count, vs.store.tokens())
    with pytest.raises(RuntimeError, match="in-step releases"):
        _pages_run_the_replay_way(model, ids, mask, break_in_step=True)
