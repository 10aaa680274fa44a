"""Decode steps replayed from CUDA graphs: the model's forward and the cache's work of a decode step recorded once,
then replayed with one launch, so that a step costs the device's time rather than Python's and ~1400 launches.

`graphed(model, cache)` wraps the model's forward for one `generate` call. A decode step runs from a graph when
every cache layer says it can (`QuantizedCache.replay_step`): its writes and reads go through device tensors
alone (device lengths and store counts, buffers reserved for the whole call). A release of one token per row at
device positions (KIVI's sliding value window on the CUDA kernel's pages) runs inside the step; any other release
(a block flush, KVmix's groups, a ragged window's tokens) is left out of the step and made around it as eager ops at
host positions (`QuantizedCache.release_outside`): after it, or before it for a layer that releases before
attention (KVmix), from the window's oldest tokens. Either way every attention reads what the eager step reads.
PM-KVQ's budget check and halvings run after the step in the same way. The decode kernel plans its splits for a
bucket of `bucket_tokens` tokens (rows shorter than that end their splits early), so one graph serves every step
with the same in-step releases until the longest row crosses into the next bucket; then the next bucket's step runs
once eagerly (kernels built), is recorded and replayed. Any other step (prefill, a window that would have to grow)
runs the eager forward. The host side of a replayed step (lengths, counts, releases after it, statistics) is
`QuantizedCache.advance_host`.

Replays give the same tokens as the eager path (tests/test_graphs.py): the recorded kernels are the eager ones, only
their lengths come from device tensors. `GraphedDecode(record=False)` runs the same flow with the step eager, which
tests the host logic on CPU.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from kernels import kernels_in_use
from mixkvq.kv.cache import QuantizedCache

# auto: replay the decode steps the cache allows, on one CUDA device (the speed and the tokens of a run then come
# from the same kernels, their splits planned per bucket); never: every step eager (debugging, comparisons).
GRAPH_MODES = ("auto", "never")
# The inputs a decode step's forward gets from `generate` that a graph holds in its own buffers; any other tensor
# input makes the step eager.
STEP_INPUTS = ("input_ids", "position_ids")
# The decode kernels that read lengths from the device and plan their splits for a bucket when a step is recorded
# (kernels/decode.py split_plan, kernels/fragment.py fragment_decode, kernels/tiered.py tiered_decode).
GRAPH_KERNELS = ("triton", "cuda", "cuda-tiered")


@dataclass(frozen=True)
class GraphSettings:
    """`attention.cuda_graphs` (`GRAPH_MODES`) and `attention.graph_bucket_tokens`."""

    enabled: bool = True
    bucket_tokens: int = 512

    @classmethod
    def from_config(cls, attention) -> GraphSettings:
        return cls(attention.get("cuda_graphs", "auto") == "auto",
                   int(attention.get("graph_bucket_tokens", cls.bucket_tokens)))


@dataclass
class GraphCounts:
    """What ran how, over one generate call (run rows record `replayed` as `graph_replayed_steps`)."""

    replayed: int = 0
    recorded: int = 0
    eager: int = 0
    buckets: list[int] = field(default_factory=list)
    released_outside: int = 0  # steps planned for a graph around which a release ran as eager ops


@dataclass
class _Recorded:
    graph: torch.cuda.CUDAGraph
    inputs: dict[str, torch.Tensor]
    output: object  # the forward's output; its logits live in the graph's memory
    buffers: tuple  # the cache's buffers when recorded (`QuantizedCache.replay_buffers`)


class GraphedDecode:
    """The forward `generate` calls: eager for prefill and other steps, graph replays where the cache allows."""

    def __init__(self, forward, cache: QuantizedCache, bucket_tokens: int, record: bool = True):
        if bucket_tokens < 1:
            raise ValueError(f"bucket_tokens must be positive, got {bucket_tokens}")
        self.forward, self.cache, self.bucket = forward, cache, bucket_tokens
        # False: every step a graph could replay runs eagerly the way it would be recorded (device lengths, bucket
        # plan, releases around the step), on any device: the replay path's host logic, testable without a GPU.
        self.record = record
        self.counts = GraphCounts()
        self._bucket: int | None = None  # the bucket of the graphs held (earlier buckets never return)
        self._graphs: dict[tuple, _Recorded] = {}  # this bucket's graphs, one per pattern of releases
        self._warm: set[tuple] = set()  # (bucket, releases) whose step ran eagerly once with device lengths
        self._checked: set[tuple] = set()  # releases whose graph's buffers were checked since the last eager step
        self._next: tuple | None = None  # (seq_len, replay_step()) of the next step, asked after a replay

    def __call__(self, *args, **kwargs):
        step = self._planned(args, kwargs)
        if step is None:
            self.counts.eager += 1
            self._checked.clear()
            return self.forward(*args, **kwargs)
        planned, releases = step
        if planned != self._bucket:  # a new bucket: the previous one's graphs are not needed again
            self._bucket, self._graphs = planned, {}
        # Releases left out of the step (a block, a ragged window's): those due before its attention run now.
        if self.cache.release_outside(before_step=True):
            self._checked.clear()
        rec = self._graphs.get(releases) if self.record else None
        # Only eager work moves buffers: a graph checked since the last of it needs no new look.
        if rec is not None and (releases in self._checked or rec.buffers == self.cache.replay_buffers()):
            self._checked.add(releases)
            for name in STEP_INPUTS:
                rec.inputs[name].copy_(kwargs[name])
            rec.graph.replay()
            if self.cache.advance_host(releases):  # the releases due after the step ran as eager ops
                self._checked.clear()
                self.counts.released_outside += 1
            self.counts.replayed += 1
            # The next step's question, asked while the device runs this one (nothing changes the cache in between).
            self._next = (self.cache.layers[0].seq_len, self.cache.replay_step())
            return rec.output
        self._checked.clear()
        with self.cache.releases_left_out(releases):  # as in a replay: in-step releases in it, the others around it
            if step not in self._warm or not self.record:  # the step's kernels are built outside a recording
                self._warm.add(step)
                self.counts.eager += 1
                out = self._with_plan(planned, lambda: self.forward(**self._graph_kwargs(kwargs, kwargs)))
            else:
                self._graphs.pop(releases, None)  # recorded over buffers that moved since
                rec = self._record(planned, kwargs)
                self._graphs[releases] = rec
                rec.graph.replay()  # recording ran the step's host side; its device work runs now
                self.counts.recorded += 1
                self.counts.buckets.append(planned)
                out = rec.output
        if self.cache.finish_step():
            self.counts.released_outside += 1
        return out

    def _planned(self, args, kwargs) -> tuple[int, tuple] | None:
        """(the bucket this step's splits plan for, the cache's releases), when the step can run from a graph."""
        ahead, self._next = self._next, None
        ids = kwargs.get("input_ids")
        if args or ids is None or ids.shape[1] != 1 or (self.record and not ids.is_cuda):
            return None
        if any(isinstance(v, torch.Tensor) for k, v in kwargs.items() if k not in (*STEP_INPUTS, "attention_mask")):
            return None
        if any(kwargs.get(name) is None for name in STEP_INPUTS):
            return None
        if ahead is not None and ahead[0] == self.cache.layers[0].seq_len:
            step = ahead[1]
        else:
            step = self.cache.replay_step()
        if step is None:
            return None
        tokens, releases = step
        return -(-tokens // self.bucket) * self.bucket, releases

    def _graph_kwargs(self, kwargs: dict, inputs: dict) -> dict:
        # No attention mask: decode attention reads each row's length from the cache (attention.quantized_kv_mask).
        return {**{k: v for k, v in kwargs.items() if k not in (*STEP_INPUTS, "attention_mask")},
                **{name: inputs[name] for name in STEP_INPUTS}, "attention_mask": None}

    def _with_plan(self, planned: int, fn):
        for layer in self.cache.layers:
            layer.graph_tokens = planned
        try:
            return fn()
        finally:
            for layer in self.cache.layers:
                layer.graph_tokens = None

    def _record(self, planned: int, kwargs: dict) -> _Recorded:
        inputs = {name: kwargs[name].clone() for name in STEP_INPUTS}
        buffers = self.cache.replay_buffers()  # before the step: the recording sees these
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # its own memory pool, freed with the graph when the next bucket starts
            output = self._with_plan(planned, lambda: self.forward(**self._graph_kwargs(kwargs, inputs)))
        return _Recorded(graph, inputs, output, buffers)


def graph_problem(model, cache: QuantizedCache) -> str | None:
    """Why no decode step of this call can run from a CUDA graph (None: the steps the cache allows can)."""
    devices = {p.device for p in model.parameters()}
    if len(devices) != 1 or next(iter(devices)).type != "cuda":
        return f"the model is not on one CUDA device ({sorted(map(str, devices))})"
    kernels = kernels_in_use(cache.layers)
    if not set(kernels.split("+")) <= set(GRAPH_KERNELS):
        return f"the decode kernel is {kernels!r}, not one of {list(GRAPH_KERNELS)}"
    return None


@contextmanager
def graphed(model, cache: QuantizedCache, settings: GraphSettings):
    """Within the block (inside `bind`), `model`'s forward replays decode steps from CUDA graphs where `cache`
    allows (see the module docstring); yields the `GraphCounts`, or None when disabled or not possible here."""
    if not settings.enabled or graph_problem(model, cache) is not None:
        yield None
        return
    original = model.forward  # the bound method of the class (an instance attribute would be ours)
    runner = GraphedDecode(original, cache, settings.bucket_tokens)
    # `generate` inspects the forward's signature (which inputs it takes): the wrapper shows the original's.
    model.forward = functools.wraps(original)(runner)
    try:
        yield runner.counts
    finally:
        del model.forward
