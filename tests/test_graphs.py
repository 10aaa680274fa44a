"""Decode steps replayed from CUDA graphs (mixkvq/kv/graphs.py): on CPU the parts a replay relies on (device
lengths, which steps may replay, the host side of a replayed step, splits planned for a bucket); on a GPU, replayed
steps against the eager ones."""

from __future__ import annotations

import pytest
import torch

from kernels.decode import fused_decode
from mixkvq.kv.attention import bind
from mixkvq.kv.graphs import GraphSettings, graphed
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
    dev.drop_front(torch.tensor([1, 1, 1]), 1)  # any other change of the lengths drops the device copy
    assert dev.device_lens is None


def _bf16_after_prefill(capacity: int, new: int = 3):
    model = tiny_model("llama", layers=2)
    ids, mask = left_pad(random_prompts([9, 6], seed=3))
    method = build("bf16", model=model)
    cache = method.new_cache(len(ids), (mask == 0).sum(dim=1), capacity=capacity)
    with bind(model, cache, "torch"), torch.no_grad():
        model.generate(ids, attention_mask=mask, past_key_values=cache, do_sample=False, max_new_tokens=new,
                       pad_token_id=0)
    return cache


def test_which_decode_steps_may_replay():
    cache = _bf16_after_prefill(capacity=40)
    top = cache.layers[0].key_stream.window.top
    assert cache.replay_tokens() == top + 1  # bf16 windows keep every token by device lengths
    assert cache.layers[0].key_stream.window.device_lens is not None
    where = cache.replay_buffers()
    assert cache.replay_buffers() == where
    cache.layers[1].value_stream.window.reserve(80)  # a buffer that moves invalidates what was recorded over it
    assert cache.replay_buffers() != where
    full = _bf16_after_prefill(capacity=9 + 3 - 1)  # the last token of the call filled the reserved windows
    assert full.replay_tokens() is None
    cache.layers[1].probe = object()  # fidelity probes see each step on the host
    assert cache.replay_tokens() is None
    model = tiny_model("llama", layers=2)
    ids, mask = left_pad(random_prompts([9, 6], seed=3))
    for name, case in METHOD_CASES.items():  # the quantized methods are not graph-safe yet: they say so
        if case.quantized:
            _, quantized = generate(model, case.build(model), ids, mask, max_new_tokens=2)
            assert quantized.replay_tokens() is None, name


def test_the_host_side_of_a_replayed_step_is_the_eager_steps():
    eager, replayed = _bf16_after_prefill(capacity=40, new=3), _bf16_after_prefill(capacity=40, new=2)
    replayed.replay_tokens()
    replayed.advance_host()  # what a replay does on the host; the graph did the device writes
    for a, b in zip(eager.layers, replayed.layers):
        assert a.seq_len == b.seq_len and a.is_prefill == b.is_prefill
        for s in ("key_stream", "value_stream"):
            wa, wb = getattr(a, s).window, getattr(b, s).window
            assert torch.equal(wa.lens, wb.lens) and (wa.top, wa.common) == (wb.top, wb.common)
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
    assert cache.replay_tokens() is not None  # windows tracked on the device from here
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
@pytest.mark.parametrize("bucket", [16, 512])
def test_replayed_decode_steps_give_the_eager_tokens(bucket):
    """Greedy generate on a tiny fp32 model: steps replayed from graphs (crossing buckets when `bucket` is small)
    give the eager path's tokens, and most steps did replay."""
    from mixkvq.kv.graphs import GraphSettings as GS

    model = tiny_model("qwen2", layers=2, q_heads=8, kv_heads=2, head_dim=64).cuda()
    ids, mask = left_pad([p.cuda() for p in random_prompts([23, 17, 30], seed=7)])
    runs = []
    for on in (False, True):
        method = build("bf16", model=model)
        cache = method.new_cache(len(ids), (mask == 0).sum(dim=1).cpu(), capacity=ids.shape[1] + 60)
        with bind(model, cache, "triton"), graphed(model, cache, GS(on, bucket)) as counts, torch.no_grad():
            out = model.generate(ids, attention_mask=mask, past_key_values=cache, do_sample=False,
                                 max_new_tokens=60, min_new_tokens=60, pad_token_id=0)
        runs.append((out, counts))
    (want, off), (got, counts) = runs
    assert off is None and counts is not None
    assert torch.equal(got, want)
    assert counts.replayed >= 40 and counts.recorded >= 1, counts
    if bucket == 16:
        assert len(counts.buckets) >= 3  # the longest row crossed buckets: one graph each
