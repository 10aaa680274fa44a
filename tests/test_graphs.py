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
from method_cases import METHOD_CASES
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
    for step in range(30):  # up to the first row's key flush: an eager step
        kivi.layers[0].key_stream.window.advance(1)  # (the host's view of a step's key, enough to ask)
        if kivi.replay_step() is None:
            break
    assert kivi.layers[0].key_stream.window.lens.tolist()[0] + 1 == 32 and step == 15

    model = tiny_model("llama", layers=2)
    ids, mask = left_pad(random_prompts([9, 6], seed=3))
    for name, case in METHOD_CASES.items():
        if case.quantized:  # short prompts: nothing leaves a window yet, so every method but PM-KVQ may replay
            _, quantized = generate(model, case.build(model), ids, mask, max_new_tokens=2)
            step = quantized.replay_step()
            if name == "pmkvq":  # its budget check reads the host each step
                assert step is None
            else:
                assert step is not None and set(step[1]) == {((0, None), (0, None))}, name
    # A sliding window on a flat value store releases one token per step at host positions: eager.
    kivi = _after_prefill("kivi", capacity=45 + 40, overrides=["method.residual_length=32"], lengths=(45, 38))
    assert kivi.replay_step() is None


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


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("name,bucket", [("bf16", 16), ("bf16", 512), ("mixkvq", 64), ("kvmix", 64)])
def test_replayed_decode_steps_give_the_eager_tokens(name, bucket):
    """Greedy generate on a tiny fp32 model with the Triton kernel: steps replayed from graphs (crossing buckets
    when `bucket` is small; MixKVQ and KVmix flushing blocks eagerly in between) give the eager path's tokens, and
    most steps did replay."""
    from mixkvq.kv.graphs import GraphSettings as GS

    model = tiny_model("qwen2", layers=2, q_heads=8, kv_heads=2, head_dim=64).cuda()
    ids, mask = left_pad([p.cuda() for p in random_prompts([23, 17, 30], seed=7)])
    overrides = {"mixkvq": ["method.residual_length=32"], "kvmix": METHOD_CASES["kvmix"].overrides}.get(name, [])
    runs = []
    for on in (False, True):
        method = build(name, list(overrides), model=model)
        cache = method.new_cache(len(ids), (mask == 0).sum(dim=1).cpu(), capacity=ids.shape[1] + 60)
        with bind(model, cache, "triton"), graphed(model, cache, GS(on, bucket)) as counts, torch.no_grad():
            out = model.generate(ids, attention_mask=mask, past_key_values=cache, do_sample=False,
                                 max_new_tokens=60, min_new_tokens=60, pad_token_id=0)
        runs.append((out, counts))
    (want, off), (got, counts) = runs
    assert off is None and counts is not None
    assert torch.equal(got, want)
    # KVmix's three ragged rows release 32-token blocks at different steps, keys and values on cycles of their own
    # (its RPC ratio depends on the width): those steps run eagerly.
    assert counts.replayed >= (25 if name == "kvmix" else 40) and counts.recorded >= 1, counts
    if bucket == 16:
        assert len(counts.buckets) >= 3  # the longest row crossed buckets: one graph each


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_kivi_steps_replayed_on_the_cuda_kernel_give_the_eager_tokens():
    """KIVI-2 (residual 32) on the CUDA kernel's fragment pages: value releases replayed at device positions, key
    flushes eager, ragged rows. Greedy tokens with graphs equal the eager path's; most steps replayed."""
    from kernels import fragment
    from mixkvq.kv.graphs import GraphSettings as GS

    if not fragment.compiler_available():
        pytest.skip("no CUDA compiler for the kernel")
    model = tiny_model("qwen2", dtype=torch.bfloat16, layers=2, q_heads=8, kv_heads=2, head_dim=128).cuda()
    ids, mask = left_pad([p.cuda() for p in random_prompts([45, 38, 50], seed=11)])
    runs = []
    for on in (False, True):
        method = build("kivi", ["method.residual_length=32"], model=model)
        cache = method.new_cache(len(ids), (mask == 0).sum(dim=1).cpu(), capacity=ids.shape[1] + 60)
        with bind(model, cache, "cuda"), graphed(model, cache, GS(on, 64)) as counts, torch.no_grad():
            out = model.generate(ids, attention_mask=mask, past_key_values=cache, do_sample=False,
                                 max_new_tokens=60, min_new_tokens=60, pad_token_id=0)
        runs.append((out, counts, cache))
    (want, off, eager), (got, counts, replayed) = runs
    assert off is None and counts is not None
    assert torch.equal(got, want)
    assert counts.replayed >= 30 and counts.eager >= 3, counts  # the rows' key flushes ran eagerly
    for a, b in zip(eager.layers, replayed.layers):  # the stores hold the same codes
        for s in ("key_stream", "value_stream"):
            sa, sb = getattr(a, s), getattr(b, s)
            assert torch.equal(sa.store.tokens(), sb.store.tokens())
            assert torch.equal(sa.store.device_count.cpu(), sb.store.tokens())
            assert torch.equal(sa.window.lens, sb.window.lens)
        assert torch.equal(a.key_stream.store.pages.data, b.key_stream.store.pages.data)
